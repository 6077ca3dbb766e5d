"""The CUDA paths in one run: parity with transformers, the varlen flash path, training steps, speed, MFU.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out gpu_check.json]

Needs PyTorch with CUDA and nothing else: this checkout's `roberta` is imported without its package
dependencies where they are missing (the model, inference and training code use torch alone), and the
comparisons with transformers are skipped, with a note in the JSON, where transformers is absent.
Finishes in a few minutes on one H100. Checks, each a row of the table and an entry of the JSON:
- parity-fp32 / parity-bf16: every head (encoder, masked LM, sequence and token classification,
  question answering, multiple choice) against transformers' model on the same weights, TF32 off;
  fp32 by max abs difference over real tokens, bf16 (both models cast) by cosine to transformers' fp32;
- varlen-vs-padded: bf16 features through the variable-length flash path (`Unpadded`) against the padded
  one (`Padded`);
- tag-answer-batched: a tagger's and a reader's outputs for 40 inputs of mixed lengths run together the
  way `tag` and `answer` run many inputs, on the device, against each input alone on the CPU (float32);
- pretrain-bf16 / pretrain-fp16: one masked-LM update through `roberta.train.train_step` (autocast;
  fp16 with dynamic loss scaling), base size at 512 tokens: finite loss, weights changed;
- finetune-2-steps: two classification updates; the loss is finite and the weights move;
- features-tokens/s: feature extraction of 1,024 natural-length inputs, this project's
  `extract_features_batched` against transformers' RobertaModel with SDPA on length-sorted padded
  batches, both bf16;
- mfu-pretrain-base-512: model FLOPs utilisation of bf16 pretraining, base size, 512 tokens per
  sequence: 6 x (non-embedding parameters) + 12 x layers x hidden x 512 FLOPs per token, plus the LM
  head on the 15% masked tokens, against the GPU's dense bf16 peak (`PEAK_BF16`, by device name).

Without CUDA (or with --dry-run) the same code runs on the CPU with a tiny model and few steps, so the
script cannot rot unnoticed (tests/test_gpu_check.py runs it); its figures then mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}  # dense, TFLOP/s x 1e12


def import_roberta():
    """This checkout's roberta; where its package dependencies (huggingface_hub, tokenizers, ...) are
    missing, its modules are imported without the package's __init__, which is what needs them."""
    sys.path.insert(0, str(ROOT))
    try:
        import roberta  # noqa: F401
    except ImportError:
        for name in [n for n in sys.modules if n == "roberta" or n.startswith("roberta.")]:
            del sys.modules[name]
        package = types.ModuleType("roberta")
        package.__path__ = [str(ROOT / "roberta")]
        sys.modules["roberta"] = package
    import roberta.inference
    import roberta.model
    import roberta.train
    return roberta


def transformers_or_none():
    try:
        import transformers
        return transformers
    except ImportError:
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_lengths(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def random_batch(lengths, vocab, seed, pad_id=1):
    """Right-padded ids (<s> ... </s>) and mask for the given lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = 0, 2
        mask[row, :n] = 1
    return ids, mask


HEADS = [("RobertaModel", {}), ("RobertaForMaskedLM", {}), ("RobertaForSequenceClassification", {"num_labels": 3}),
         ("RobertaForTokenClassification", {"num_labels": 5}), ("RobertaForQuestionAnswering", {}),
         ("RobertaForMultipleChoice", {})]
FIELDS = ("last_hidden_state", "logits", "start_logits", "end_logits")


def parity(R, transformers, config, device, dtype):
    """Every head against transformers on the same weights: fp32 max abs difference over real tokens,
    bf16 cosine of each (both models cast) to transformers in fp32."""
    if transformers is None:
        return {"status": "skipped", "note": "transformers is not installed here"}
    results, worst = {}, 0.0
    for cls_name, overrides in HEADS:
        cfg = R.model.RobertaConfig(**{**config, **overrides})
        torch.manual_seed(0)
        ours = getattr(R.model, cls_name)(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            theirs = getattr(transformers, cls_name).from_pretrained(tmp, attn_implementation="sdpa").eval()
        ours, theirs = ours.to(device), theirs.to(device)
        ids, mask = random_batch(random_lengths(6, 3, cfg.max_tokens, 1), cfg.vocab_size, 2)
        if cls_name == "RobertaForMultipleChoice":
            ids, mask = ids.view(3, 2, -1), mask.view(3, 2, -1)
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            reference = theirs(input_ids=ids, attention_mask=mask)
            if dtype != torch.float32:
                ours, theirs = ours.to(dtype), theirs.to(dtype)
            a = ours(ids, mask)
            b = theirs(input_ids=ids, attention_mask=mask) if dtype != torch.float32 else reference
        row = {}
        for field in FIELDS:
            x, y = getattr(a, field, None), getattr(b, field, None)
            if x is None or y is None:
                continue
            ref = getattr(reference, field)
            real = mask.bool() if x.shape[:mask.dim()] == mask.shape else slice(None)
            if dtype == torch.float32:
                diff = (x[real].float() - y[real].float()).abs().max().item() / max(1.0, y[real].abs().max().item())
                row[field] = {"max_rel_diff": diff}
                worst = max(worst, diff)
            else:
                cos = lambda u: torch.nn.functional.cosine_similarity(
                    u[real].double().flatten(), ref[real].double().flatten(), dim=0).item()
                row[field] = {"cosine_ours": cos(x), "cosine_transformers": cos(y)}
                worst = max(worst, 1 - cos(x), (1 - cos(x)) - (1 - cos(y)))
        results[cls_name] = row
    ok = worst <= 1e-4 if dtype == torch.float32 else worst <= 1e-3
    return {"status": "ok" if ok else "FAILED", "worst": worst, "heads": results,
            "bound": "max |ours - transformers| / max(1, |transformers|) <= 1e-4" if dtype == torch.float32
            else "1 - cosine to transformers' fp32 <= 1e-3, and no worse than transformers' own bf16 by 1e-3"}


def varlen_vs_padded(R, config, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    fast = R.model.RobertaModel(R.model.RobertaConfig(**config)).to(device, dtype).eval()
    ids, mask = random_batch(random_lengths(16, 3, fast.config.max_tokens, 3), fast.config.vocab_size, 4)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        a = fast(ids, mask).last_hidden_state
        fast.padding_free = False
        b = fast(ids, mask).last_hidden_state
    real = mask.bool()
    qkv = torch.zeros(1, 3 * fast.config.hidden_size, device=device, dtype=dtype)
    varlen = R.model.packed_attention_available(qkv, fast.encoder.layer[0].attention.self)
    cos = torch.nn.functional.cosine_similarity(a[real].double(), b[real].double(), dim=-1).min().item()
    return {"status": "ok" if cos >= 0.999 else "FAILED", "dtype": str(dtype), "packed_attention_ran": varlen,
            "min_cosine": cos, "max_abs_diff": (a[real].float() - b[real].float()).abs().max().item()}


def spans_batched(R, config, device):
    """What `tag` and `answer` run for many inputs (`roberta.spans._run`: length batches, the layout made on
    the host, float32 outputs back unpadded) on the device, against each sequence alone through the
    same model on the CPU in float32: a tagger's logits and a reader's start and end logits."""
    try:
        from roberta import spans
    except ImportError as exc:  # spans reads text through the tokenizer, which needs `tokenizers`
        return {"status": "skipped", "note": f"roberta.spans needs {exc.name}, not installed here"}
    worst, lengths = 0.0, random_lengths(40, 3, config["max_position_embeddings"] - 2, 5)
    g = torch.Generator().manual_seed(6)
    sequences = [[0] + torch.randint(4, config["vocab_size"], (n - 2,), generator=g).tolist() + [2] for n in lengths]
    for cls_name, overrides in (("RobertaForTokenClassification", {"num_labels": 5}),
                                ("RobertaForQuestionAnswering", {})):
        torch.manual_seed(0)
        model = getattr(R.model, cls_name)(R.model.RobertaConfig(**{**config, **overrides})).eval()
        with torch.inference_mode():
            alone = [spans._run(model, [seq], 1)[0] for seq in sequences]
            batched = spans._run(model.to(device), sequences, 1)
        for a, b in zip(alone, batched):
            pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
            worst = max(worst, *(float(abs(x - y).max()) for x, y in pairs))
    return {"status": "ok" if worst <= 1e-4 else "FAILED", "worst": worst, "inputs": len(sequences)}


def mlm_batches(config, batch, length, micro, seed):
    """Masked-LM micro-batches of full-length random sequences: 15% of tokens predicted, <mask> in."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro):
        ids = torch.randint(4, config.vocab_size, (batch, length), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        chosen = torch.rand(batch, length, generator=g) < 0.15
        chosen[:, 0] = chosen[:, -1] = False
        labels = torch.where(chosen, ids, -100)
        out.append({"input_ids": ids.masked_fill(chosen, 3), "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def pretrain_step(R, config, device, precision, batch, length):
    torch.manual_seed(0)
    cfg = R.model.RobertaConfig(**config)
    model = R.model.RobertaForMaskedLM(cfg).to(device).train()
    optimizer = R.train.adamw(model, 1e-4, (0.9, 0.98), 1e-6, 0.01)
    autocast, scaler = R.train.precision_context(precision, device)
    before = model.lm_head.dense.weight.detach().clone()
    batches = mlm_batches(cfg, batch, length, 1, 5)
    loss, norm, tokens = R.train.train_step(model, optimizer, scaler, autocast, batches, [1.0], R.train.Dist(device=device),
                                            1.0, 0)
    moved = (model.lm_head.dense.weight.detach() - before).abs().max().item()
    ok = math.isfinite(loss) and math.isfinite(norm) and moved > 0
    return {"status": "ok" if ok else "FAILED", "loss": loss, "grad_norm": norm, "tokens": tokens,
            "weights_moved": moved, "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "expected_initial_loss": math.log(cfg.vocab_size)}


def finetune_steps(R, config, device, steps=2):
    torch.manual_seed(0)
    cfg = R.model.RobertaConfig(**{**config, "num_labels": 2})
    model = R.model.RobertaForSequenceClassification(cfg).to(device).train()
    optimizer = R.train.adamw(model, 1e-5, (0.9, 0.98), 1e-6, 0.1)
    precision = "bf16" if device.type == "cuda" else "fp32"
    autocast, scaler = R.train.precision_context(precision, device)
    losses = []
    for step in range(steps):
        ids, mask = random_batch(random_lengths(16, 5, 64, 10 + step), cfg.vocab_size, 20 + step)
        labels = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(step))
        loss, _, _ = R.train.train_step(model, optimizer, scaler, autocast,
                                        [{"input_ids": ids, "attention_mask": mask, "labels": labels}], [1.0],
                                        R.train.Dist(device=device), 1.0, step)
        losses.append(loss)
    ok = all(math.isfinite(x) for x in losses)
    return {"status": "ok" if ok else "FAILED", "precision": precision, "losses": losses}


def features_speed(R, transformers, config, device, n, repeats):
    """Tokens/s of feature extraction: ours (length-sorted, padding-free) and transformers' SDPA model on
    the same length-sorted batches, both in bf16 on a GPU (fp32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = R.model.RobertaConfig(**config)
    ours = R.model.RobertaModel(cfg, add_pooling_layer=False).eval()
    lengths = random_lengths(n, 5, min(128, cfg.max_tokens), 7)
    g = torch.Generator().manual_seed(8)
    sequences = [[0] + torch.randint(4, cfg.vocab_size, (k - 2,), generator=g).tolist() + [2] for k in lengths]
    real = sum(lengths)
    result = {"inputs": n, "real_tokens": real, "dtype": str(dtype)}

    def timed(fn):
        fn()
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        return real / best

    theirs = None
    if transformers is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            theirs = transformers.RobertaModel.from_pretrained(tmp, add_pooling_layer=False,
                                                               attn_implementation="sdpa").to(device, dtype).eval()
    ours = ours.to(device, dtype)
    with torch.inference_mode():
        result["ours_tokens_per_s"] = timed(lambda: R.inference.extract_features_batched(ours, sequences, 8192))
        if theirs is not None:
            batches = R.inference.length_batches(lengths, 8192)

            def run_theirs():
                for b in batches:
                    ids, mask = R.inference.pad_batch([sequences[i] for i in b], 1)
                    theirs(input_ids=ids.to(device), attention_mask=mask.to(device))
            result["transformers_tokens_per_s"] = timed(run_theirs)
            result["ratio"] = result["ours_tokens_per_s"] / result["transformers_tokens_per_s"]
        else:
            result["note"] = "transformers is not installed here: ours only"
    result["status"] = "ok"
    return result


def peak_bf16(device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():  # the first match: "H100 PCIe" before "H100"
        if all(word in name for word in key.split()):
            return peak, name
    return None, name


def mfu(R, config, device, batch, length, steps):
    torch.manual_seed(0)
    cfg = R.model.RobertaConfig(**config)
    model = R.model.RobertaForMaskedLM(cfg).to(device).train()
    optimizer = R.train.adamw(model, 1e-4, (0.9, 0.98), 1e-6, 0.01)
    precision = "bf16" if device.type == "cuda" else "fp32"
    autocast, scaler = R.train.precision_context(precision, device)
    batches = mlm_batches(cfg, batch, length, 1, 9)
    d = R.train.Dist(device=device)
    R.train.train_step(model, optimizer, scaler, autocast, batches, [1.0], d, 1.0, 0)  # warm-up
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        R.train.train_step(model, optimizer, scaler, autocast, batches, [1.0], d, 1.0, step + 1)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embeddings
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    per_token = 6 * dense + 12 * L * h * length + 0.15 * 6 * h * cfg.vocab_size
    tokens = batch * length
    achieved = per_token * tokens / seconds
    peak, name = peak_bf16(device)
    return {"status": "ok", "device": name, "precision": precision, "batch": batch, "tokens_per_sequence": length,
            "step_seconds": seconds, "tokens_per_s": tokens / seconds, "model_tflops": achieved / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (automatic without CUDA)")
    args = parser.parse_args(argv)
    R = import_roberta()
    transformers = transformers_or_none()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means float32 products
    torch.backends.cudnn.allow_tf32 = False
    tiny = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=66, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    small = tiny if dry else dict(tiny, vocab_size=2000, hidden_size=256, num_hidden_layers=4,
                                  intermediate_size=1024, max_position_embeddings=130)
    base = tiny if dry else R.model.RobertaConfig.base().to_dict()
    length = 64 if dry else 512
    checks = {
        "parity-fp32": lambda: parity(R, transformers, small, device, torch.float32),
        "parity-bf16": lambda: parity(R, transformers, small, device, torch.bfloat16),
        "varlen-vs-padded": lambda: varlen_vs_padded(R, small, device),
        "tag-answer-batched": lambda: spans_batched(R, small, device),
        "pretrain-bf16": lambda: pretrain_step(R, base, device, "bf16", 2 if dry else 16, length),
        "pretrain-fp16": lambda: pretrain_step(R, base, device, "fp16", 2 if dry else 16, length),
        "finetune-2-steps": lambda: finetune_steps(R, base, device),
        "features-tokens/s": lambda: features_speed(R, transformers, base, device, 16 if dry else 1024, 1 if dry else 3),
        "mfu-pretrain-base-512": lambda: mfu(R, base, device, 2 if dry else 32, length, 1 if dry else 10),
    }
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv),
              "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name() if not dry else "cpu (dry run: tiny model, figures meaningless)",
              "dry_run": dry, "transformers": getattr(transformers, "__version__", None), "checks": {}}
    failed = False
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # one check failing must not hide the others' results
            result = {"status": "FAILED", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["checks"][name] = result
        failed |= result["status"] == "FAILED"
        print(f"{name:<24} {result['status']:<8} {result['seconds']:>7.1f}s  {summary(result)}", flush=True)
    text = json.dumps(report, indent=1, default=str)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)  # written whole or not at all
    print(f"wrote {out}")
    return 1 if failed else 0


def summary(result: dict) -> str:
    keys = ("worst", "min_cosine", "loss", "losses", "ours_tokens_per_s", "transformers_tokens_per_s", "ratio",
            "mfu", "model_tflops", "note", "error")
    parts = []
    for k in keys:
        v = result.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

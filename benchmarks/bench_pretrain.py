"""Masked-LM pretraining steps, this project against transformers, base size, sequence length 128.

Corpus lines are tokenized, joined with `</s>` and cut into 128-token sequences `<s> ... </s>` (packed,
so neither side has padding). transformers' `DataCollatorForLanguageModeling(mlm_probability=0.15)`
masks each batch once and both models train on that same masked batch: transformers'
`RobertaForMaskedLM` (LM head on all positions) and ours (LM head on the masked positions only).
A step is forward + backward + AdamW (fused, transformers' Trainer default), in train mode with dropout;
steps alternate between the sides and the median step time is reported. Loss equality is checked on
the same batch with dropout off. bf16 rows run both sides under `torch.autocast(dtype=bfloat16)`.
Peak memory comes from each row's own child process.

    PYTHONPATH=. python benchmarks/bench_pretrain.py            # base size, batch 8 x 128, 4 timed steps
On a GPU, `--device cuda --peak-tflops 989` (H100 bf16 dense) adds model FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time

import torch

from common import DATA, child_memory, corpus_lines, median, run_child, table

LENGTH = 128
SIDES = ["transformers-fp32", "ours-fp32", "transformers-bf16", "ours-bf16"]


def masked_batches(n_batches: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    import transformers
    from roberta.tokenizer import RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(corpus_lines()[: 40 * n_batches * batch], add_special_tokens=False):
        stream += ids + [tokenizer.eos_token_id]
    body = LENGTH - 2
    sequences = [[0] + stream[i:i + body] + [2] for i in range(0, len(stream) - body, body)][: n_batches * batch]
    if len(sequences) < n_batches * batch:
        raise SystemExit("error: not enough corpus text for that many batches; lower --steps or --batch")
    hf_tokenizer = transformers.RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    collator = transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15)
    torch.manual_seed(seed)
    return [{k: v for k, v in collator([{"input_ids": s} for s in sequences[i:i + batch]]).items()
             if k in ("input_ids", "labels")} for i in range(0, len(sequences), batch)]


def load(side: str, path: str, device: str):
    """The model and its optimizer for one row, in train mode."""
    if side.startswith("transformers"):
        import transformers

        model = transformers.RobertaForMaskedLM.from_pretrained(path)
    else:
        from roberta import RobertaForMaskedLM

        model = RobertaForMaskedLM.from_pretrained(path)
    model.to(device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def precision(side: str, device: str):
    if side.endswith("bf16"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step(side, model, optimizer, batch, device) -> float:
    with precision(side, device):
        loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def child(side: str, path: str, batches_file: str) -> None:
    torch.set_num_threads(args.threads)
    batches = torch.load(batches_file, weights_only=True)
    child_memory(lambda: load(side, path, "cpu"),
                 lambda loaded: [step(side, *loaded, batch, "cpu") for batch in batches[:2]])


def model_flops_per_token(config, masked_fraction: float) -> float:
    """Training FLOPs the model needs per token: 6 x weights used (LM head on masked tokens) + attention."""
    H, L, F, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    encoder = L * (4 * H * H + 2 * H * F)
    head = H * H + masked_fraction * V * H
    return 6 * (encoder + head) + 12 * L * LENGTH * H


def main() -> None:
    from roberta import RobertaConfig, RobertaForMaskedLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = masked_batches(args.steps + 1, args.batch)
    tmp = tempfile.mkdtemp(prefix="bench_pretrain_")
    config = RobertaConfig.base(num_hidden_layers=args.layers)
    RobertaForMaskedLM(config).save_pretrained(tmp)
    torch.save(batches, f"{tmp}/batches.pt")
    tokens = args.batch * LENGTH
    masked = sum(int(b["labels"].ne(-100).sum()) for b in batches) / (len(batches) * tokens)
    print(f"batch {args.batch} x {LENGTH}, {masked:.1%} masked, {args.layers} layers, {args.threads} threads, "
          f"device {args.device}", flush=True)

    # Equal loss (and gradients) on the same masked batch, dropout off
    losses, grads = {}, {}
    for side in ("transformers-fp32", "ours-fp32"):
        model, _ = load(side, tmp, args.device)
        model.eval()
        batch = {k: v.to(args.device) for k, v in batches[0].items()}
        loss = model(**batch).loss
        loss.backward()
        losses[side] = loss.item()
        grads[side] = {n: p.grad for n, p in model.named_parameters()}
    grad_diff = max((grads["ours-fp32"][n] - g).abs().max().item() for n, g in grads["transformers-fp32"].items())
    print(f"same masked batch, no dropout: loss transformers {losses['transformers-fp32']:.6f} ours "
          f"{losses['ours-fp32']:.6f}, max gradient difference {grad_diff:.2e}", flush=True)
    del grads

    sides = [s for s in SIDES if args.bf16 or s.endswith("fp32")]
    models = {side: load(side, tmp, args.device) for side in sides}
    seconds = {side: [] for side in sides}
    for i, batch in enumerate(batches):  # the first step of each side is warm-up
        for side in sides:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(side, *models[side], batch, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                seconds[side].append(time.perf_counter() - t)
        if i:
            print(f"step {i}/{args.steps}: " + ", ".join(f"{s} {tokens / seconds[s][-1]:.0f}" for s in sides),
                  flush=True)

    memory = {}
    if args.device == "cpu":
        memory = {side: run_child(__file__, side, tmp, f"{tmp}/batches.pt", "--threads", str(args.threads))
                  for side in sides}
    rows = []
    for side in sides:
        speed = tokens / median(seconds[side])
        reference = tokens / median(seconds[side.replace("ours", "transformers")])
        row = [side, speed, speed / reference, memory.get(side, {}).get("peak_mib", "-"),
               memory.get(side, {}).get("run_added_mib", "-")]
        if args.peak_tflops:
            row.append(f"{speed * model_flops_per_token(config, masked) / (args.peak_tflops * 1e12):.1%}")
        rows.append(row)
    headers = ["row", "tokens/s", "x transformers (same precision)", "peak RSS MiB (load + run)", "MiB added by the run"]
    print(table(headers + (["MFU"] if args.peak_tflops else []), rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (plus one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 is base size; fewer for a quick try")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 rows only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, to report MFU")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "MODEL", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(*args.child) if args.child else main()

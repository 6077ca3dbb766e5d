"""Feature extraction, base size: this project against transformers, ONNX Runtime and CTranslate2.

Every engine holds the same weights: a base-size model with BERT-initialised random weights (no trained
checkpoint is available offline) saved by this project's save_pretrained, which transformers reads with
from_pretrained, CTranslate2 converts with its TransformersConverter (fp32 and int8), and `roberta export
--onnx` writes as ONNX (then ONNX Runtime's transformer optimizer fuses what it recognises). All rows run
the same batches of 32 token-id lists from the real tokenizer, with the same thread count:
- transformers: RobertaModel with SDPA attention, each batch padded to its longest member;
- onnxruntime: the exported graph, transformer-optimized, fp32, the same padded batches;
- ct2-fp32 / ct2-int8: `ctranslate2.Encoder.forward_batch` on the id lists (it handles the padding);
- fp32 / int8 / bf16: this project, `model(ids, mask)` on the padded batch after
  `inference.reduce_precision(..., inference_only=True)`, as the commands and the server prepare it;
  auto: whatever `--precision auto` picks on this machine (named in the row).
Throughput counts real tokens; each engine runs in its own process (so that one engine's malloc settings or
spinning thread pool cannot help or hurt another), timed one pass at a time in turn, the median reported.
The last rows are bounds, not engines (`roofline`): the dense layers' matmuls alone in fp32 (and int8
where this process runs it, bf16 where it runs it on the CPU's own bf16 units), every layer's on each
batch's real tokens with the fastest GEMM this CPU has for each shape, timed in turn with the engines,
i.e. what an engine on the same matmuls would reach if everything else (attention, LayerNorm, GELU,
padding, quantisation) cost nothing; "x its roofline" is each row against its own.
Instruction-set caps in the environment (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
CT2_FORCE_CPU_ISA) reach every engine's process, so that one run shows an AVX2-only machine.
This project's rows and the rooflines import roberta before torch, as its command does (its runtime
settings: roberta/runtime.py); the peers load torch with their own defaults.
Accuracy is per token vector against this project's fp32 (cosine, max abs difference); peak memory is
each row's own child process (VmHWM), loading included, and what the run adds over the loaded process;
of what stays resident, the anonymous memory (RssAnon, after loading or after the run, whichever is more)
leaves out the pages of a checkpoint file read in place, which the kernel can reclaim.

    pip install -e '.[bench]'
    PYTHONPATH=. python benchmarks/bench_features.py --repeats 5     # 128 SST-2 dev sentences
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import sys

import numpy as np

# This project's rows, and the rooflines of its GEMM choices, run as the `roberta` command does: `import
# roberta` before torch, so that roberta/runtime.py's settings are in force when torch loads (MKL's code
# path by instruction set, MKL's reproducible mode, OpenMP's passive wait). Each peer's process loads
# torch with its own defaults.
_side = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a in ("--worker", "--child")), None)
if _side in ("fp32", "int8", "bf16", "auto") or (_side or "").startswith("roofline-"):
    import roberta  # noqa: F401

import torch

from common import (DATA, PASSED_ON, Worker, child_memory, cpu_line, cpu_ticks, median, natural_sentences, run_child,
                    serve_passes, stolen_share, table, tsv_column)

BATCH = 32
OURS = ["fp32", "int8", "bf16", "auto"]
SIDES = ["transformers", "onnxruntime", "ct2-fp32", "ct2-int8", *OURS]
ROOFLINES = ["roofline-fp32", "roofline-bf16", "roofline-int8"]  # bounds, timed like engines (`roofline`)


def batches(sequences):
    return [sequences[i:i + BATCH] for i in range(0, len(sequences), BATCH)]


def unpad(hidden, batch):
    return [torch.as_tensor(h[: len(s)]).float() for h, s in zip(hidden, batch)]


def load(side: str, path: str):
    """The engine a row runs: a function from a list of id lists to one [length, hidden] tensor each."""
    from roberta.inference import pad_batch, reduce_precision

    if side == "transformers":
        import transformers

        model = transformers.RobertaModel.from_pretrained(path, add_pooling_layer=False,
                                                          attn_implementation="sdpa").eval()
        return lambda seqs: [f for b in batches(seqs) for f in unpad(
            model(*pad_batch(b, pad_id=1)).last_hidden_state, b)]
    if side == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(f"{path}/onnx/optimized.onnx", options,
                                               providers=["CPUExecutionProvider"])

        def run(seqs):
            out = []
            for b in batches(seqs):
                ids, mask = pad_batch(b, pad_id=1)
                hidden, = session.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
                out += unpad(hidden, b)
            return out
        return run
    if side in ROOFLINES:
        return roofline(side.split("-")[1], path)
    if side.startswith("ct2-"):
        import ctranslate2

        kind = {"ct2-fp32": "float32", "ct2-int8": "int8"}[side]
        encoder = ctranslate2.Encoder(f"{path}/{side}", device="cpu", compute_type=kind,
                                      intra_threads=args.threads, inter_threads=1)
        return lambda seqs: [f for b in batches(seqs) for f in unpad(
            np.asarray(encoder.forward_batch(b).last_hidden_state), b)]

    from roberta import RobertaModel

    model = reduce_precision(RobertaModel.from_pretrained(path).eval(), side, inference_only=True)  # as the commands

    def run(seqs):
        out = []
        for b in batches(seqs):
            out += unpad(model(*pad_batch(b, pad_id=1)).last_hidden_state, b)
        return out
    return run


def roofline(precision: str, path: str):
    """A pass of an encoder in `precision` whose only cost is its dense layers' matmuls, as a row to time:
    every layer's four products (its own weights, as a model streams them) on each batch's real tokens,
    each with the fastest GEMM this CPU runs for that shape and token count: in fp32 the fastest of MKL's
    sgemm and oneDNN on the plain or the reordered weight (`roberta.kernels.candidates`), chosen by
    timing on the first (warm-up) pass; in bf16 oneDNN on reordered weights; in int8 oneDNN's integer
    matmul on inputs already quantised (the quantisation and rescaling around it left out). The most any
    engine built on these matmuls can reach, whatever it does about attention, LayerNorm, GELU and
    padding. Timed in turn with the engines, so that the machine's drift reaches both. The warm-up pass
    returns the GEMMs that won."""
    from roberta import RobertaConfig, kernels
    from roberta.inference import PackedLinear, quantize_rows

    config = RobertaConfig.load(f"{path}/config.json")
    h, f = config.hidden_size, config.intermediate_size
    shapes = [(3 * h, h), (h, h), (f, h), (h, f)]  # q/k/v together, attention output, FFN in, FFN out
    g = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(n, k, generator=g) * 0.02, torch.zeros(n)) for n, k in shapes]
              for _ in range(config.num_hidden_layers)]
    if precision == "fp32":
        calls = [[kernels.candidates(w, b) for w, b in layer] for layer in layers]
        cast = lambda x: x
    elif precision == "bf16":
        calls = [[{"onednn": PackedLinear(w, b)} for w, b in layer] for layer in layers]
        cast = lambda x: x.bfloat16()
    else:
        def int8(w, n):
            packed = torch.ops.onednn.qlinear_prepack(quantize_rows(w)[0].int().sub(128).to(torch.int8), None)
            scale, zero = torch.full((n,), 1e-4), torch.zeros(n, dtype=torch.int32)
            return {"onednn": lambda q: torch.ops.onednn.qlinear_pointwise(
                q, 1.0, 128, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], "")}
        calls = [[int8(w, n) for (w, _), (n, _) in zip(layer, shapes)] for layer in layers]
        cast = lambda x: quantize_rows(x)[0]
    plan = []  # per batch: its inputs by width and the winning candidate per shape

    def run(seqs):
        if not plan:  # the warm-up pass: time every candidate on layer 0's weights, keep the fastest
            for b in batches(seqs):
                x = {k: cast(torch.randn(sum(map(len, b)), k, generator=g)) for _, k in shapes}
                winners = []
                for i, (_, k) in enumerate(shapes):
                    spent = kernels.fastest({name: (lambda c=c: c(x[k])) for name, c in calls[0][i].items()})
                    winners.append(min(spent, key=spent.get))
                plan.append((x, winners))
            return {"gemms": "+".join(sorted({w for _, winners in plan for w in winners}))}
        for x, winners in plan:
            for layer in calls:
                for i, (_, k) in enumerate(shapes):
                    layer[i][winners[i]](x[k])
    return run


def child(side: str, path: str, ids_file: str) -> None:
    """One row alone in this process: load, run once, report peak memory."""
    torch.set_num_threads(args.threads)
    with open(ids_file) as f:
        sequences = json.load(f)
    with torch.inference_mode():
        child_memory(lambda: load(side, path), lambda run: run(sequences))


def worker(side: str, path: str, ids_file: str) -> None:
    """One row in its own process: load, run once and save the outputs beside the ids, then time passes."""
    torch.set_num_threads(args.threads)
    with open(ids_file) as f:
        sequences = json.load(f)
    with torch.inference_mode():
        if side in ROOFLINES:
            from roberta.inference import keep_freed_memory

            keep_freed_memory()  # the matmuls' outputs without page faults, as our models run them
        run = load(side, path)
        torch.save(run(sequences), f"{ids_file}.{side}.pt")
        serve_passes(lambda: run(sequences))


def prepare(tmp: str, tokenizer) -> str:
    """Random base-size weights in every engine's format; returns the fusion report of ORT's optimizer."""
    import ctranslate2
    from onnxruntime.transformers.optimizer import optimize_model

    from roberta import RobertaConfig, RobertaModel
    from roberta.export import export_onnx

    config = RobertaConfig.base(num_hidden_layers=args.layers)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp, tokenizer=tokenizer)
    for side, kind in (("ct2-fp32", None), ("ct2-int8", "int8")):
        ctranslate2.converters.TransformersConverter(tmp).convert(f"{tmp}/{side}", quantization=kind)
    export_onnx(tmp, f"{tmp}/onnx")
    optimized = optimize_model(f"{tmp}/onnx/model.onnx", model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(f"{tmp}/onnx/optimized.onnx")
    return json.dumps({k: v for k, v in optimized.get_fused_operator_statistics().items() if v})


def main() -> None:
    from roberta.inference import resolve_precision
    from roberta.tokenizer import RobertaTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    if args.inputs == "sst2":
        texts = tsv_column(DATA / "glue" / "SST-2" / "dev.tsv", "sentence")[: args.sentences]
    else:
        texts = natural_sentences(args.sentences)
    sequences = tokenizer.encode_batch(texts, max_length=args.max_length)
    real = sum(map(len, sequences))
    padded = sum(len(b) * max(map(len, b)) for b in batches(sequences))
    auto, why = resolve_precision("auto", "cpu")
    caps = " ".join(f"{k}={os.environ[k]}" for k in PASSED_ON[:5] if k in os.environ) or "none"
    print(f"{cpu_line()}; PyTorch capability {torch.backends.cpu.get_cpu_capability()}; instruction-set "
          f"caps: {caps}; auto -> {auto} ({why})")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{len(sequences)} {args.inputs} sentences, {real} real tokens, {padded} once padded in batches of "
          f"{BATCH}; {args.layers} layers, {args.threads} threads", flush=True)

    tmp = tempfile.mkdtemp(prefix="bench_features_")
    print("ONNX Runtime optimizer fused:", prepare(tmp, tokenizer), flush=True)
    ids_file = f"{tmp}/ids.json"
    with open(ids_file, "w") as f:
        json.dump(sequences, f)

    from roberta.inference import BF16_FLAGS, cpu_flags, runs_here

    sides = [side for side in SIDES if side in args.engines.split(",") or side == "fp32"]  # fp32: the reference
    # a bf16 roofline only where the CPU has bf16 units: elsewhere oneDNN emulates bf16, and a bound on the
    # emulation says nothing about what the hardware can do
    reduced = sorted(runs_here() - (set() if cpu_flags().intersection(BF16_FLAGS) else {"bf16"}))
    bounds = [f"roofline-{p}" for p in ["fp32", *reduced] if not args.no_roofline]
    workers = {}
    for side in sides + bounds:  # one process each, started one after another (loading is not timed)
        workers[side] = Worker(__file__, side, tmp, ids_file, "--threads", str(args.threads))
    outputs = {side: torch.load(f"{ids_file}.{side}.pt") for side in sides + bounds}  # from each warm-up pass
    seconds = {side: [] for side in sides + bounds}
    ticks = cpu_ticks()
    for repeat in range(args.repeats):
        for side in sides + bounds:
            time.sleep(args.gap)  # the engine before may still spin its threads (ONNX Runtime's do)
            seconds[side].append(workers[side].run_pass())
        print(f"repeat {repeat + 1}/{args.repeats}: " +
              ", ".join(f"{s} {real / seconds[s][-1]:.0f}" for s in sides + bounds), flush=True)
    for w in workers.values():
        w.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; timed passes: "
          f"{stolen_share(ticks)}", flush=True)

    memory = {side: run_child(__file__, side, tmp, ids_file, "--threads", str(args.threads))
              for side in sides} if not args.no_memory else {}
    reference = torch.cat(outputs["fp32"]).double()
    speed = {side: real / median(seconds[side]) for side in sides + bounds}
    for ours, peer in (("fp32", "ct2-fp32"), ("int8", "ct2-int8"), ("fp32", "transformers"),
                       *((p, f"roofline-{p}") for p in OURS)):
        if ours in sides and peer in seconds:
            print(f"{ours} / {peer} per pass:", " ".join(f"{b / a:.2f}" for a, b in zip(seconds[ours], seconds[peer])))
    speed.update({side: float("nan") for side in SIDES if side not in sides})
    rows = []
    for side in sides:
        a = torch.cat(outputs[side]).double()
        cos = torch.nn.functional.cosine_similarity(a, reference, dim=-1)
        mem = memory.get(side, {"peak_mib": float("nan"), "run_added_mib": float("nan"), "anon_mib": float("nan")})
        name = f"auto (= {auto})" if side == "auto" else side
        precision = auto if side == "auto" else side if side in OURS else side[4:] if side.startswith("ct2-") else "fp32"
        of_roofline = speed[side] / speed.get(f"roofline-{precision}", float("nan"))
        rows.append([name, speed[side], speed[side] / speed["transformers"], speed[side] / speed["ct2-fp32"],
                     speed[side] / speed["ct2-int8"], of_roofline, mem["peak_mib"], mem["run_added_mib"], mem["anon_mib"],
                     (a - reference).abs().max().item(), f"{cos.min().item():.6f}", f"{cos.mean().item():.6f}"])
    for side in bounds:
        ceiling = speed[side]
        rows.append([f"{side.split('-')[1]} roofline: matmuls only ({outputs[side]['gemms']})", ceiling,
                     ceiling / speed["transformers"], ceiling / speed["ct2-fp32"], ceiling / speed["ct2-int8"], 1.0,
                     float("nan"), float("nan"), float("nan"), 0, "-", "-"])
    print(table(["row", "tokens/s", "x transformers", "x ct2-fp32", "x ct2-int8", "x its roofline",
                 "peak RSS MiB (load + run)", "MiB added by the run",
                 "anonymous MiB (not file pages)", "max abs diff vs our fp32",
                 "min cosine vs fp32", "mean cosine vs fp32"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": seconds, "real_tokens": real, "padded_tokens": padded, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", choices=["sst2", "natural"], default="sst2",
                        help="sst2: the first SST-2 dev sentences (default); natural: SST-2, RTE and WikiText-2 mixed")
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128, help="truncate longer inputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 is base size; fewer for a quick try")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row child processes")
    parser.add_argument("--no-roofline", action="store_true", help="skip the roofline rows")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds of idle before each timed pass")
    parser.add_argument("--engines", default=",".join(SIDES),
                        help=f"comma-separated rows to run, of {','.join(SIDES)} (fp32 always runs: it is the reference)")
    parser.add_argument("--json", help="also write the timings and the table here")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "MODEL", "IDS"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "MODEL", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.engines.split(",")) - set(SIDES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {','.join(SIDES)}")
    if args.repeats < 1 or args.gap < 0:
        parser.error("--repeats must be at least 1 and --gap at least 0")
    child(*args.child) if args.child else worker(*args.worker) if args.worker else main()

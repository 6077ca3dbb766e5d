"""The element-wise steps between the matmuls, in C against PyTorch, inside one model in one process.

Each sublayer of the encoder ends with a residual addition and a LayerNorm, which the C kernel
(`roberta.model.add_norm`, csrc/kernels.c) does in one pass per row where PyTorch makes three; in int8,
the FFN's GELU runs in the same C pass as the rescaling of the integer products, and so does quantising
the result for the FFN's second layer (`roberta.inference.scale_rows_quantized`), where PyTorch makes a
GELU pass of its own and the second layer quantises its input in a pass of its own (in C here, as the
time of the second layer, not the first); in fp32 on weights packed by MKL (where `roberta.kernels`
chose that), the FFN's bias and GELU go in one C pass after the product (`inference.add_bias_gelu`),
where PyTorch adds the bias and applies GELU in two. This runs base size (random
weights: the speed does not depend on them) in inference on the first SST-2 dev sentences, in batches of
32 as `bench_features.py` does, alternating passes with the C steps and with PyTorch's, and prints per
pass the whole pass, the time spent in the steps replaced (wall clock around each call) and, for
scale, in the attention kernel, which both ways share, with the medians and the CPU. Alternating in one
process lets the machine's drift reach both ways alike.

    PYTHONPATH=. python benchmarks/bench_passes.py --precision int8 --repeats 8
"""
from __future__ import annotations

import argparse
import time

import torch

from common import cpu_line, cpu_ticks, median, sst2_sequences, stolen_share

BATCH = 32


def main() -> None:
    import roberta.inference as inference
    import roberta.model as model
    from roberta import RobertaConfig, RobertaModel
    from roberta.inference import pad_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sequences = sst2_sequences(args.sentences)
    batches = [pad_batch(sequences[i:i + BATCH], pad_id=1) for i in range(0, len(sequences), BATCH)]
    net = inference.reduce_precision(RobertaModel(RobertaConfig.base()).eval(), args.precision, inference_only=True)
    if model._add_norm_cpu is None:
        raise SystemExit("roberta._kernels is not built: nothing to compare (pip install -e .)")

    c_add_norm, c_scale_rows, attend = model._add_norm_cpu, inference.scale_rows, model._attend_cpu
    c_bias_gelu = inference.add_bias_gelu
    add_norm = model.add_norm  # the library's, wrapped below to time them
    spent = {"add_norm": 0.0, "ffn_in": 0.0, "attention": 0.0}

    def timed_attend(*call):
        start = time.perf_counter()
        attend(*call)
        spent["attention"] += time.perf_counter() - start

    def timed_add_norm(y, residual, norm):
        start = time.perf_counter()
        out = add_norm(y, residual, norm)
        spent["add_norm"] += time.perf_counter() - start
        return out

    def torch_scale_rows(y, m, bias, gelu=False):  # the rescaling in C, its GELU as PyTorch's own pass
        y = c_scale_rows(y, m, bias)
        return torch.ops.aten.gelu_(y) if gelu else y

    def torch_bias_gelu(y, bias):  # PyTorch's two passes
        return torch.ops.aten.gelu_(y.add_(bias))

    def timed_gelu_layers(cls):  # the FFN's first layer, whichever module holds it
        forward = cls.forward

        def timed(module, x):
            if not module.gelu:
                return forward(module, x)
            start = time.perf_counter()
            out = forward(module, x)
            spent["ffn_in"] += time.perf_counter() - start
            return out
        cls.forward = timed

    model.add_norm = timed_add_norm
    if attend is not None:
        model._attend_cpu = timed_attend
    for cls in (inference.Int8Linear, inference.PackedLinear, inference.PlainLinear):
        timed_gelu_layers(cls)

    def run(c: bool) -> list[float]:
        model._add_norm_cpu = c_add_norm if c else None
        inference.scale_rows = c_scale_rows if c else torch_scale_rows
        inference.add_bias_gelu = c_bias_gelu if c else torch_bias_gelu
        for layer in net.encoder_model.encoder.layer:  # int8: C quantises the FFN's hidden rows in that pass too
            if isinstance(layer.intermediate, inference.Int8Linear):
                layer.intermediate.quantized_output = c
        spent.update(add_norm=0.0, ffn_in=0.0, attention=0.0)
        start = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:
                net(ids, mask)
        return [time.perf_counter() - start, spent["add_norm"], spent["ffn_in"], spent["attention"]]

    run(True), run(False)  # warm-up
    times = {True: [], False: []}
    ticks = cpu_ticks()
    for repeat in range(args.repeats):
        for c in ((True, False) if repeat % 2 == 0 else (False, True)):
            times[c].append(run(c))
    tokens = sum(len(s) for s in sequences)
    ffn = net.encoder.layer[0].intermediate
    held = getattr(ffn, "kernel", "plain weight") + (", GELU in oneDNN's epilogue" if getattr(ffn, "fused", False)
                                                     else "")
    print(f"{cpu_line()}; {args.threads} threads; base size, {args.precision}, {len(sequences)} SST-2 sentences, "
          f"{tokens} real tokens, batches of {BATCH}; timed passes: {stolen_share(ticks)}")
    for c, name in ((True, "C steps"), (False, "PyTorch's")):
        rows = times[c]
        print(f"{name:>10}: pass {' '.join(f'{r[0]:.3f}' for r in rows)} s (median {median([r[0] for r in rows]):.3f}, "
              f"{tokens / median([r[0] for r in rows]):.0f} tokens/s); residual + LayerNorm median "
              f"{median([r[1] for r in rows]) * 1e3:.1f} ms" +
              (f"; FFN's first layer (matmul, rescaling, GELU; C: quantising for the second) median {median([r[2] for r in rows]) * 1e3:.1f} ms"
               if args.precision == "int8" else f"; FFN's first layer (matmul, bias, GELU: {held}) median "
               f"{median([r[2] for r in rows]) * 1e3:.1f} ms") +
              f"; attention median {median([r[3] for r in rows]) * 1e3:.1f} ms")
    print("PyTorch's / C per pair of passes:", " ".join(f"{b[0] / a[0]:.3f}" for a, b in zip(times[True], times[False])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main()

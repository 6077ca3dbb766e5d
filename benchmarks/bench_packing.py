"""Whole float32 inference passes with the encoder's weights laid out each way, in one process.

An inference-only fp32 model (what the commands and the server load) holds its encoder weights either
plain (each product through its measured plain GEMM, `roberta.kernels.linear`), reordered once for
oneDNN ("onednn-packed") or packed once by MKL ("mkl-packed"), all one way, as `kernels.packing` decides
from one product of each shape timed alone. This times whole passes of base size (random weights: the
speed does not depend on them) over the first SST-2 dev sentences with every weight held each way, and
with each shape held the way that shape alone measured fastest ("per shape", where the libraries may
alternate within a pass), the models taking turns so that the machine's drift reaches all alike: in
batches of 32, as `bench_features.py` runs them, and one sentence at a time, as a server answers single
requests. Prints the way the library chose here, and per way the median pass, tokens/s and its median
per-turn ratio to the plain weights', with the CPU.

    PYTHONPATH=. python benchmarks/bench_packing.py --repeats 7
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from common import cpu_line, cpu_ticks, median, sst2_sequences, stolen_share, table


def main() -> None:
    from roberta import RobertaConfig, RobertaModel, kernels
    from roberta.inference import PackedLinear, PlainLinear, _prepare_encoder, keep_freed_memory, pad_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sequences = sst2_sequences(args.sentences)
    base = RobertaModel(RobertaConfig.base()).eval()

    own = {shape: kernels.packing([shape]) for shape in kernels.encoder_shapes()}
    chosen = kernels.packing(kernels.encoder_shapes())
    models = {}
    for way in ["plain", *kernels.available_packed(), "per shape"]:  # the library's own preparation, each way
        def make(weight, bias, gelu=False, way=way):
            kernel = own[tuple(weight.shape)] if way == "per shape" else None if way == "plain" else way
            return PackedLinear(weight, bias, gelu, torch.float32, kernel) if kernel else PlainLinear(weight, bias, gelu)
        models[way] = copy.deepcopy(base)
        _prepare_encoder(models[way], make)
    keep_freed_memory()  # as `inference.prepare` does for the library's models
    del base

    def held(model) -> str:
        return ", ".join(sorted({m.kernel for m in model.modules() if isinstance(m, PackedLinear)})) or "plain"

    groups = {"batches of 32": [pad_batch(sequences[i:i + 32], pad_id=1) for i in range(0, len(sequences), 32)],
              "one at a time": [pad_batch([s], pad_id=1) for s in sequences[: args.singles]]}
    print(f"{cpu_line()}; {args.threads} threads; base size, fp32, inference only; "
          f"chosen here: {chosen or 'plain'}; each shape alone: " +
          ", ".join(f"{o}x{i} {k or 'plain'}" for (o, i), k in own.items()))
    for group, batches in groups.items():
        count = sum(int(mask.sum()) for _, mask in batches)

        def run(model) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for ids, mask in batches:
                    model(ids, mask)
            return time.perf_counter() - start

        for model in models.values():
            run(model)  # warm-up: first-call allocations and the plain GEMMs' measurements
        times = {way: [] for way in models}
        ticks = cpu_ticks()
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(models)[::-1]
            for way in order:
                times[way].append(run(models[way]))
        rows = []
        for way, model in models.items():
            ratios = [p / w for p, w in zip(times["plain"], times[way])]
            rows.append([way, held(model), f"{median(times[way]):.3f}", f"{count / median(times[way]):,.0f}",
                         f"{median(ratios):.3f}", " ".join(f"{r:.2f}" for r in ratios)])
        print(f"\n{group}: {len(batches)} passes' worth of {count} real tokens each turn; {stolen_share(ticks)}")
        print(table(["way", "weights held", "median s", "tokens/s", "x plain (median per turn)", "per turn"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--singles", type=int, default=32, help="sentences timed one at a time")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main()

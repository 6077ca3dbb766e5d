"""Two builds of the C kernels (roberta._kernels) in one process, in turns: this checkout's and another,
such as an earlier commit's. For a change to csrc/ that should not cost speed, on the CPU at hand.

It times the attention kernel alone on batches of 32 sequences of several lengths (12 heads of 64, base
size), at each instruction-set level the CPU has and on 1 and 2 threads, then whole inference passes of
base size (random weights) over the first SST-2 dev sentences in batches of 32 with every kernel of one
build or the other, in fp32 and int8 (each build as it runs: one from before the int8 FFN quantised its
hidden rows in its rescaling pass runs without that). Calls alternate between the builds, so that the
machine's drift reaches both alike; it prints medians and the ratio (other / this).

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace)
    PYTHONPATH=. python benchmarks/bench_kernel_builds.py /tmp/before/roberta/_kernels*.so
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from common import cpu_line, cpu_ticks, median, sst2_sequences, stolen_share

LENGTHS = {"SST-2-like (4-49 tokens)": None, "16": 16, "26": 26, "64": 64, "128": 128}


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("other._kernels", path)  # PyInit__kernels, its own module
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def turns(builds: dict, call, repeats: int) -> dict[str, list[float]]:
    """{name: seconds of each call(build)}, the builds taking turns, each first in every other round."""
    times = {name: [] for name in builds}
    order = list(builds)
    for repeat in range(repeats):
        for name in (order if repeat % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            call(builds[name])
            times[name].append(time.perf_counter() - start)
    return times


def attention(builds: dict, repeats: int) -> None:
    rng = np.random.default_rng(0)
    heads, dim = 12, 64
    levels = []
    for level in ("AVX512", "AVX2"):
        if all(b.set_isa(level) == level for b in builds.values()) and all(b.attend_available() for b in builds.values()):
            levels.append(level)
    for level in levels:
        for threads in (1, 2):
            for name, length in LENGTHS.items():
                lengths = rng.integers(4, 50, 32) if length is None else np.full(32, length)
                cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                tokens = int(cu[-1])
                qkv = rng.standard_normal((tokens, 3 * heads * dim), dtype=np.float32)
                out = np.empty((tokens, heads * dim), np.float32)

                def call(build):
                    build.set_isa(level)
                    build.attend(qkv, tokens, cu, 32, heads, dim, out, threads)
                times = turns(builds, call, repeats)
                this, other = median(times["this"]), median(times["other"])
                print(f"attention {level}, {threads} thread{'s' if threads > 1 else ''}, lengths {name}: this "
                      f"{this * 1e3:.3f} ms, other {other * 1e3:.3f} ms, other / this {other / this:.3f}")
    for b in builds.values():
        b.set_isa(torch.backends.cpu.get_cpu_capability())


def passes(builds: dict, precision: str, repeats: int) -> None:
    import roberta.inference as inference
    import roberta.model as model
    from roberta import RobertaConfig, RobertaModel
    from roberta.inference import pad_batch

    torch.manual_seed(0)
    sequences = sst2_sequences(args.sentences)
    batches = [pad_batch(sequences[i:i + 32], pad_id=1) for i in range(0, len(sequences), 32)]
    net = inference.reduce_precision(RobertaModel(RobertaConfig.base()).eval(), precision, inference_only=True)

    def quantises(build):  # whether scale_rows can quantise the rows it rescales (else the FFN hands on floats)
        y, q = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.uint8)
        try:
            build.scale_rows(y, 1, 8, np.ones((1, 1), np.float32), y[0], True, 1, q, np.zeros(1, np.float32))
            return True
        except TypeError:
            return False

    fused = {name: quantises(build) for name, build in builds.items()}
    ffn_in = [layer.intermediate for layer in net.encoder_model.encoder.layer
              if isinstance(layer.intermediate, inference.Int8Linear)]

    def call(build):  # every kernel of this build: the int8 steps, attention, residual + LayerNorm
        name = next(n for n, b in builds.items() if b is build)
        inference._kernels, model._attend_cpu, model._add_norm_cpu = build, build.attend, build.add_norm
        for layer in ffn_in:
            layer.quantized_output = fused[name]
        with torch.inference_mode():
            for ids, mask in batches:
                net(ids, mask)
    mine = (inference._kernels, model._attend_cpu, model._add_norm_cpu)
    try:
        times = turns(builds, call, repeats)
    finally:
        inference._kernels, model._attend_cpu, model._add_norm_cpu = mine
        for layer in ffn_in:
            layer.quantized_output = True
    this, other = times["this"], times["other"]
    print(f"{precision} passes ({len(sequences)} sentences): this {median(this):.3f} s, other {median(other):.3f} s; "
          f"other / this per pair {' '.join(f'{b / a:.3f}' for a, b in zip(this, other))} "
          f"(median {median([b / a for a, b in zip(this, other)]):.3f})")


def main() -> None:
    from roberta import _kernels

    torch.set_num_threads(2)
    builds = {"this": _kernels, "other": load_build(args.other)}
    builds["other"].set_isa(torch.backends.cpu.get_cpu_capability())
    print(f"{cpu_line()}; PyTorch capability {torch.backends.cpu.get_cpu_capability()}; other build: {args.other}")
    ticks = cpu_ticks()
    attention(builds, args.repeats)
    for precision in ("fp32", "int8"):
        passes(builds, precision, args.passes)
    print(f"timed calls: {stolen_share(ticks)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the other build's shared library (roberta/_kernels*.so of another checkout)")
    parser.add_argument("--repeats", type=int, default=21, help="attention calls per build and case")
    parser.add_argument("--passes", type=int, default=12, help="whole passes per build and precision")
    parser.add_argument("--sentences", type=int, default=128)
    args = parser.parse_args()
    main()

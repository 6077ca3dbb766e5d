"""Which matrix-multiply library runs the dense layers on this CPU: chosen by measuring, not by vendor.

The same float32 product `[tokens, in] x [in, out]` runs at very different speeds through PyTorch's two
CPU GEMMs depending on the machine: `F.linear` calls MKL's sgemm, which on AMD CPUs takes a slower path
(218 GFLOP/s against oneDNN's 385 for [800 x 768] x [768 x 3072] on an EPYC with AVX-512), while on
Intel CPUs MKL is usually the faster one. So at the first float32 inference product of each weight
shape, both are timed on that shape at a small and a large token count (`SMALL_TOKENS`, `LARGE_TOKENS`;
a fraction of a second per shape, bounded by `BUDGET_S`), the faster is kept for that shape and token
class, and the choice is cached beside the downloaded models (`ROBERTA_CACHE`, ~/.cache/roberta:
`kernels.json`), keyed by CPU model, instruction-set cap, thread count and PyTorch version, so other
processes on the same machine reuse it. A cache entry that does not parse, or was written for another
machine or by another format, is measured again and replaced, never trusted.

Candidates (all give the float32 product within float rounding of each other; the tests hold every
head to 1e-5 of the plain path):
- "mkl": `torch.nn.functional.linear`, the plain path;
- "onednn": oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`) on the weight as it is. It
  reorders the weight inside the call; measured here as fast as on a weight reordered once in advance
  (`_reorder_linear_weight`), which would double the weights' memory and go stale when a trainable
  model's weights change, so the plain weight is what runs.

Only inference takes this path (no autograd, float32, CPU, not being traced for export): training keeps
`F.linear` and its backward until a training step through oneDNN measures faster on a quiet machine
(`benchmarks/bench_train_gemm.py`; the one figure so far, 0.85x the time, was taken under heavy load).
`ROBERTA_KERNELS=default` (or `use("default")`, `roberta.load(..., kernels="default")`) turns the
measurement off: every product is `F.linear`, for runs that must repeat bit for bit across machines.
`ROBERTA_KERNELS=remeasure` times every shape again once in the process and replaces the cached choice
(a measurement taken while other work loaded the machine is kept until then; `roberta info --device`
with it re-measures base size's shapes).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import RobertaError

MODES = ("measure", "default", "remeasure")
ENV = "ROBERTA_KERNELS"
CACHE_FILE = "kernels.json"
FORMAT = 1  # of the cache file; another number is another format, measured again
SMALL_TOKENS, LARGE_TOKENS = 32, 768  # the two token counts timed; products up to SPLIT tokens use the first
SPLIT = 128
FLOP_CAP = 4e9  # products above this many FLOPs (a vocabulary's) are timed on fewer tokens, not under 2 * SPLIT
BUDGET_S = 0.25  # at most this long timing one candidate on one shape (after one warm-up call)

_mode: str | None = None  # set by use(); None: from the environment
_fp32: dict[tuple, str] = {}  # (threads, token class, out, in) -> kernel, this process's decisions
_remeasured: set[tuple] = set()  # with "remeasure": the records this process has measured afresh


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


FP32_KERNELS: dict[str, Callable] = {"mkl": F.linear, "onednn": _onednn}


def use(mode: str | None) -> None:
    """Set the process-wide mode: "measure" (choose by timing, once per machine), "remeasure" (time
    again in this process, replacing the cached choices: after a measurement taken on a busy machine)
    or "default" (always F.linear); None goes back to $ROBERTA_KERNELS (default "measure")."""
    global _mode
    if mode is not None and mode not in MODES:
        raise RobertaError(f"kernels {mode!r} is not one of {', '.join(MODES)}")
    _mode = mode


def mode() -> str:
    chosen = _mode or os.environ.get(ENV) or "measure"
    if chosen not in MODES:
        raise RobertaError(f"{ENV}={chosen!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return chosen


def machine() -> dict:
    """What a measurement holds for: the CPU, the instruction sets the libraries may use, threads, torch."""
    from .inference import cpu_name

    caps = {name: os.environ.get(name, "") for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                        "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")}  # CBWR: MKL's speed too
    isa = torch.backends.cpu.get_cpu_capability() + "".join(f" {k}={v}" for k, v in caps.items() if v)
    return {"cpu": cpu_name(), "isa": isa, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _key(m: dict) -> str:
    return f"{m['cpu']} | {m['isa']} | {m['threads']} threads | torch {m['torch']}"


def cache_path() -> Path | None:
    from .download import cache_dir

    try:
        return cache_dir() / CACHE_FILE
    except RobertaError:  # the cache setting points at a file: measure, keep the result in memory only
        return None


def _read_entry(m: dict) -> dict:
    """This machine's entry in the cache, or {} when there is none, or the file or entry is damaged."""
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    entry = data["entries"].get(_key(m))
    return entry if isinstance(entry, dict) and entry.get("machine") == m else {}


def _write_entry(m: dict, section: str, name: str, record: dict) -> None:
    """Add one record to this machine's entry, rewriting the file in one step (other entries kept)."""
    from .fileio import atomic_write

    path = cache_path()
    if path is None:
        return
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        data = {"format": FORMAT, "entries": {}}
    entry = data["entries"].get(_key(m))
    if not isinstance(entry, dict) or entry.get("machine") != m or not isinstance(entry.get(section), dict):
        entry = {**(entry if isinstance(entry, dict) and entry.get("machine") == m else {}), "machine": m, section: {}}
    entry[section][name] = record
    data["entries"][_key(m)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:  # a read-only cache: the choice holds for this process only
        pass


def cached(section: str, name: str, valid: Callable[[dict], bool], measure: Callable[[], dict]) -> dict:
    """The record `name` in `section` of this machine's cache entry when `valid` accepts it; otherwise
    `measure()`'s, written to the cache first."""
    m = machine()
    record = _read_entry(m).get(section, {})
    record = record.get(name) if isinstance(record, dict) else None
    fresh = mode() == "remeasure" and (section, name) not in _remeasured
    try:
        if isinstance(record, dict) and not fresh and valid(record):
            return record
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    record = measure()
    _remeasured.add((section, name))
    _write_entry(m, section, name, record)
    return record


def seconds(fn: Callable[[], object], budget: float = BUDGET_S) -> float:
    """The fastest of up to 10 calls within `budget` seconds (at least 2), after one warm-up call."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 2 or (calls < 10 and spent < budget):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best


def available_fp32() -> list[str]:
    """The float32 candidates this process can run: oneDNN only where PyTorch was built with it and a
    tiny product through it succeeds here."""
    names = ["mkl"]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        try:
            x, w = torch.ones(2, 16), torch.ones(8, 16)
            if torch.equal(_onednn(x, w, torch.zeros(8)), F.linear(x, w)):
                names.append("onednn")
        except RuntimeError:
            pass
    return names


def _valid_fp32(record: dict) -> bool:
    names = available_fp32()
    return all(record[c]["winner"] in names and isinstance(record[c]["gflops"], dict)
               and all(isinstance(v, float) and v > 0 for v in record[c]["gflops"].values())
               and record[c]["winner"] in record[c]["gflops"] for c in ("small", "large"))


def measure_fp32(out_features: int, in_features: int) -> dict:
    """Time every float32 candidate on [tokens, in] x [in, out] at both token counts: {"small": {"tokens",
    "winner", "gflops": {kernel: GFLOP/s}}, "large": {...}}."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g) * 0.02
    bias = torch.randn(out_features, generator=g)
    record = {}
    with torch.inference_mode():
        large = min(LARGE_TOKENS, max(2 * SPLIT, int(FLOP_CAP / (2 * in_features * out_features))))
        for name, tokens in (("small", SMALL_TOKENS), ("large", large)):
            x = torch.randn(tokens, in_features, generator=g)
            flops = 2.0 * tokens * in_features * out_features
            gflops = {k: flops / seconds(lambda: FP32_KERNELS[k](x, weight, bias)) / 1e9 for k in available_fp32()}
            record[name] = {"tokens": tokens, "winner": max(gflops, key=gflops.get), "gflops": gflops}
    return record


def fp32_choice(tokens: int, out_features: int, in_features: int) -> str:
    """The float32 kernel for a product of this shape here, measured (or read from the cache) once."""
    key = (torch.get_num_threads(), tokens > SPLIT, out_features, in_features)
    kernel = _fp32.get(key)
    if kernel is None:
        record = cached("fp32", f"{out_features}x{in_features}", _valid_fp32,
                        lambda: measure_fp32(out_features, in_features))
        for large in (False, True):
            _fp32[key[:1] + (large,) + key[2:]] = record["large" if large else "small"]["winner"]
        kernel = _fp32[key]
    return kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the kernel measured fastest for this shape in float32 CPU inference."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32 or x.numel() == 0
            or torch.is_grad_enabled() or not weight.is_contiguous() or mode() == "default"
            or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return F.linear(x, weight, bias)
    kernel = fp32_choice(x.numel() // x.shape[-1], *weight.shape)
    if kernel == "mkl":
        return F.linear(x, weight, bias)
    y = FP32_KERNELS[kernel](x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def encoder_shapes(hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, int]]:
    """(out, in) of an encoder layer's products: q, k and v together, the attention output, the FFN."""
    return [(3 * hidden, hidden), (hidden, hidden), (intermediate, hidden), (hidden, intermediate)]


def report(shapes: list[tuple[int, int]] | None = None) -> list[dict]:
    """This machine's choices (measured now where missing) for `shapes` (base size's by default), and
    the speeds `auto` was decided on when measured: rows for `roberta info --device`."""
    rows = []
    for out_features, in_features in shapes or encoder_shapes():
        fp32_choice(1, out_features, in_features)
        record = _read_entry(machine()).get("fp32", {}).get(f"{out_features}x{in_features}")
        for name in ("small", "large"):
            r = record[name] if record else {"tokens": None, "winner": _fp32.get(
                (torch.get_num_threads(), name == "large", out_features, in_features)), "gflops": {}}
            rows.append({"precision": "fp32", "shape": f"{out_features}x{in_features}", "tokens": r["tokens"],
                         "kernel": r["winner"], "gflops": r["gflops"]})
    for name, record in sorted((_read_entry(machine()).get("precision") or {}).items()):
        if isinstance(record, dict) and isinstance(record.get("gflops"), dict):
            rows.append({"precision": "auto", "shape": name, "tokens": record.get("shape", [None])[0],
                         "kernel": None, "gflops": record["gflops"]})
    return rows


def describe(row: dict) -> str:
    """One row of `report` in words."""
    speeds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["gflops"].items()))
    tokens = f"{row['tokens']} tokens" if row["tokens"] else "tokens not measured"
    if row["kernel"] is None:  # the speeds `auto` compared
        return f"auto  {row['shape']} at {tokens}, GFLOP/s: {speeds}"
    return f"{row['precision']:<5} {row['shape']:<12} at {tokens}: {row['kernel']}" + \
        (f" (GFLOP/s: {speeds})" if speeds else "")

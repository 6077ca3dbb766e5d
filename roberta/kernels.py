"""Which matrix-multiply library runs the dense layers on this CPU: chosen by measuring, not by vendor.

The same float32 product `[tokens, in] x [in, out]` runs at very different speeds through PyTorch's two
CPU GEMMs depending on the machine: `F.linear` calls MKL's sgemm, which on AMD CPUs takes a slower path
(218 GFLOP/s against oneDNN's 385 for [800 x 768] x [768 x 3072] on an EPYC with AVX-512), while on
Intel CPUs MKL is usually the faster one. So at the first float32 inference product of each weight
shape, every candidate below is timed on that shape at a small and a large token count (`SMALL_TOKENS`,
`LARGE_TOKENS`; a fraction of a second per shape, bounded by `BUDGET_S`), the fastest is kept for that
shape and token class, and the choice is cached beside the downloaded models (`ROBERTA_CACHE`, ~/.cache/roberta:
`kernels.json`), keyed by CPU model, instruction-set cap, thread count and PyTorch version, so other
processes on the same machine reuse it. A cache entry that does not parse, or was written for another
machine or by another format, is measured again and replaced, never trusted.

Candidates (all give the float32 product within float rounding of each other; the tests hold every
head to 1e-5 of the plain path):
- "mkl": `torch.nn.functional.linear`, the plain path;
- "onednn": oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`) on the weight as it is, which
  it reorders into its blocked layout inside every call;
- "onednn-packed" (`PACKED`): the same on a weight reordered once in advance (`_reorder_linear_weight`).
  On the AMD EPYC of benchmarks/RESULTS.md it measured 4-5% faster than "onednn" at 785 tokens and
  1.3-2x at 8-32 tokens, where the reorder is most of the call;
- "mkl-packed" (`MKL_PACKED`): MKL's packed sgemm, the weight laid out once by `cblas_sgemm_pack` and
  each product made by `cblas_sgemm_compute` (`MklPacked`; both exported by PyTorch's CPU library where
  it links MKL): the work sgemm does on the weight at every call, done once. On the Ice Lake Xeon of
  benchmarks/RESULTS.md, base size's passes with every weight so held ran 1.03-1.08x those on plain
  weights in batches of 32 and 1.18-1.24x one sentence at a time (oneDNN's reordered weights 0.98-1.07x
  and 1.01-1.21x; `benchmarks/bench_packing.py`).
The two packed candidates hold a second layout of the weight, so only a model prepared for inference
alone holds one (`inference.reduce_precision(..., inference_only=True)`, what the commands and the server
do), in place of the plain weight: a trainable model's weights change under the optimizer. Whether an
inference-only model's encoder weights are packed, and by which library, is decided by `packing` for all
of them together, from the same measurements.

Only inference takes this path (no autograd, float32, CPU, not being traced for export): training keeps
`F.linear` and its backward, as a training step through oneDNN measured no faster on a quiet machine
(`benchmarks/bench_train_gemm.py` on the AMD EPYC: 1.12x and 0.98x the step time of MKL's).
`ROBERTA_KERNELS=default` (or `use("default")`, `roberta.load(..., kernels="default")`) turns the
measurement off: every product is `F.linear`, for runs that must repeat bit for bit across machines.
`ROBERTA_KERNELS=remeasure` times every shape again once in the process and replaces the cached choice
(a measurement taken while other work loaded the machine is kept until then; `roberta info --device`
with it re-measures base size's shapes).

The same cache holds two more measured choices: whether bf16 inference runs attention through this
project's float32 kernel on the packed tokens, widened from bf16, or through PyTorch's bf16 attention on
the re-padded batch (`widen_bf16_attention`); and whether the FFN's GELU on a reordered weight runs in
oneDNN's matmul epilogue or as a pass of its own (`fuse_gelu`).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import runtime
from .errors import RobertaError

MODES = ("measure", "default", "remeasure")
ENV = "ROBERTA_KERNELS"
CACHE_FILE = "kernels.json"
FORMAT = 2  # of the cache file; another number is another format, measured again
SMALL_TOKENS, LARGE_TOKENS = 32, 768  # the two token counts timed; products up to SPLIT tokens use the first
SPLIT = 128
FLOP_CAP = 4e9  # products above this many FLOPs (a vocabulary's) are timed on fewer tokens, not under 2 * SPLIT
BUDGET_S = 0.25  # about this long timing each candidate on one shape (after one warm-up call; see `fastest`)

_mode: str | None = None  # set by use(); None: from the environment
_records: dict[tuple, dict] = {}  # (threads, out, in) -> the measurement this process decides by
_remeasured: set[tuple] = set()  # with "remeasure": the records this process has measured afresh


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


FP32_KERNELS: dict[str, Callable] = {"mkl": F.linear, "onednn": _onednn}  # on plain weights
PACKED, MKL_PACKED = "onednn-packed", "mkl-packed"  # on a weight laid out once (inference-only models)


def pack(weight: torch.Tensor, kernel: str = PACKED) -> "torch.Tensor | MklPacked":
    """`weight` [out, in] laid out once for `kernel`: reordered into oneDNN's blocked layout for `_onednn`
    (an opaque tensor), or packed by MKL (`MklPacked`, float32 only)."""
    if kernel == MKL_PACKED:
        return MklPacked(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


# CBLAS's enumerations (mkl_cblas.h): row-major, no transpose, transpose, a packed operand, matrix B
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED_OPERAND, _B_MATRIX = 101, 111, 112, 151, 162
# the rows MKL is told the packed weight will be multiplied with: its layout depends on them, though any
# row count multiplies correctly by it. On the Ice Lake Xeon of benchmarks/RESULTS.md, packed for 1 row
# the products ran at F.linear's speed, and for 768 rows short inputs ran slower than F.linear on the
# FFN's second layer; packed for 512, each base shape ran at 32, 128 and 800 rows at least about as fast
# as on oneDNN's reordered weight
PACK_ROWS = 512
_mkl_library: list = []  # [the ctypes library, or None]: looked up once a process


def _mkl() -> ctypes.CDLL | None:
    """PyTorch's CPU library where it links MKL and exports MKL's packed sgemm, with that API's argument
    types (32-bit integers: PyTorch links MKL's LP64 interface); None elsewhere (ARM, builds without MKL)."""
    if not _mkl_library:
        lib = None
        if torch.backends.mkl.is_available():
            folder = Path(torch.__file__).parent / "lib"
            for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
                try:
                    found = ctypes.CDLL(str(folder / name))
                    pack_size, pack_b, compute = (found.cblas_sgemm_pack_get_size, found.cblas_sgemm_pack,
                                                  found.cblas_sgemm_compute)
                except (OSError, AttributeError):
                    continue
                i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                pack_size.restype, pack_size.argtypes = ctypes.c_size_t, [i, i, i, i]
                pack_b.restype, pack_b.argtypes = None, [i, i, i, i, i, i, f, p, i, p]
                compute.restype, compute.argtypes = None, [i, i, i, i, i, i, p, i, p, i, f, p, i]
                lib = found
                break
        _mkl_library.append(lib)
    return _mkl_library[0]


class MklPacked:
    """A float32 weight W [out, in] packed once by MKL (`cblas_sgemm_pack`) for x W^T + b through
    `cblas_sgemm_compute`: what MKL's sgemm does to the weight at the start of every `F.linear` call,
    done once at load. The packed buffer is an anonymous mapping: MKL asks for more room than it writes
    (2.2-4.9x base size's weights, 1.7-3.3x large's, here) but writes about the weight's size, and pages
    never written never take memory. Read-only after packing, so threads may share it; pickles (and deep-copies) as
    the dense weight, packed again on the way in."""

    def __init__(self, weight: torch.Tensor):
        lib = _mkl()
        if lib is None:
            raise RobertaError("this PyTorch build does not export MKL's packed sgemm; use another kernel")
        w = weight.detach().float().contiguous()
        self.out_features, self.in_features = w.shape
        size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, PACK_ROWS, *w.shape)
        if not 0 < size <= 16 * 4 * w.numel() + (64 << 20):  # 2.2-4.9x base's weights, plus ~8 MB for any
            raise RobertaError(f"MKL asked for {size} bytes to pack a {tuple(w.shape)} weight; use another kernel")
        self._memory = mmap.mmap(-1, size)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, PACK_ROWS, self.out_features, self.in_features, 1.0,
                             w.data_ptr(), self.in_features, self._address)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] float32 -> x W^T + b [rows, out]: the bias written into the output first and added
        by the product (beta 1), as F.linear's sgemm adds it."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MKL's packed product takes float32 CPU rows of {self.in_features}, got "
                             f"{x.dtype} {x.device.type} {tuple(x.shape)}")  # never hand MKL memory it would misread
        x = x.contiguous()
        rows = x.shape[0]
        if bias is None:
            y = torch.empty(rows, self.out_features)
        else:
            y = torch.empty(rows, self.out_features).copy_(bias.expand(rows, self.out_features))
        if rows:
            _mkl().cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED_OPERAND, rows, self.out_features,
                                       self.in_features, x.data_ptr(), self.in_features, self._address,
                                       self.in_features, 0.0 if bias is None else 1.0, y.data_ptr(),
                                       self.out_features)
        return y

    def to_dense(self) -> torch.Tensor:
        """W [out, in] back, exactly: the identity times it (each product one weight times 1, plus zeros)."""
        return self.linear(torch.eye(self.in_features), None).t().contiguous()

    def __reduce__(self):
        return MklPacked, (self.to_dense(),)


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
    return {"cpu": cpu_name(), "isa": isa, "mkl_paths": runtime.mkl_paths(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _key(m: dict) -> str:
    return f"{m['cpu']} | {m['isa']} | MKL by {m['mkl_paths']} | {m['threads']} threads | torch {m['torch']}"


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


def fastest(calls: dict[str, Callable[[], object]], budget: float = BUDGET_S) -> dict[str, float]:
    """Seconds of each of `calls`: the fastest of up to 10 calls within `budget` seconds each (at least 2),
    after one warm-up call each. The calls take turns, so that a moment when other work loads the
    machine slows every candidate alike rather than the one timed then."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    spent, rounds = 0.0, 0
    while rounds < 2 or (rounds < 10 and spent < budget * len(calls)):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name], spent = min(best[name], elapsed), spent + elapsed
        rounds += 1
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


_packs: dict[str, bool] = {}  # whether oneDNN, MKL run a weight laid out once here: one probe per process


def packed_available() -> bool:
    """Whether this process's oneDNN runs float32 products on a reordered weight (`pack`), equal to F.linear
    on a tiny one."""
    if "float32" not in _packs:
        ok = "onednn" in available_fp32() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        if ok:
            try:
                x, w = torch.ones(2, 16), torch.ones(8, 16)
                ok = torch.equal(_onednn(x, pack(w), torch.zeros(8)), F.linear(x, w))
            except RuntimeError:
                ok = False
        _packs["float32"] = ok
    return _packs["float32"]


def mkl_packed_available() -> bool:
    """Whether this process runs float32 products through MKL's packed sgemm (`MklPacked`), equal to
    F.linear on a tiny one."""
    if "mkl" not in _packs:
        ok = _mkl() is not None
        if ok:
            x, w = torch.ones(2, 16), torch.ones(8, 16)
            try:
                ok = torch.equal(MklPacked(w).linear(x, torch.zeros(8)), F.linear(x, w))
            except (RobertaError, OSError, ValueError, OverflowError):  # a size no layout of this weight needs
                ok = False
        _packs["mkl"] = ok
    return _packs["mkl"]


def available_packed() -> list[str]:
    """The candidates on a weight laid out once that this process runs."""
    return [k for k, ok in ((PACKED, packed_available()), (MKL_PACKED, mkl_packed_available())) if ok]


def candidates(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every float32 candidate this process runs, each as x -> x W^T + b (the packed ones' weight laid
    out here, once)."""
    calls = {k: (lambda x, k=k: FP32_KERNELS[k](x, weight, bias)) for k in available_fp32()}
    for kernel in available_packed():
        calls[kernel] = lambda x, packed=pack(weight, kernel): packed_linear(x, packed, bias, False, False)
    return calls


def _valid_fp32(record: dict) -> bool:
    names = available_fp32() + available_packed()
    return all(record[c]["winner"] in available_fp32() and isinstance(record[c]["gflops"], dict)
               and set(record[c]["gflops"]) == set(names) and isinstance(record[c]["tokens"], int)
               and all(isinstance(v, float) and v > 0 for v in record[c]["gflops"].values())
               for c in ("small", "large"))


def measure_fp32(out_features: int, in_features: int) -> dict:
    """Time every float32 candidate on [tokens, in] x [in, out] at both token counts: {"small": {"tokens",
    "winner", "gflops": {kernel: GFLOP/s}}, "large": {...}}; "winner" is the fastest on a plain weight
    (what a trainable model runs), the packed ones' speeds are there for `packing`."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g) * 0.02
    bias = torch.randn(out_features, generator=g)
    record = {}
    with torch.inference_mode():
        calls = candidates(weight, bias)
        large = min(LARGE_TOKENS, max(2 * SPLIT, int(FLOP_CAP / (2 * in_features * out_features))))
        for name, tokens in (("small", SMALL_TOKENS), ("large", large)):
            x = torch.randn(tokens, in_features, generator=g)
            flops = 2.0 * tokens * in_features * out_features
            spent = fastest({k: (lambda c=call: c(x)) for k, call in calls.items()})
            gflops = {k: flops / t / 1e9 for k, t in spent.items()}
            plain = {k: v for k, v in gflops.items() if k in FP32_KERNELS}
            record[name] = {"tokens": tokens, "winner": max(plain, key=plain.get), "gflops": gflops}
    return record


def fp32_record(out_features: int, in_features: int) -> dict:
    """The measurement of this shape here (`measure_fp32`), taken or read from the cache once a process."""
    key = (torch.get_num_threads(), out_features, in_features)
    if key not in _records:
        _records[key] = cached("fp32", f"{out_features}x{in_features}", _valid_fp32,
                               lambda: measure_fp32(out_features, in_features))
    return _records[key]


def fp32_choice(tokens: int, out_features: int, in_features: int) -> str:
    """The float32 kernel for a product of this shape on a plain weight here, measured once."""
    return fp32_record(out_features, in_features)["large" if tokens > SPLIT else "small"]["winner"]


def packing(shapes: list[tuple[int, int]]) -> str | None:
    """The packed candidate (`PACKED`, `MKL_PACKED`) with which a model prepared for inference alone runs
    these (out, in) weights fastest, all of them, or None where each product on its plain winner is
    faster: the measured times of one product of each shape at both token counts, summed. Never with
    ROBERTA_KERNELS=default.

    One way for all the encoder's shapes, not each shape its own: with each shape on its own winner, the
    products of a pass alternated between MKL and oneDNN, and base size one sentence at a time on an Ice
    Lake Xeon ran slower so than with MKL's packing for all (1.06-1.19x plain weights' speed against
    1.18-1.24x in three runs of `benchmarks/bench_packing.py`, benchmarks/RESULTS.md), though the shapes'
    own timings favoured the mix; in batches of 32 the two were within 3% either way."""
    if mode() == "default" or not available_packed():
        return None
    seconds = dict.fromkeys([None, *available_packed()], 0.0)
    for out_features, in_features in shapes:
        for r in fp32_record(out_features, in_features).values():
            flops = 2.0 * r["tokens"] * out_features * in_features
            for kernel in seconds:
                seconds[kernel] += flops / r["gflops"][r["winner"] if kernel is None else kernel]
    return min(seconds, key=seconds.get)


def tracing() -> bool:
    """Whether the model is being traced, scripted, compiled or exported: then only PyTorch's own operations
    can run, not a call into a library the tracer cannot see."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling() or torch.compiler.is_exporting())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through the kernel measured fastest for this shape in float32 CPU inference."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32 or x.numel() == 0
            or torch.is_grad_enabled() or not weight.is_contiguous() or mode() == "default" or tracing()):
        return F.linear(x, weight, bias)
    kernel = fp32_choice(x.numel() // x.shape[-1], *weight.shape)
    if kernel == "mkl":
        return F.linear(x, weight, bias)
    y = FP32_KERNELS[kernel](x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


ATTENTION_BATCHES = ((32, 32), (4, 256))  # (sequences, tokens each): short inputs, and long ones


def measure_bf16_attention(heads: int, dim: int) -> dict:
    """Seconds of bf16 self-attention over ATTENTION_BATCHES both ways it can run on CPU: PyTorch's
    scaled_dot_product_attention in bf16 on the padded batch ("sdpa"), and this project's float32 kernel
    on the packed tokens, widened from bf16 and narrowed back ("widened")."""
    from . import model

    g = torch.Generator().manual_seed(0)
    times = {"sdpa": 0.0, "widened": 0.0}
    with torch.inference_mode():
        for batch, tokens in ATTENTION_BATCHES:
            qkv = torch.randn(batch * tokens, 3 * heads * dim, generator=g).bfloat16()
            cu = torch.arange(0, batch * tokens + 1, tokens)
            out = torch.empty(batch * tokens, heads * dim)
            q, k, v = qkv.view(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
            mask = torch.ones(batch, 1, 1, tokens, dtype=torch.bool)  # as a padded batch has one

            def widened():
                model._attend_cpu(qkv.float().numpy(), batch * tokens, cu.numpy(), batch, heads, dim, out.numpy(),
                                  torch.get_num_threads())
                return out.bfloat16()
            for way, t in fastest({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   "widened": widened}).items():
                times[way] += t
    return {"seconds": times, "winner": min(times, key=times.get)}


def widen_bf16_attention(heads: int, dim: int) -> bool:
    """Whether bf16 inference on this CPU runs attention faster through the float32 packed kernel than
    through PyTorch's bf16 attention (measured once per machine and head shape; cached). With
    ROBERTA_KERNELS=default: no, PyTorch's."""
    from . import model

    if mode() == "default" or model._attend_cpu is None or dim % 16:
        return False
    key = (torch.get_num_threads(), "bf16 attention", heads, dim)
    if key not in _records:
        _records[key] = cached("attention", f"bf16 {heads}x{dim}", lambda r: r["winner"] in ("sdpa", "widened")
                               and all(isinstance(v, float) and v > 0 for v in r["seconds"].values()),
                               lambda: measure_bf16_attention(heads, dim))
    return _records[key]["winner"] == "widened"


def packed_linear(x: torch.Tensor, packed: "torch.Tensor | MklPacked", bias: torch.Tensor | None, gelu: bool,
                  fused: bool) -> torch.Tensor:
    """x [rows, in] W^T + b on a weight laid out once (`pack`), then GELU when `gelu`: in oneDNN's epilogue
    when `fused` (oneDNN's layout only); after MKL's product, with the bias, in one pass of this project's
    (`inference.add_bias_gelu`); else by PyTorch in place over the result."""
    if isinstance(packed, MklPacked):
        if gelu and bias is not None:
            from .inference import add_bias_gelu

            return add_bias_gelu(packed.linear(x, None), bias)
        y = packed.linear(x, bias)
    elif gelu and fused:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
    else:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.aten.gelu_(y) if gelu else y


def measure_gelu_epilogue(dtype: torch.dtype, out_features: int, in_features: int) -> dict:
    """Seconds of x W^T + b then GELU on a reordered `dtype` weight [out, in] at both token counts, both
    ways (`packed_linear`): GELU in oneDNN's epilogue ("fused") or after it ("separate")."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    times = {"fused": 0.0, "separate": 0.0}
    with torch.inference_mode():
        packed = pack(weight)
        for tokens in (SMALL_TOKENS, LARGE_TOKENS):
            x = torch.randn(tokens, in_features, generator=g).to(dtype)
            for way, t in fastest({way: (lambda fused=way == "fused": packed_linear(x, packed, bias, True, fused))
                                   for way in times}).items():
                times[way] += t
    return {"seconds": times, "winner": min(times, key=times.get)}


def fuse_gelu(dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether the FFN's GELU runs in oneDNN's matmul epilogue on this CPU (one pass over the output) or
    after it. One pass over the output should win, but on an AVX2-only AMD EPYC (Zen 3) oneDNN's float32
    GELU epilogue added 28% to base size's [785 x 768] x [768 x 3072] product, and PyTorch's GELU pass 8%.
    Measured once per machine, dtype and shape; cached. With ROBERTA_KERNELS=default: in the epilogue."""
    if mode() == "default":
        return True
    name = str(dtype).removeprefix("torch.")
    key = (torch.get_num_threads(), "gelu", name, out_features, in_features)
    if key not in _records:
        _records[key] = cached("epilogue", f"{name} {out_features}x{in_features}",
                               lambda r: r["winner"] in ("fused", "separate")
                               and set(r["seconds"]) == {"fused", "separate"}
                               and all(isinstance(v, float) and v > 0 for v in r["seconds"].values()),
                               lambda: measure_gelu_epilogue(dtype, out_features, in_features))
    return _records[key]["winner"] == "fused"


def encoder_shapes(hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, int]]:
    """(out, in) of an encoder layer's products: q, k and v together, the attention output, the FFN."""
    return [(3 * hidden, hidden), (hidden, hidden), (intermediate, hidden), (hidden, intermediate)]


def report(shapes: list[tuple[int, int]] | None = None) -> list[dict]:
    """This machine's choices (measured now where missing) for `shapes` (base size's by default), and
    the speeds `auto` was decided on when measured: rows for `roberta info --device`."""
    rows = []
    if shapes is None:  # base size's, and how its FFN's GELU runs on a reordered weight
        shapes = encoder_shapes()
        if packing(shapes) == PACKED:
            fuse_gelu(torch.float32, *shapes[2])
    for out_features, in_features in shapes:
        record = fp32_record(out_features, in_features)
        for name in ("small", "large"):
            r = record[name]
            rows.append({"precision": "fp32", "shape": f"{out_features}x{in_features}", "tokens": r["tokens"],
                         "kernel": r["winner"], "gflops": r["gflops"]})
    if available_packed():  # what `packing` decides for them together
        rows.append({"precision": "fp32", "shape": ", ".join(f"{o}x{i}" for o, i in shapes), "tokens": None,
                     "gflops": {}, "inference_only": True, "kernel": packing(shapes) or "plain weights"})
    for section in ("attention", "epilogue"):  # `widen_bf16_attention`, `fuse_gelu`
        for name, record in sorted((_read_entry(machine()).get(section) or {}).items()):
            if isinstance(record, dict) and isinstance(record.get("seconds"), dict):
                rows.append({"precision": section, "shape": name, "tokens": None, "kernel": record.get("winner"),
                             "gflops": {}, "seconds": record["seconds"]})
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
    if row["precision"] in ("attention", "epilogue"):  # `widen_bf16_attention`, `fuse_gelu`
        spent = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(row["seconds"].items()))
        if row["precision"] == "epilogue":
            return f"gelu  {row['shape']:<12} on a reordered weight: {row['kernel']} ({spent})"
        return f"attn  {row['shape']} heads x dim: {row['kernel']} ({spent})"
    if row.get("inference_only"):  # what `packing` decided for the commands and the server
        return f"fp32  {row['shape']:<12} in inference-only models (commands, server): {row['kernel']}"
    return f"{row['precision']:<5} {row['shape']:<12} at {tokens}: {row['kernel']}" + \
        (f" (GFLOP/s: {speeds})" if speeds else "")

"""Fast inference over many inputs: length bucketing, padding-free batches, the precision to run in.

A batch padded to its longest member wastes work on every pad; the encoder already drops padding before
its dense layers (`model.Unpadded`), and sorting inputs by length makes the remaining waste (attention
on the re-padded batch) vanish too, since neighbours in sorted order have nearly equal lengths. Results
come back in the caller's order and equal the one-at-a-time results (float32: within float rounding).

Precision (`--precision`, `roberta.load(precision=...)`), measured by `benchmarks/bench_features.py`:
- "fp32": float32 throughout. On x86 CPUs (AVX2 with FMA, or AVX-512), attention runs in this project's
  C kernel on the packed tokens (within float rounding of PyTorch's: `model.packed_attention_available`),
  and each dense layer on the GEMM measured fastest here for its shape (`roberta.kernels`).
- "bf16": weights and activations in bfloat16 (LayerNorm, softmax and GELU accumulate in float32 inside
  PyTorch's kernels); on CPUs with bf16 units the dense layers run on oneDNN with weights reordered once
  at load and GELU fused into the matmul (`PackedLinear`). Several times faster where the hardware has
  bf16 units (AMX or AVX-512 BF16 on x86 CPUs, bf16-capable GPUs); on other CPUs PyTorch emulates it and
  it is *slower* than fp32.
- "int8": the encoder's Linear layers with int8 weights (one scale per output row) and activations
  quantised to int8 per token at run time (one scale per row), integer matmuls through oneDNN
  (VNNI/AMX), bias and scales applied in float32: CTranslate2's int8 scheme. CPU only.
- "auto" (the default for inference commands): what this machine runs fastest without a trap
  (`choose_precision`): bf16 where the CPU or GPU has bf16 units, else int8 on CPUs with AVX-512 VNNI,
  else fp32; on a CPU only where this process's libraries run it correctly (`runs_here`: a tiny product
  through the kernel, since an instruction-set cap such as ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN refuse
  bf16 whatever /proc/cpuinfo says, and int8 then runs with 7-bit weights, `int8_levels`, which auto
  leaves to an explicit "int8" as less accurate) and it measured faster than fp32 here (`measured_speeds`,
  cached with the kernel choices of `roberta.kernels`). Never one that is emulated, never slower than
  fp32; `hub.precision_reason` says why.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RobertaError, RobertaWarning
from .model import Unpadded

try:  # the int8 encoder's element-wise steps in C (setup.py); PyTorch does the same without them
    from . import _kernels
except ImportError:
    _kernels = None

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of x86 bf16 units
INT8_FLAGS = ("avx512_vnni",)  # int8 dot products the benchmark measured int8 faster than fp32 on


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo); elsewhere what PyTorch detected."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return frozenset({"AVX512": {"avx512f"}, "AVX2": {"avx2"}}.get(capability, set()))


def cpu_name() -> str:
    """The CPU's model name, as figures are recorded beside it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def choose_precision(device_type: str, flags: Iterable[str] = (), gpu_bf16: bool = False,
                     runs: Iterable[str] = ("bf16", "int8"), gflops: dict | None = None,
                     int8_full: bool = True) -> tuple[str, str]:
    """What "auto" means on a device: (precision, the reason in words).

    `flags`: the CPU's feature flags (`cpu_flags()`); `gpu_bf16`: whether the GPU has bf16 units;
    `runs`: the reduced precisions this process's libraries ran a product in (`runs_here`: oneDNN may be
    capped below what the CPU has); `gflops`: GFLOP/s measured here per precision (`measured_speeds`);
    `int8_full`: whether int8 runs with full-range weights here (`int8_levels`), i.e. on the VNNI or AMX
    units rather than AVX2's saturating multiply-add.
    On a CPU, bf16 (the more accurate) is preferred, then int8, where the CPU has the units, the libraries
    run it on them, and, when measured, it is faster than fp32; fp32 otherwise. Never an emulated
    precision, and never int8 on 7-bit weights (less accurate: asked for with --precision int8 only).
    """
    if device_type == "cuda":
        if gpu_bf16:
            return "bf16", "the GPU has bf16 units"
        return "fp32", "the GPU has no bf16 units (int8 runs on CPUs only)"
    flags, runs = set(flags), set(runs)
    units = {"bf16": sorted(flags.intersection(BF16_FLAGS)), "int8": sorted(flags.intersection(INT8_FLAGS))}
    notes = []
    for precision in ("bf16", "int8"):
        if not units[precision]:
            continue
        has = f"the CPU has {precision} units ({', '.join(units[precision])})"
        if precision not in runs:
            notes.append(f"{has} but this process's oneDNN does not run it correctly (an instruction-set cap?)")
        elif precision == "int8" and not int8_full:
            notes.append(f"{has} but this process's oneDNN runs int8 without them, only on 7-bit weights (an "
                         f"instruction-set cap?): --precision int8 asks for that")
        elif gflops and not gflops.get(precision, 0) > gflops.get("fp32", float("inf")):
            notes.append(f"{precision} measured {gflops.get(precision, 0):.0f} GFLOP/s, not faster than fp32's "
                         f"{gflops['fp32']:.0f}")
        else:
            measured = f", measured {gflops[precision]:.0f} GFLOP/s against fp32's {gflops['fp32']:.0f}" \
                if gflops else ""
            return precision, "; ".join(notes + [has + measured])
    return "fp32", "; ".join(notes) or "the CPU has neither bf16 units nor AVX-512 VNNI"


def int8_levels() -> int:
    """127 where oneDNN's int8 matmul sums exactly with full-range weights here (VNNI, AMX), else 63
    (`Int8Linear`); probed once on a product that saturates 16-bit pair sums."""
    global _levels
    if _levels is None:
        _levels = 127
        try:
            g = torch.Generator().manual_seed(0)
            weight, x = torch.randn(16, 64, generator=g), torch.randn(4, 64, generator=g)
            layer = Int8Linear(weight, torch.zeros(16), levels=127)
            with torch.inference_mode():
                y, plain = layer(x), layer.forward_reference(x)
            _levels = 127 if (y - plain).abs().max().item() <= 1e-4 * plain.abs().max().item() else 63
        except (RuntimeError, AttributeError):  # no int8 ops: runs_here leaves int8 out anyway
            pass
    return _levels


_levels: int | None = None
_unpacks_exactly: dict[tuple, bool] = {}  # (out, in, levels, capability) -> Int8Linear's check of oneDNN's reorder


def runs_here() -> frozenset[str]:
    """The reduced precisions whose CPU kernels run correctly in this process: a tiny product through
    each, held to the plain arithmetic it stands for (`forward_reference`). oneDNN refuses bf16 when
    capped below AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2), whatever the CPU has; int8 there runs with 7-bit
    weights (`int8_levels`), which its AVX2 kernel sums exactly."""
    global _runs
    if _runs is None:
        g = torch.Generator().manual_seed(0)
        weight, bias, x = torch.randn(16, 64, generator=g), torch.randn(16, generator=g), torch.randn(4, 64, generator=g)
        found = set()
        for precision, make, cast in (("bf16", PackedLinear, torch.bfloat16), ("int8", Int8Linear, torch.float32)):
            try:
                with torch.inference_mode():
                    layer, xc = make(weight, bias), x.to(cast)
                    y, plain = layer(xc).float(), layer.forward_reference(xc).float()
                if (y - plain).abs().max().item() <= 0.01 * plain.abs().max().item():
                    found.add(precision)
            except (RuntimeError, AttributeError):  # refused by oneDNN, or a build without its ops
                pass
        _runs = frozenset(found)
    return _runs


_runs: frozenset[str] | None = None
SPEED_SHAPE = (768, 3072, 768)  # tokens, out, in: base size's FFN on a batch, where most of the time goes


def measured_speeds(precisions: Iterable[str]) -> dict[str, float]:
    """GFLOP/s of one [tokens, in] x [in, out] product (SPEED_SHAPE) in fp32 (its fastest kernel here) and
    in each of `precisions` through the kernels that would run them; measured once per machine and
    cached with the kernel choices (`roberta.kernels`)."""
    from . import kernels

    precisions = sorted(set(precisions) - {"fp32"})
    tokens, out_features, in_features = SPEED_SHAPE

    def measure() -> dict:
        g = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(out_features, in_features, generator=g) * 0.02, torch.randn(out_features, generator=g)
        x = torch.randn(tokens, in_features, generator=g)
        flops = 2.0 * tokens * out_features * in_features
        calls = {f"fp32 {k}": (lambda call=call: call(x)) for k, call in kernels.candidates(weight, bias).items()}
        if "bf16" in precisions:
            packed, xb = PackedLinear(weight, bias), x.bfloat16()
            calls["bf16"] = lambda: packed(xb)
        if "int8" in precisions:
            int8 = Int8Linear(weight, bias)
            calls["int8"] = lambda: int8(x)
        with torch.inference_mode():
            speeds = {name: flops / t / 1e9 for name, t in kernels.fastest(calls).items()}
        speeds["fp32"] = max(v for k, v in speeds.items() if k.startswith("fp32 "))
        return {"shape": list(SPEED_SHAPE), "gflops": speeds}

    def valid(record: dict) -> bool:
        return (record["shape"] == list(SPEED_SHAPE) and all(p in record["gflops"] for p in precisions + ["fp32"])
                and all(isinstance(v, float) and v > 0 for v in record["gflops"].values()))

    name = "x".join(map(str, SPEED_SHAPE)) + " " + "+".join(precisions or ["fp32"])
    return kernels.cached("precision", name, valid, measure)["gflops"]


def resolve_precision(precision: str, device: torch.device | str = "cpu",
                      flags: Iterable[str] | None = None) -> tuple[str, str]:
    """A user's precision for a device: (precision, why). "auto" is decided here, from the CPU's units,
    what this process's libraries run (`runs_here`) and, for this machine's CPU, what measures faster
    than fp32 here (`measured_speeds`; not with ROBERTA_KERNELS=default). An explicit bf16 on a CPU
    without bf16 units is kept, with a warning that it is emulated there and slower than fp32.
    `flags`: the CPU's feature flags, this machine's (`cpu_flags()`) by default; given, nothing is
    measured (this machine's speeds say nothing about another CPU)."""
    from . import kernels

    if precision not in PRECISIONS:
        raise RobertaError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    measure = flags is None and kernels.mode() != "default"
    flags = cpu_flags() if flags is None else frozenset(flags)
    if precision == "auto":
        if device.type == "cuda":
            return choose_precision("cuda", (), torch.cuda.is_bf16_supported(including_emulation=False))
        runs = runs_here()
        units = [p for p, names in (("bf16", BF16_FLAGS), ("int8", INT8_FLAGS)) if flags.intersection(names)]
        full = "int8" not in units or "int8" not in runs or int8_levels() == 127
        candidates = set(units) & runs - (set() if full else {"int8"})
        gflops = measured_speeds(candidates) if measure and candidates else None
        return choose_precision("cpu", flags, False, runs, gflops, full)
    if precision == "int8" and device.type != "cpu":
        raise RobertaError("int8 runs on CPU only; use --device cpu, or bf16/fp32 on the GPU")
    if precision == "int8" and "int8" not in runs_here():
        raise RobertaError("int8 does not run correctly in this process (PyTorch's oneDNN lacks its int8 "
                           "ops); use --precision fp32 or auto")
    if precision == "bf16" and device.type == "cpu" and not (flags.intersection(BF16_FLAGS) and "bf16" in runs_here()):
        warnings.warn("bf16 asked for, but this CPU has no bf16 units (AMX or AVX-512 BF16) that this process's "
                      "oneDNN runs: PyTorch emulates it, several times slower than fp32; use --precision auto or "
                      "fp32", RobertaWarning, stacklevel=2)
    return precision, "asked for"


def reduce_precision(model: nn.Module, precision: str, inference_only: bool = False) -> nn.Module:
    """Convert `model` in place for inference in "fp32", "bf16", "int8" or "auto" (decided by
    `resolve_precision` for the model's device); returns it, in eval mode.

    bf16 and int8 models are for inference only: their encoder's weights are prepared once here for the
    kernels that run them (q, k and v as one projection; on CPU, reordered into oneDNN's blocked layouts,
    with GELU in the matmul's epilogue where that measured faster), so they cannot be trained or saved.
    An fp32 model stays as it is (trainable, savable) unless `inference_only`: then its encoder is prepared
    once in float32, the same weights replaced, not copied: q, k and v concatenated (a trainable model
    concatenates them at every call, 3 H^2 floats per layer, about 1% of a base forward pass on CPU), and
    on CPU all laid out once for oneDNN or for MKL where `kernels.packing` measured that faster here
    (never with ROBERTA_KERNELS=default). The commands and the server load with `inference_only`.
    """
    return prepare(model, resolve_precision(precision, next(model.parameters()).device)[0], inference_only)


def prepare(model: nn.Module, precision: str, inference_only: bool = False) -> nn.Module:
    """`reduce_precision` for a precision `resolve_precision` gave for the model's device."""
    from . import kernels

    device = next(model.parameters()).device
    model.eval()
    if precision == "fp32" and inference_only and standard_fp32(model):
        config = model.encoder_model.config  # one layout for every weight: see `kernels.packing`
        kernel = kernels.packing(kernels.encoder_shapes(config.hidden_size, config.intermediate_size)) \
            if device.type == "cpu" else None
        _prepare_encoder(model, lambda weight, bias, gelu=False: PackedLinear(weight, bias, gelu, torch.float32, kernel)
                         if kernel else PlainLinear(weight, bias, gelu))
    if precision == "bf16":
        model.to(torch.bfloat16)
        if device.type == "cpu" and packed_bf16_available():
            _prepare_encoder(model, PackedLinear)
        else:  # a GPU (cuBLAS needs no reordering) or a CPU emulating bf16: q, k and v still concatenated once
            _prepare_encoder(model, lambda weight, bias, gelu=False: _linear(weight, bias), keep_dense=True)
    elif precision == "int8":
        if not int8_kernels_available():
            raise RobertaError("int8 needs PyTorch's oneDNN (mkldnn) kernels, which this build lacks; use fp32")
        _prepare_encoder(model, Int8Linear)
        for layer in model.encoder_model.encoder.layer:  # the FFN's hidden rows leave its first layer quantised
            layer.intermediate.quantized_output = isinstance(layer.output.dense, Int8Linear)
    if device.type == "cpu":
        trim_heap()  # what preparing freed (a copy of the encoder's weights, as floats, in int8) goes back
        keep_freed_memory()  # from here on, for the batches
    return model


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts: bigger allocations always get their own mmap()
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap before glibc hands it back


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory freed by one batch for the next, instead of returning it to the
    kernel; returns whether it could (glibc only; elsewhere nothing changes).

    By default glibc returns the free top of its heap once it exceeds twice the largest recent block,
    and serves blocks above a moving threshold with fresh mmap()s. Either way each batch's activations
    (a few MB per matmul output) come back as new pages, each a page fault on first touch: 80-195
    thousand per pass of `benchmarks/bench_features.py` in fp32 (about 4% of its time), none after this.
    The cost is that up to TRIM_THRESHOLD of freed memory stays with the process. Process-wide, so
    `reduce_precision` calls it once a model is prepared for inference on CPU; blocks above 32 MiB
    (activations of batches over ~2,700 tokens in the FFN of base) still map and fault as before.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # 1 when accepted
        trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return bool(mapped and trimmed)
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Hand the free memory of glibc's heap back to the kernel now (malloc_trim); returns whether it did
    (glibc only). Preparing a model frees temporaries the size of its weights (int8: the float32 weights
    quantised layer by layer), which glibc would otherwise keep: base in int8 ran at 1.0 GB resident
    with them, 0.75 GB without (AMD EPYC Zen 3, 2026-12-07)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def prepared(model: nn.Module) -> bool:
    """Whether `reduce_precision` replaced weights of `model` by ones prepared for inference kernels."""
    return any(isinstance(m, (PackedLinear, PlainLinear, Int8Linear)) for m in model.modules())


def standard_fp32(model: nn.Module) -> bool:
    """Whether `model`'s encoder is float32 in the standard layout (q, k and v apart, at least one layer):
    what `prepare` turns into an inference-only fp32 model."""
    layers = model.encoder_model.encoder.layer
    return len(layers) > 0 and hasattr(layers[0].attention.self, "query") and \
        layers[0].attention.self.query.weight.dtype == torch.float32


def _prepare_encoder(model: nn.Module, make, keep_dense: bool = False) -> None:
    """Every encoder layer's projections replaced by `make(weight, bias, gelu=...)`: q, k and v by one
    module on their concatenated weights, the FFN's first layer and its GELU by one (unless `keep_dense`:
    then only its Linear is replaced and RobertaIntermediate still applies the GELU). The pages of the
    weights replaced are handed back layer by layer (`release_pages`)."""
    for layer in model.encoder_model.encoder.layer:
        attention = layer.attention.self
        old = [p.detach() for p in layer.parameters()]
        attention.qkv = make(*attention.fused_qkv())
        del attention.query, attention.key, attention.value
        for parent in (layer.attention.output, layer.output):
            parent.dense = make(parent.dense.weight, parent.dense.bias)
        dense = layer.intermediate.dense
        if keep_dense:
            layer.intermediate.dense = make(dense.weight, dense.bias)
        else:
            layer.intermediate = make(dense.weight, dense.bias, gelu=True)
        kept = [_span(t) for t in (*layer.parameters(), *layer.buffers()) if t.layout == torch.strided]
        release_pages([t for t in old if not any(a < _span(t)[1] and _span(t)[0] < b for a, b in kept)])


_MADV_PAGEOUT = 21  # madvise() advice, from Linux's mman-common.h (Linux 5.4 and later)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to reclaim the whole pages under `tensors` now (madvise MADV_PAGEOUT), for weights
    a prepared model no longer reads; returns the bytes advised (0 off Linux or where refused).

    A model read from safetensors holds the file mapped, one mapping for all its tensors, so replacing
    some of them frees nothing: their pages stay resident until memory runs short (a base fp32 model
    prepared for inference alone kept 85 MB of q, k and v beside their concatenation, and one with its
    encoder reordered for oneDNN peaked at 1.2 GB). Only pages of a mapped file are advised: memory of
    the heap is freed with its tensors anyway, and paging it out first would only write it to swap. The
    advice moves pages out, never changes what they hold: a clean page of the file is dropped and read
    again from the file if ever touched, a changed one is swapped or left in place, so a tensor still
    held elsewhere reads the same values.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    files = _mapped_files()
    spans = []
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            continue
        start, end = _span(t)
        start, end = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages only: neighbours are live
        if end > start and any(a <= start and end <= b for a, b in files):
            spans.append((start, end - start))
    if not spans:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    return sum(length for start, length in spans if madvise(start, length, _MADV_PAGEOUT) == 0)


def _mapped_files() -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's mappings of files (/proc/self/maps lines with an
    inode; adjacent ones joined), or none where that cannot be read."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0":
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if ranges and ranges[-1][1] == start:  # one file mapped in parts: one range
                        ranges[-1] = (ranges[-1][0], end)
                    else:
                        ranges.append((start, end))
    except (OSError, ValueError):
        return []
    return ranges


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses [start, end) of a contiguous tensor's elements."""
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def packed_bf16_available() -> bool:
    """oneDNN's bf16 linear on reordered weights, where the CPU has bf16 units and oneDNN runs it here."""
    return bool(cpu_flags().intersection(BF16_FLAGS)) and "bf16" in runs_here()


class PackedLinear(nn.Module):
    """y = x W^T + b, then GELU when `gelu`, with W laid out once for the library that multiplies it:
    oneDNN (`kernels.PACKED`, the default) with W reordered into the blocked layout its kernels read, and
    the GELU applied in the matmul's epilogue (one pass over the output instead of two) where
    `kernels.fuse_gelu` measured that faster here, else after it; or MKL's packed sgemm
    (`kernels.MKL_PACKED`, float32 only), GELU after it. In bfloat16 (the default) for AMX / AVX-512
    BF16; in float32 for inference-only fp32 models, with the library `kernels.packing` measured fastest.
    Measured by `benchmarks/bench_features.py` against the plain path; `forward_reference` is that plain
    path, for the tests.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False,
                 dtype: torch.dtype = torch.bfloat16, kernel: str | None = None):
        from . import kernels

        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.gelu = gelu
        self.kernel = kernel or kernels.PACKED
        if self.kernel == kernels.MKL_PACKED and dtype != torch.float32:
            raise ValueError("MKL's packed sgemm multiplies float32 only")
        self.fused = gelu and self.kernel == kernels.PACKED and kernels.fuse_gelu(dtype, self.out_features,
                                                                                    self.in_features)
        self.register_buffer("bias", bias.detach().to(dtype).clone())
        self.packed = kernels.pack(weight.to(dtype), self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels

        y = kernels.packed_linear(x.reshape(-1, self.in_features), self.packed, self.bias, self.gelu, self.fused)
        return y.view(*x.shape[:-1], self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.packed.to_dense(), self.bias)
        return F.gelu(y) if self.gelu else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"{'bf16' if self.bias.dtype == torch.bfloat16 else 'fp32'} {self.kernel}" + \
            (f" + GELU ({'in the epilogue' if self.fused else 'after it'})" if self.gelu else "")


class PlainLinear(nn.Module):
    """y = x W^T + b, then GELU when `gelu`, on a plain float32 weight through the GEMM measured fastest
    for its shape (`kernels.linear`; F.linear with ROBERTA_KERNELS=default or off the CPU): the shapes of
    an inference-only fp32 model that packing did not speed up here, q, k and v concatenated once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.gelu = gelu
        self.register_buffer("weight", weight.detach())  # the model's own (inference only: never changes)
        self.register_buffer("bias", bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels

        y = kernels.linear(x, self.weight, self.bias)
        return torch.ops.aten.gelu_(y) if self.gelu else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32" + (" + GELU" if self.gelu else "")


def int8_kernels_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, stored with an offset of 128 as uint8 (the u8 x s8 form VNNI and AMX
    multiply natively): (q [N, K] uint8, m [N, 1] float32) with x ~ (q - 128) * m / 127, m the largest
    magnitude in the row (the 1/127 is left to the caller, which folds it into other scales).

    x * 127 / m + 128.5 lies in [1.5, 255.5], so truncating it to uint8 rounds to the nearest integer
    (halves up) and adds the offset at once. `roberta._kernels` does it in one pass over a float32 x;
    `quantize_rows_reference` is the same arithmetic in PyTorch, and the fallback without the kernels.
    """
    if _kernels is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return quantize_rows_reference(x)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8)
    m = torch.empty(x.shape[0], 1)
    _kernels.quantize_rows(x.detach().numpy(), x.shape[0], x.shape[1], q.numpy(), m.numpy(), torch.get_num_threads())
    return q, m


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.abs().amax(-1, keepdim=True).clamp_min_(1e-30)
    return (x * (127.0 / m)).add_(128.5).to(torch.uint8), m


def scale_rows(y: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """bias + y * m, with y [N, n] float32 scaled per row by m [N, 1], in place, then GELU when `gelu`:
    in one pass where `roberta._kernels` is built (the scaling the same two roundings as PyTorch's, to
    the bit; its GELU within 5e-7 of the exact function, PyTorch's within 1.2e-6), else in PyTorch's two
    or three passes."""
    if _kernels is None or not y.is_contiguous() or y.dim() != 2:
        y = y.mul_(m).add_(bias)
        return torch.ops.aten.gelu_(y) if gelu else y
    _kernels.scale_rows(y.detach().numpy(), y.shape[0], y.shape[1], m.detach().numpy(), bias.detach().numpy(), gelu,
                        torch.get_num_threads())
    return y


def add_bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(y + bias), y [N, n] float32 in place: one C pass where `roberta._kernels` is built (`scale_rows`
    with unit scales: y * 1 is y, exactly), else PyTorch's two. For a product made without its bias
    (`kernels.MklPacked`), where writing the bias into the output first and a GELU pass after would be two."""
    if _kernels is None or not y.is_contiguous() or y.dim() != 2:
        return torch.ops.aten.gelu_(y.add_(bias))
    return scale_rows(y, torch.ones(y.shape[0], 1), bias, True)


def scale_rows_quantized(y: torch.Tensor, m: torch.Tensor, bias: torch.Tensor, gelu: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(scale_rows(y, m, bias, gelu))`, the same bits, in one pass over the rows where
    `roberta._kernels` is built: each row quantised while it is still in cache (`y` is overwritten)."""
    if _kernels is None or not y.is_contiguous() or y.dim() != 2:
        return quantize_rows(scale_rows(y, m, bias, gelu))
    q, q_m = torch.empty(y.shape, dtype=torch.uint8), torch.empty(y.shape[0], 1)
    _kernels.scale_rows(y.detach().numpy(), y.shape[0], y.shape[1], m.detach().numpy(), bias.detach().numpy(), gelu,
                        torch.get_num_threads(), q.numpy(), q_m.numpy())
    return q, q_m


class QuantizedRows(NamedTuple):
    """An activation already quantised per row (`quantize_rows`: q uint8 [N, K], m [N, 1]) for the next
    `Int8Linear`, with the shape it stands for: what the int8 FFN's first layer hands its second."""
    q: torch.Tensor
    m: torch.Tensor
    shape: tuple[int, ...]


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (a scale per output row) and x quantised per token at run time.

    The integer matmul accumulates exactly in int32; the result is scaled back per row and per column
    and the float32 bias added. oneDNN's prepacked kernel (`onednn.qlinear_pointwise`, VNNI or AMX) does
    the matmul and the weight scales; `forward_reference` is the same arithmetic in plain PyTorch, which
    the tests hold the kernel to.

    `levels`: the weights' largest integer, 127, or 63 where oneDNN runs without VNNI (AVX2): there its
    u8 x s8 multiply-add sums pairs of products in saturating 16-bit integers, and 2 x 255 x 63 is the
    largest pair that fits (FBGEMM's "reduce_range"). Default: `int8_levels()`, what runs exactly here.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False, levels: int | None = None):
        super().__init__()
        self.gelu = gelu  # the FFN's first layer: GELU on the float32 result
        levels = levels or int8_levels()
        q, m = quantize_rows(weight.detach().float())
        if levels == 127:  # q - 128 as int8: the offset's bit flipped (uint8 u and int8 u - 128 differ only there)
            q = q.view(torch.int8).bitwise_xor_(-128)
        else:  # W ~ q * m / levels, rounded to the nearest of fewer levels
            q = torch.round(weight.detach().float() * (levels / m)).to(torch.int8)
        # W ~ weight * m / levels and x ~ (q - 128) * m_x / 127: both divisors go into the weight's scales
        self.register_buffer("weight_scale", m.squeeze(1) / (levels * 127))
        self.register_buffer("bias", bias.detach().float().clone())
        self.out_features, self.in_features = q.shape
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)  # reordered once for oneDNN
        # the integer weights are read back from the packed ones when asked for (`weight`), not kept twice
        # (a model's size in int8 again); kept only where oneDNN's reorder would not give them back exactly.
        # The reorder depends on the shape, not the values: checked on the first weight of each shape.
        shape = (self.out_features, self.in_features, levels, torch.backends.cpu.get_cpu_capability())
        if shape not in _unpacks_exactly:
            _unpacks_exactly[shape] = torch.equal(self.packed.to_dense().t(), q)
        self._plain = None if _unpacks_exactly[shape] else q
        self._zeros = torch.zeros(self.out_features, dtype=torch.int32)
        self.quantized_output = False  # hand on QuantizedRows, for an Int8Linear next (set by `prepare`)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weights [out, in], as quantised."""
        return self._plain if self._plain is not None else self.packed.to_dense().t()

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor | QuantizedRows:
        if isinstance(x, QuantizedRows):  # quantised already, by the layer before, while its rows were in cache
            (q, m), lead = x[:2], x.shape[:-1]
        else:
            (q, m), lead = quantize_rows(x.reshape(-1, self.in_features).float()), x.shape[:-1]
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.packed, self.weight_scale, self._zeros, None,
                                                 1.0, 0, torch.float32, "none", [], "")
        if self.quantized_output:
            return QuantizedRows(*scale_rows_quantized(y, m, self.bias, self.gelu), (*lead, self.out_features))
        return scale_rows(y, m, self.bias, self.gelu).view(*lead, self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        q, m = quantize_rows_reference(x.reshape(-1, self.in_features).float())
        y = ((q.int() - 128) @ self.weight.int().t()).float() * self.weight_scale  # exact int32 sums
        y = y * m + self.bias
        return (F.gelu(y) if self.gelu else y).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel x per-token" + \
            (" + GELU" if self.gelu else "")


def length_batches(lengths: Sequence[int], batch_tokens: int | None = None, *, batch_size: int | None = None,
                   rng=None) -> list[list[int]]:
    """Indices grouped by similar length, in batches of at most `batch_tokens` tokens once padded
    (inference) or of `batch_size` sequences (fine-tuning, which counts rows as fairseq does).

    With `rng`, a numpy Generator (training), ties between equal lengths are broken at random and the batch order is
    shuffled, all drawn from `rng` alone, so that a seeded generator gives the same batches again on
    resume; without it the batches come shortest first in a fixed order.
    """
    if (batch_tokens is None) == (batch_size is None):
        raise ValueError("give one of batch_tokens and batch_size")
    limit, name = (batch_tokens, "batch_tokens") if batch_size is None else (batch_size, "batch_size")
    if limit < 1:
        raise RobertaError(f"{name} must be positive, got {limit}")
    ties = rng.permutation(len(lengths)).tolist() if rng is not None else range(len(lengths))
    order = sorted(ties, key=lambda i: lengths[i])  # stable: equal lengths keep the order of `ties`
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # ascending order: the newcomer is the longest, so the padded size is (count + 1) * its length
        size = len(current) + 1 if batch_size is not None else (len(current) + 1) * lengths[i]
        if current and size > limit:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and the attention mask (1 for tokens), on the host: the layout is made
    from the mask there (`RobertaModel.layout(mask, device)`) and the ids sent to a GPU without waiting."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.inference_mode()
def extract_features_batched(model: nn.Module, sequences: Sequence[Sequence[int]], batch_tokens: int = 4096,
                             progress: bool = False) -> list[torch.Tensor]:
    """Last-layer features, one float32 [length, hidden] tensor per sequence of token ids, in input order.

    `model` is any of this project's models (its encoder is used), in any precision `reduce_precision`
    makes. Sequences are sorted by length and batched under `batch_tokens` padded tokens.
    """
    if not sequences:
        return []
    if any(len(s) == 0 for s in sequences):
        raise RobertaError("an input sequence is empty; every input needs at least one token (<s> ... </s>)")
    encoder = model.encoder_model
    device = encoder.embeddings.word_embeddings.weight.device
    lengths = [len(s) for s in sequences]
    features: list[torch.Tensor | None] = [None] * len(sequences)
    batches = length_batches(lengths, batch_tokens)
    if progress:  # tqdm imported only here: the rest runs with nothing but torch (benchmarks/gpu_check.py)
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch")
    for batch in batches:
        ids, mask = pad_batch([sequences[i] for i in batch], encoder.config.pad_token_id)
        layout = Unpadded(mask, device)  # on the host, so the forward pass never waits on the device
        x, _ = encoder.forward_unpadded(ids.to(device, non_blocking=True), layout=layout)  # [real tokens, H]
        for i, f in zip(batch, x.float().split([lengths[i] for i in batch])):
            features[i] = f
    return features  # type: ignore[return-value]

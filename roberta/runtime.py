"""Settings for PyTorch's CPU runtime that must be made before torch is first imported.

Two defaults, each kept when the user's environment already sets it:

- `OMP_WAIT_POLICY=PASSIVE`. PyTorch's CPU kernels split work over OpenMP threads, and GNU OpenMP's
  default has a thread that finishes its share spin for up to ~300,000 iterations waiting for the
  others. On a machine where another process holds a core (a laptop, a shared server, a CI box), the
  thread sharing that core is descheduled for whole time slices while the spinning one burns the
  core it needs: a small fine-tune measured 20-180 times slower than with one thread. Passive waiting
  puts waiting threads to sleep at once (`benchmarks/bench_contention.py` measures both, busy and idle).
- `MKL_CBWR=AUTO,STRICT`. MKL's conditional numerical reproducibility: its float32 matrix products
  give the same bits whatever the buffers' alignment (and thread count), so that a resumed training
  run or streaming job computes what an uninterrupted one does. Without it two identical products in
  one process can differ in the last bit when their buffers are aligned differently.

And one more, of MKL's code path: MKL chooses its kernels by the CPU's instruction sets only on Intel's
CPUs, and takes a generic path on any other vendor's. `import roberta` loads `roberta._mkl_paths`
(csrc/mkl_paths.c) into the global symbol scope before torch, and MKL then chooses by instruction set
on every CPU: on an AVX2-only AMD EPYC a float32 product of 32 tokens ran about 1.6x faster, and which
library runs each product is still measured (`roberta.kernels`). `ROBERTA_MKL_PATHS=vendor` keeps
MKL's own choice. The instruction-set cap `MKL_ENABLE_INSTRUCTIONS` is honoured either way.

`import roberta` applies them when torch is not imported yet (the `roberta` command always does);
`configured()` says whether they were in force when torch loaded, `mkl_paths()` which path MKL takes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "MKL_CBWR": "AUTO,STRICT"}
MKL_PATHS_ENV = "ROBERTA_MKL_PATHS"
MKL_PATHS = ("isa", "vendor")
_in_force_at_import: bool | None = None
_mkl_paths = "vendor"


def configure() -> bool:
    """Set the defaults in this process's environment if torch has not read it yet; returns whether
    they (or the user's own values for them) are what torch loads with."""
    global _in_force_at_import, _mkl_paths
    if _in_force_at_import is None:
        _in_force_at_import = "torch" not in sys.modules
        if _in_force_at_import:
            for name, value in DEFAULTS.items():
                os.environ.setdefault(name, value)
            if os.environ.get(MKL_PATHS_ENV, "isa") == "isa" and _load_mkl_paths():
                _mkl_paths = "isa"
    return _in_force_at_import


def _load_mkl_paths() -> bool:
    """Load the compiled `mkl_serv_intel_cpu_true` ahead of torch's; False when it was not built."""
    import ctypes
    from importlib.machinery import EXTENSION_SUFFIXES

    if "roberta._mkl_paths" in sys.modules and sys.modules["roberta._mkl_paths"] is None:
        return False  # blocked, as an import would be (the tests of a failed build do this)
    for suffix in EXTENSION_SUFFIXES:
        path = Path(__file__).with_name("_mkl_paths" + suffix)
        if path.is_file():
            try:
                ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
            except OSError:  # built for another platform: MKL keeps its own choice
                return False
            return True
    return False


def mkl_paths() -> str:
    """"isa": MKL chooses its code path by instruction set on every CPU (this process loaded
    `roberta._mkl_paths` before torch); "vendor": MKL's own choice (ROBERTA_MKL_PATHS=vendor, torch
    imported before roberta, or the library not built)."""
    setting = os.environ.get(MKL_PATHS_ENV, "isa")
    if setting not in MKL_PATHS:  # then nothing was loaded, and every measured product says so
        from .errors import RobertaError

        raise RobertaError(f"{MKL_PATHS_ENV}={setting!r} is not one of {', '.join(MKL_PATHS)}; unset it or pick one")
    return _mkl_paths


def configured() -> bool:
    return bool(_in_force_at_import)

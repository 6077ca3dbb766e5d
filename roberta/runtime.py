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

`import roberta` applies them when torch is not imported yet (the `roberta` command always does);
`configured()` says whether they were in force when torch loaded.
"""
from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "MKL_CBWR": "AUTO,STRICT"}
_in_force_at_import: bool | None = None


def configure() -> bool:
    """Set the defaults in this process's environment if torch has not read it yet; returns whether
    they (or the user's own values for them) are what torch loads with."""
    global _in_force_at_import
    if _in_force_at_import is None:
        _in_force_at_import = "torch" not in sys.modules
        if _in_force_at_import:
            for name, value in DEFAULTS.items():
                os.environ.setdefault(name, value)
    return _in_force_at_import


def configured() -> bool:
    return bool(_in_force_at_import)

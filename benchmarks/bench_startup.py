"""Time to the first answer: a fresh process that imports the library, loads a base-size masked LM from
disk and fills one mask, as a command-line call or a short script does, against transformers' fill-mask
pipeline on the same files.

Each row runs in its own interpreter, rows alternate, and the median of `--repeats` runs is reported:
the wall time the parent saw (interpreter start to exit) and the child's own phases (import, load,
first answer; `import roberta` leaves PyTorch's import to the first load, so there it counts in the load).
Random weights (base size, this project's save_pretrained, which transformers reads) and
the real tokenizer from ../shared/data/roberta-bpe. One untimed run first fills this project's kernel
cache, as any earlier use on the machine would have; the figures are for a warm cache and warm page cache.

    PYTHONPATH=. python benchmarks/bench_startup.py --repeats 7
    PYTHONPATH=. python benchmarks/bench_startup.py --repeats 7 --baseline /path/to/older/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import DATA, ROOT, cpu_line, median, table

TEXT = "The capital of France is <mask>."

LIBRARY = """
import json, sys, time
started = time.perf_counter()
import roberta
imported = time.perf_counter()
hub = roberta.load(sys.argv[1])
loaded = time.perf_counter()
hub.fill_mask(sys.argv[2], topk=5)
done = time.perf_counter()
print(json.dumps({"import": imported - started, "load": loaded - imported, "first": done - loaded}))
"""

TRANSFORMERS = """
import json, sys, time
started = time.perf_counter()
from transformers import pipeline
imported = time.perf_counter()
fill = pipeline("fill-mask", model=sys.argv[1], device="cpu")
loaded = time.perf_counter()
fill(sys.argv[2], top_k=5)
done = time.perf_counter()
print(json.dumps({"import": imported - started, "load": loaded - imported, "first": done - loaded}))
"""


def rows(model: str, baseline: str | None) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, the checkout on PYTHONPATH)."""
    library = [sys.executable, "-c", LIBRARY, model, TEXT]
    command = [sys.executable, "-m", "roberta.cli", "fill-mask", "-m", model, "--json", TEXT]
    found = {"this project, library (import, load, fill_mask)": (library, str(ROOT)),
             "this project, command line (roberta fill-mask)": (command, str(ROOT)),
             "transformers fill-mask pipeline": ([sys.executable, "-c", TRANSFORMERS, model, TEXT], str(ROOT))}
    if baseline:
        found[f"{baseline}, library"] = (library, baseline)
        found[f"{baseline}, command line"] = (command, baseline)
    return found


def run(argv: list[str], checkout: str) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": checkout}
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=checkout, env=env, timeout=600)
    wall = time.perf_counter() - started
    if out.returncode:
        raise RuntimeError(f"{argv[:4]} failed:\n{out.stderr[-3000:]}")
    last = out.stdout.strip().splitlines()[-1]
    phases = json.loads(last) if last.startswith("{\"import\"") else {}
    return wall, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", help="another checkout of this project to time beside this one")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from roberta import RobertaConfig, RobertaForMaskedLM
    from roberta.tokenizer import RobertaTokenizer

    print(f"{cpu_line()}; torch {torch.__version__}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as model:
        torch.manual_seed(0)
        RobertaForMaskedLM(RobertaConfig.base()).save_pretrained(
            model, tokenizer=RobertaTokenizer.from_pretrained(DATA / "roberta-bpe"))
        plan = rows(model, args.baseline)
        for argv, checkout in plan.values():  # untimed: the kernel cache and the page cache
            run(argv, checkout)
        walls = {name: [] for name in plan}
        phases = {name: [] for name in plan}
        for repeat in range(args.repeats):
            for name, (argv, checkout) in plan.items():
                wall, phase = run(argv, checkout)
                walls[name].append(wall)
                phases[name].append(phase)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{w[-1]:.2f}" for w in walls.values()),
                  flush=True)
    reference = median(walls["transformers fill-mask pipeline"])
    body = []
    for name in plan:
        part = {key: median([p[key] for p in phases[name]]) for key in ("import", "load", "first")} \
            if phases[name][0] else None
        body.append([name, f"{median(walls[name]):.2f}", f"{median(walls[name]) / reference:.2f}",
                     *(f"{part[k]:.2f}" if part else "-" for k in ("import", "load", "first"))])
    print(table(["row", "wall s (median)", "x transformers", "import s", "load s", "first answer s"], body))
    print("per run (s): " + "; ".join(f"{name}: {' '.join(f'{w:.2f}' for w in walls[name])}" for name in plan))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

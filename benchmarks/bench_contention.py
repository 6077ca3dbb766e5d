"""Training on a busy machine: a short fine-tune and pretraining updates with one core held by another
process, against the idle machine, under this project's thread defaults and the ones it replaced.

Laptops, shared servers and CI boxes are busy. With PyTorch's CPU kernels split over OpenMP threads, a
thread that shares its core with another program is descheduled for whole time slices, and GNU
OpenMP's default has the threads that finished spin-wait for it (`roberta/runtime.py`). Each row runs
the `roberta` command in a fresh process:

- fine-tune: `roberta finetune --task SST-2` on 512 SST-2 rows, batch 16, one epoch, a 2-layer 64-wide
  model with the real tokenizer; the figure is the run's own `train_seconds` (training only, no eval);
- pretrain: `roberta pretrain --preset small` (6 layers x 512, 32 x 128 tokens per update) on a corpus
  file, the median seconds per update from `metrics.jsonl` over updates 2-6.

Conditions: `idle`, and `busy`: a spinning process pinned to CPU 0 for the whole run. Settings: `default`
(this project's: OpenMP waits passively), `spinning` (GNU OpenMP's own default, `GOMP_SPINCOUNT=300000`,
as before `roberta/runtime.py`), `short spin` (`GOMP_SPINCOUNT=20000`), `1 thread` (`--threads 1`). The ratio busy / idle is what the
busy core costs; with one of two cores taken, about 2 (the share of the CPU the run still has) is the
best possible.

    PYTHONPATH=. python benchmarks/bench_contention.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, ROOT, cpu_line, table

SETTINGS = {"default": ({}, []), "spinning": ({"GOMP_SPINCOUNT": "300000"}, []),
            "short spin": ({"GOMP_SPINCOUNT": "20000"}, []), "1 thread": ({}, ["--threads", "1"])}


def busy_loop() -> subprocess.Popen:
    """A process spinning on CPU 0 until killed."""
    code = "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass\n"
    process = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    return process


def roberta(args: list[str], env: dict) -> str:
    result = subprocess.run([sys.executable, "-m", "roberta", *args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    if result.returncode != 0:
        sys.exit(f"error: roberta {' '.join(args[:1])} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def finetune_seconds(work: Path, env: dict, extra: list[str]) -> float:
    out = work / f"ft-{time.monotonic_ns()}"
    stdout = roberta(["finetune", "--task", "SST-2", "--data", str(DATA / "glue" / "SST-2"), "--model",
                      str(work / "tiny"), "--out", str(out), "--max-train-examples", "512", "--max-epochs", "1",
                      "--batch-size", "16", "--eval-every", "100000", *extra], env)
    return float(json.loads(stdout[stdout.index("{"):])["train_seconds"])


def pretrain_seconds(work: Path, env: dict, extra: list[str]) -> float:
    out = work / f"pt-{time.monotonic_ns()}"
    roberta(["pretrain", "--preset", "small", "--data", str(work / "data"), "--out", str(out),
             "--set", "total_updates=6", "--set", "val_every=0", "--set", "save_every=1000", "--set", "log_every=1",
             "--set", "progress=false", *extra], env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:]  # the first update warms up
    return statistics.median(32 * 128 / rate for rate in rates)


def prepare(work: Path) -> None:
    """The tiny model for fine-tuning and a tokenized corpus for pretraining."""
    sys.path.insert(0, str(ROOT))
    import torch

    from roberta.model import RobertaConfig, RobertaForMaskedLM
    from roberta.tokenizer import RobertaTokenizer

    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig.tiny(max_position_embeddings=130)).save_pretrained(
        work / "tiny", tokenizer=RobertaTokenizer.from_pretrained(DATA / "roberta-bpe"))
    roberta(["preprocess", str(DATA / "corpus" / "wikitext2-valid.txt"), "--vocab", str(DATA / "roberta-bpe"),
             "--out", str(work / "data")], {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row; the median is reported")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("error: this benchmark needs at least 2 cores (one is made busy)")
    print(cpu_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        for job, measure in (("fine-tune (s of training)", finetune_seconds), ("pretrain (s per update)", pretrain_seconds)):
            for name in args.settings:
                env, extra = SETTINGS[name]
                times = {"idle": [], "busy": []}
                for _ in range(args.repeats):  # idle and busy alternate, so drifts hit both
                    times["idle"].append(measure(work, env, extra))
                    busy = busy_loop()
                    try:
                        times["busy"].append(measure(work, env, extra))
                    finally:
                        busy.kill()
                        busy.wait()
                idle, loaded = statistics.median(times["idle"]), statistics.median(times["busy"])
                rows.append([job, name, idle, loaded, loaded / idle])
                print(f"  {job:<28} {name:<9} idle {idle:.3f}  busy {loaded:.3f}  ratio {loaded / idle:.2f}",
                      flush=True)
    print(table(["job", "threads setting", "idle", "one core busy", "busy / idle"], rows))


if __name__ == "__main__":
    main()

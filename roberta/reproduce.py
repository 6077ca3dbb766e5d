"""The paper's fine-tuning protocol around `roberta finetune`: a grid of settings, several seeds, the
median dev score of the best setting, beside the published number.

    roberta reproduce glue --model roberta.base --data glue_data --out glue-base

The protocol is data (`PAPER`, `FAIRSEQ`, or a user's JSON/YAML file, all read by `Protocol.build`):

    seeds       the random seeds of every setting (the paper: five; the table reports their median)
    grid        {setting: [values]}: every combination is one setting of the sweep (the paper: lr in
                {1e-5, 2e-5, 3e-5} x batch size in {16, 32})
    set         recipe settings every run takes (the paper: 10 epochs; 6% warmup is the recipe's rule)
    tasks       {task: {"grid": ..., "set": ...}}: a task's own grid and settings, replacing the above
                ({} keeps the task's published recipe: SQuAD and RACE have one setting in the paper)
    mnli_start, mnli_start_sizes: the tasks that start from the MNLI model, for the model sizes given
                (the paper: RTE, STS-B and MRPC, for large)

Each run is an ordinary `roberta finetune` run directory, `OUT/<TASK>/<setting>-seed<N>/`, built from
the same recipe as the command `--print-commands` shows, so it holds the same weights as that command
run by hand. Runs go to worker processes that each load the library once: one per GPU, or on the CPU
`jobs` of them with `threads` each. A run with `eval.json` is finished and kept; one with only
`recipe.json` was interrupted and resumes through finetune's own `--resume`; the others start. The
table (`table.md`, `table.json`) and the plot (`scores.png`) are built from the runs' `eval.json`
files only, so runs done elsewhere (a Slurm array running the printed commands) count the same.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import math
import os
import re
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RobertaError
from .fileio import atomic_write
from .finetune import CHANGEABLE_ON_RESUME, GLUE_RECIPES, WARMUP_RATIO, Recipe, recipe_for, task_name

# --------------------------------------------------------------------------------------------------
# The protocol, as data

GLUE = ("MNLI", "QNLI", "QQP", "RTE", "SST-2", "MRPC", "CoLA", "STS-B")  # the paper's Table 5, in its order
SUITES = {"glue": GLUE, "squad": ("squad",), "race": ("race",)}
TASKS = GLUE + ("WNLI", "squad", "race")
# Where each task's data sits under --data: glue_data's own folder names, then squad/ and RACE/.
DATA_DIRS = {**{t: t for t in GLUE + ("WNLI",)}, "squad": "squad", "race": "RACE"}

# Section 5.1 and Appendix C (Table 10) of the paper: "a limited hyperparameter sweep for each task, with
# batch sizes in {16, 32} and learning rates in {1e-5, 2e-5, 3e-5}, with a linear warmup for the first
# 6% of steps followed by a linear decay to 0. We finetune for 10 epochs"; dev results are "medians
# over five runs"; "for RTE, STS and MRPC we found it helpful to finetune starting from the MNLI
# single-task model" (large). SQuAD and RACE have one setting each (Table 10), the recipes' own.
PAPER = {
    "name": "paper",
    "seeds": [1, 2, 3, 4, 5],
    "grid": {"lr": [1e-5, 2e-5, 3e-5], "batch_size": [16, 32]},
    "set": {"max_epochs": 10},
    "tasks": {"squad": {"grid": {}, "set": {}}, "race": {"grid": {}, "set": {}}},
    "mnli_start": ["RTE", "STS-B", "MRPC"],
    "mnli_start_sizes": ["large"],
}
# fairseq's examples/roberta/README.md: one learning rate and batch size per GLUE task, 10 epochs.
FAIRSEQ = {**PAPER, "name": "fairseq", "grid": {},
           "tasks": {**PAPER["tasks"], **{t: {"grid": {"lr": [lr], "batch_size": [batch]}, "set": {"max_epochs": 10}}
                                          for t, (lr, batch, _, _) in GLUE_RECIPES.items()}}}
PROTOCOLS = {"paper": PAPER, "fairseq": FAIRSEQ}

# The published dev scores (percent) by model size: fairseq's README for base; for large the paper's
# Table 5 (GLUE, single-task, dev, medians over five runs), Table 6 (SQuAD v1.1 dev EM/F1) and
# Table 7 (RACE: the test set, the only one published). MNLI is the matched dev set.
PUBLISHED = {
    "base": {"MNLI": 87.6, "QNLI": 92.8, "QQP": 91.9, "RTE": 78.7, "SST-2": 94.8, "MRPC": 90.2, "CoLA": 63.6,
             "STS-B": 91.2},
    "large": {"MNLI": 90.2, "QNLI": 94.7, "QQP": 92.2, "RTE": 86.6, "SST-2": 96.4, "MRPC": 90.9, "CoLA": 68.0,
              "STS-B": 92.4, "squad": {"exact": 88.9, "f1": 94.6}, "race": 83.2},
}
PUBLISHED_NOTES = {"race": "published: test set"}
SIZES = {(768, 12): "base", (1024, 24): "large"}  # (hidden size, layers) of the released models
# Settings the protocol cannot set: they are the sweep's own (seed), the command's (task, device) or
# the budget's (max_train_examples).
NOT_IN_GRID = {"seed", "task", "device", "max_train_examples"}
# --set settings that leave the protocol as it is: the precision (the paper trained in fp16), the same batch
# in micro-batches, how often the run logs and saves.
SAME_PROTOCOL = {"precision", "update_freq", "log_every", "save_every"}
KEYS = {"name", "seeds", "grid", "set", "tasks", "mnli_start", "mnli_start_sizes"}


@dataclass(frozen=True)
class Protocol:
    """A validated protocol: per task its grid points (each a dict of recipe settings), the seeds, and
    which tasks start from the MNLI model for which sizes."""
    name: str
    seeds: tuple[int, ...]
    points: dict            # task -> tuple of setting dicts, for every task in TASKS
    grid_keys: dict         # task -> the settings its grid varies (they name the runs)
    mnli_start: tuple[str, ...]
    mnli_start_sizes: tuple[str, ...]
    data: dict = field(compare=False, repr=False)  # as given, for table.json

    @classmethod
    def build(cls, data: dict, where: str = "protocol") -> "Protocol":
        """Check every field and every run's recipe now, so that a typo is an error before any run."""
        def fail(problem):
            raise RobertaError(f"{where}: {problem}")
        if not isinstance(data, dict):
            fail("expected a mapping with seeds, grid, set, tasks, mnli_start, mnli_start_sizes")
        unknown = set(data) - KEYS
        if unknown:
            fail(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")
        seeds = data.get("seeds", PAPER["seeds"])
        if not isinstance(seeds, list) or not seeds or \
                not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            fail(f"seeds must be a non-empty list of whole numbers >= 0, not {seeds!r}")
        if len(set(seeds)) != len(seeds):
            fail(f"seeds {seeds} repeat a seed: two runs would be the same run")
        tasks = data.get("tasks", {})
        if not isinstance(tasks, dict):
            fail("tasks must map a task name to {grid: ..., set: ...}")
        own = {}
        for name, spec in tasks.items():
            task = _task(name, where)
            if not isinstance(spec, dict) or set(spec) - {"grid", "set"}:
                fail(f"tasks.{name} must be a mapping with grid and/or set")
            own[task] = spec
        points, keys = {}, {}
        for task in TASKS:
            spec = own.get(task, {})
            grid, fixed = spec.get("grid", data.get("grid", {})), spec.get("set", data.get("set", {}))
            points[task], keys[task] = _points(task, grid, fixed, f"{where}: {task}"), tuple(grid)
        start = [_task(t, where) for t in data.get("mnli_start", [])]
        if "MNLI" in start or any(t not in GLUE + ("WNLI",) for t in start):
            fail(f"mnli_start lists GLUE tasks other than MNLI, not {data.get('mnli_start')}")
        sizes = data.get("mnli_start_sizes", list(PUBLISHED))
        if not isinstance(sizes, list) or set(sizes) - set(PUBLISHED):
            fail(f"mnli_start_sizes must be a list of {', '.join(PUBLISHED)}, not {sizes!r}")
        return cls(str(data.get("name", where)), tuple(seeds), points, keys, tuple(start), tuple(sizes), data)

    def starts_from_mnli(self, task: str, size: str | None) -> bool:
        return task in self.mnli_start and size in self.mnli_start_sizes


def _task(name, where: str) -> str:
    try:
        task = task_name(str(name))
    except RobertaError:
        task = None
    if task not in TASKS:
        raise RobertaError(f"{where}: unknown task {name!r}: choose among {', '.join(TASKS)}")
    return task


def _points(task: str, grid, fixed, where: str) -> tuple[dict, ...]:
    """Every combination of the grid's values, over the fixed settings; each checked as a recipe."""
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise RobertaError(f"{where}: grid and set must be mappings of recipe settings")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RobertaError(f"{where}: grid.{key} must be a non-empty list of values, not {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise RobertaError(f"{where}: grid.{key} repeats a value: {values}")
    for key in (set(grid) | set(fixed)) & NOT_IN_GRID:
        raise RobertaError(f"{where}: {key} is not a protocol setting (seeds: the seeds list; "
                           f"max_train_examples: --data-fraction; task, device: the command's)")
    both = set(grid) & set(fixed)
    if both:
        raise RobertaError(f"{where}: {', '.join(sorted(both))} in both grid and set: keep one")
    points = []
    for values in itertools.product(*grid.values()):
        point = {**fixed, **dict(zip(grid, values))}
        try:
            recipe_for(task, **point)  # a bad name or value is an error now, naming the setting
        except RobertaError as exc:
            raise RobertaError(f"{where}: {exc}") from None
        points.append(point)
    return tuple(points)


def protocol(name_or_file: str) -> Protocol:
    """`paper`, `fairseq`, or a JSON / YAML file in the layout of `PAPER`."""
    if name_or_file in PROTOCOLS:
        return Protocol.build(PROTOCOLS[name_or_file], name_or_file)
    path = Path(name_or_file)
    if not path.is_file():
        raise RobertaError(f"--grid {name_or_file}: neither {', '.join(PROTOCOLS)} nor a JSON/YAML file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # huggingface_hub's dependency; safe_load builds plain data, never objects

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's subclasses of it
        raise RobertaError(f"{path} is not valid {path.suffix[1:].upper() or 'JSON'}: {str(exc).splitlines()[0]}") \
            from None
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise RobertaError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = {"name": path.name, **data}
    return Protocol.build(data, str(path))


# --------------------------------------------------------------------------------------------------
# The budget: cuts that make a quick look, always named in the table


@dataclass(frozen=True)
class Budget:
    seeds: int | None = None                 # the first N of the protocol's seeds
    lr: tuple[float, ...] | None = None      # keep the grid points with these learning rates
    batch_size: tuple[int, ...] | None = None
    data_fraction: float | None = None       # train on this fraction of each task's training rows

    def __post_init__(self):
        if self.seeds is not None and self.seeds < 1:
            raise RobertaError(f"--seeds {self.seeds}: give 1 or more")
        if self.data_fraction is not None and not 0 < self.data_fraction <= 1:
            raise RobertaError(f"--data-fraction {self.data_fraction}: give a fraction in (0, 1]")


def cut_points(task: str, points: tuple[dict, ...], budget: Budget) -> tuple[dict, ...]:
    """The grid points the budget keeps; a value the grid does not have is an error naming its values."""
    kept = points
    for key in ("lr", "batch_size"):
        wanted = getattr(budget, key)
        if wanted is None:
            continue
        have = sorted({p.get(key) for p in points}, key=str)
        missing = [v for v in wanted if v not in have]
        if missing:
            raise RobertaError(f"--{key.replace('_', '-')} {','.join(map(str, missing))}: {task}'s grid has "
                               f"{key} {', '.join(map(str, have))}")
        kept = tuple(p for p in kept if p.get(key) in wanted)
    return kept


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    task: str
    point: dict
    seed: int
    out: Path
    data: Path
    recipe: Recipe
    model: str | None            # None until the MNLI model it starts from is known

    @property
    def name(self) -> str:
        return self.out.name

    def status(self) -> str:
        """done (eval.json), partial (recipe.json: resume it), or missing."""
        if (self.out / "eval.json").is_file():
            state = "done"
        elif (self.out / "recipe.json").is_file():
            state = "partial"
        else:
            return "missing"
        from .train import read_settings

        theirs = read_settings(Recipe, self.out / "recipe.json").to_dict()
        ours = self.recipe.to_dict()
        changed = sorted(k for k in ours if theirs[k] != ours[k] and k not in CHANGEABLE_ON_RESUME)
        if changed:
            raise RobertaError(f"{self.out} holds a run with other settings ({', '.join(changed)}) than this "
                               "sweep's: choose another --out, or the grid and budget that made it")
        return state

    def command(self) -> list[str]:
        """The `roberta finetune` command that makes this run (with --resume once it has started)."""
        args = ["roberta", "finetune", "--task", self.task, "--data", str(self.data), "--model", str(self.model),
                "--out", str(self.out)]
        settings = {**self.point, "seed": self.seed}
        if self.recipe.max_train_examples is not None:
            settings["max_train_examples"] = self.recipe.max_train_examples
        if self.recipe.device != "auto":
            settings["device"] = self.recipe.device
        for key, value in settings.items():
            args += ["--set", f"{key}={_text(value)}"]
        return args + (["--resume"] if self.status() == "partial" else [])


def _text(value) -> str:
    """A setting as `--set` parses it back to the same value (repr: a float's shortest exact form)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _slug(point: dict, keys: tuple[str, ...]) -> str:
    """A setting's name from the values the grid varies: lr2e-05-bs16 (recipe: a one-setting grid)."""
    short = {"lr": "lr", "batch_size": "bs"}
    parts = [f"{short.get(k, k)}{_text(point[k])}" for k in keys]
    return re.sub(r"[^A-Za-z0-9.,=+-]", "_", "-".join(parts)) or "recipe"


def train_rows(task: str, data_dir: Path) -> int:
    """The number of training examples finetune reads for `task` (what max_train_examples counts)."""
    from .finetune import load_task

    return len(load_task(recipe_for(task), data_dir, None, splits=("train",)).data["train"][0])


def model_size(model: str) -> str | None:
    """base or large when the checkpoint has a released model's shape, else None (no published number)."""
    from .checkpoint import CONFIG_NAME, read_checkpoint
    from .hub import opened
    from .model import RobertaConfig

    with opened(model) as (directory, _):
        config = RobertaConfig.load(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() \
            else read_checkpoint(directory)[0]
    return SIZES.get((config.hidden_size, config.num_hidden_layers))


@dataclass
class Sweep:
    """Every run of a protocol for some tasks, model and budget, under one output directory."""
    tasks: tuple[str, ...]
    model: str
    data: Path
    out: Path
    protocol: Protocol
    budget: Budget = field(default_factory=Budget)
    device: str = "auto"
    mnli_model: str | None = None        # a fine-tuned MNLI model to start RTE/STS-B/MRPC from
    extra: dict = field(default_factory=dict)  # recipe settings every run takes besides the protocol's (precision)
    size: str | None = None
    runs: list[Run] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        p, b = self.protocol, self.budget
        tasks = list(dict.fromkeys(self.tasks))
        mnli_first = [t for t in tasks if p.starts_from_mnli(t, self.size)]
        if mnli_first and "MNLI" not in tasks and self.mnli_model is None:
            tasks.insert(0, "MNLI")
            self.notes.append(f"{', '.join(mnli_first)} start from the MNLI model: MNLI's runs are added "
                              "(or give --mnli-model)")
        self.tasks = tuple(tasks)
        missing = [str(self.data / DATA_DIRS[t]) for t in tasks if not (self.data / DATA_DIRS[t]).is_dir()]
        if missing:
            raise RobertaError(f"no data directory {', '.join(missing)}: --data takes the folder that holds "
                               f"{', '.join(DATA_DIRS[t] for t in tasks)} (glue_data's layout, squad/, RACE/)")
        seeds = p.seeds[: b.seeds] if b.seeds else p.seeds
        if len(seeds) < len(p.seeds):
            self.cuts.append(f"seeds: {len(seeds)} of the protocol's {len(p.seeds)} ({', '.join(map(str, seeds))})")
        for key in set(self.extra) & (NOT_IN_GRID | {"lr", "batch_size"}):
            raise RobertaError(f"--set {key}: the protocol and the budget choose {key}, not --set")
        changed = sorted(set(self.extra) - SAME_PROTOCOL)
        if changed:  # a setting that changes what is trained or measured is a cut like any other
            self.cuts.append(f"--set {', '.join(f'{k}={self.extra[k]}' for k in changed)}: not the protocol's")
        for task in tasks:
            points = cut_points(task, p.points[task], b)
            if len(points) < len(p.points[task]):
                self.cuts.append(f"{task}: {len(points)} of the grid's {len(p.points[task])} settings")
            limit = None
            if b.data_fraction is not None and b.data_fraction < 1:
                rows = train_rows(task, self.data / DATA_DIRS[task])
                limit = max(1, math.ceil(b.data_fraction * rows))
                self.cuts.append(f"{task}: {limit} of {rows} training rows ({b.data_fraction:g})")
            for point in points:
                point = {**point, **self.extra}
                for seed in seeds:
                    extra = {"max_train_examples": limit} if limit else {}
                    recipe = recipe_for(task, **point, seed=seed, device=self.device, **extra)
                    name = _slug(point, p.grid_keys[task]) + (f"-rows{limit}" if limit else "") + f"-seed{seed}"
                    model = None if p.starts_from_mnli(task, self.size) else self.model
                    if p.starts_from_mnli(task, self.size) and self.mnli_model is not None:
                        model = self.mnli_model
                    self.runs.append(Run(task, point, seed, self.out / task / name, self.data / DATA_DIRS[task],
                                         recipe, model))
        if p.name != "paper":
            self.cuts.insert(0, f"grid: {p.name}, not the paper's sweep")

    def check_out(self, create: bool = True) -> None:
        """OUT/sweep.json names the model and data the runs were made from; another model is refused."""
        record = {"model": str(self.model), "data": str(self.data), "mnli_model": self.mnli_model}
        # (--set settings and the budget need no record here: they are in every run's recipe.json)
        path = self.out / "sweep.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise RobertaError(f"{path} is not valid JSON: restore it, or choose another --out") from None
            diff = [k for k in record if saved.get(k) != record[k]]
            if diff:
                raise RobertaError(f"{self.out} holds a sweep of {', '.join(f'{k} {saved.get(k)}' for k in diff)}: "
                                   "give the same, or choose another --out")
            return
        if not create:
            return
        if self.out.exists() and not self.out.is_dir():
            raise RobertaError(f"--out {self.out} is a file: choose a new directory")
        if self.out.is_dir() and any(self.out.iterdir()):
            raise RobertaError(f"{self.out} is not empty and holds no sweep.json: choose a new or empty --out")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record, indent=2) + "\n")

    def resolve_mnli(self) -> bool:
        """Give the MNLI-started runs their model once every MNLI run is done: the run of the best
        setting whose score is the (lower) median. True when no run waits any longer."""
        waiting = [r for r in self.runs if r.model is None]
        if not waiting:
            return True
        mnli = [r for r in self.runs if r.task == "MNLI"]
        if any(r.status() != "done" for r in mnli):
            return False
        table = task_result("MNLI", mnli, None)
        best = table["settings"][table["best"]]
        score = statistics.median_low(best["scores"].values())
        seed = min(int(s) for s, v in best["scores"].items() if v == score)
        chosen = next(r for r in mnli if r.point == best["setting"] and r.seed == seed)
        for r in waiting:
            r.model = str(chosen.out / "model")
        return True

    def commands(self) -> list[str]:
        """The commands a cluster scheduler runs, one line each (comments for what cannot run yet)."""
        lines = []
        ready = self.resolve_mnli()
        for r in self.runs:
            if r.status() == "done":
                continue
            if r.model is None:
                continue
            lines.append(shlex.join(r.command()))
        if not ready:
            waiting = sorted({r.task for r in self.runs if r.model is None}, key=self.tasks.index)
            lines.append(f"# {', '.join(waiting)} start from the MNLI model: once the MNLI runs are done, "
                         "run --print-commands again for their commands")
        done = sum(r.status() == "done" for r in self.runs)
        lines.insert(0, f"# {len(self.runs)} runs, {done} done; afterwards `roberta reproduce ... --collect` "
                        "writes the table")
        return lines


# --------------------------------------------------------------------------------------------------
# Workers: processes that load the library once and run one fine-tuning run at a time


def _die_with_parent() -> None:
    """Linux: the worker is killed when the sweep dies (kill -9 included), never left running alone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker() -> None:
    """The worker's loop: a job (JSON line) on stdin, finetune's output to the job's log file, a JSON
    line on stdout when the run ends ({"ok": true} or {"error": ...})."""
    import torch

    from .finetune import finetune

    if os.environ.get("ROBERTA_THREADS"):
        torch.set_num_threads(int(os.environ["ROBERTA_THREADS"]))
    reply = os.fdopen(os.dup(1), "w")  # the replies; stray output of any library goes to stderr instead
    os.dup2(2, 1)
    for line in sys.stdin:
        job = json.loads(line)
        with open(job["log"], "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            try:
                finetune(job["task"], job["data"], job["model"], job["out"], recipe=Recipe.from_dict(job["recipe"]),
                         resume=job["resume"])
                result = {"ok": True}
            except RobertaError as exc:
                print(f"error: {exc}")
                result = {"error": str(exc)}
            except Exception:  # a bug: its traceback goes to the log
                traceback.print_exc()
                result = {"error": "unexpected failure (a bug: the traceback is in the log)", "bug": True}
        reply.write(json.dumps(result) + "\n")
        reply.flush()


class Worker:
    def __init__(self, slot: str, env: dict):
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.slot, self.run, self.since = slot, None, 0.0
        self.proc = subprocess.Popen([sys.executable, "-c", "from roberta.reproduce import worker; worker()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def start(self, run: Run, log: Path) -> None:
        job = {"task": run.task, "data": str(run.data), "model": run.model, "out": str(run.out),
               "recipe": run.recipe.to_dict(), "resume": run.status() == "partial", "log": str(log)}
        self.run, self.since = run, time.monotonic()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        line = self.proc.stdout.readline()
        self.run = None
        if not line:  # killed (out of memory?) or crashed: the run resumes from its checkpoint next time
            return {"error": f"its process ended (exit status {self.proc.wait()}): rerun the sweep to resume it"}
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def slots(device: str, jobs: int | None, threads: int | None) -> list[tuple[str, dict]]:
    """(name, environment) of each worker: one per visible GPU, or `jobs` CPU workers with `threads`
    threads each (default: the cores shared out)."""
    from .device import resolve_device

    if resolve_device(device).type == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
        ids = ids[: jobs or len(ids)]
        return [(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in ids]
    jobs = jobs or 1
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {"ROBERTA_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    return [(f"cpu {i}", env) for i in range(jobs)]


def execute(sweep: Sweep, jobs: int | None = None, threads: int | None = None, progress: bool = True) -> None:
    """Run every unfinished run of the sweep over the workers, one progress line per running run."""
    from tqdm import tqdm

    todo = [r for r in sweep.runs if r.status() != "done"]
    done_before = len(sweep.runs) - len(todo)
    if done_before:
        tqdm.write(f"{done_before} of {len(sweep.runs)} runs already done; "
                   f"{sum(r.status() == 'partial' for r in todo)} resume, the rest start")
    if not todo:
        return
    workers = [Worker(name, env) for name, env in slots(sweep.device, jobs, threads)[: len(todo)]]
    bars = {}
    try:
        while todo or any(w.run for w in workers):
            sweep.resolve_mnli()
            for w in workers:
                ready = next((r for r in todo if r.model is not None), None)
                if w.run is None and ready is not None:
                    todo.remove(ready)
                    log = sweep.out / "logs" / ready.task / f"{ready.name}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    w.start(ready, log)
                    bars[w.slot] = tqdm(desc=f"{w.slot}: {ready.task} {ready.name}", unit="upd", disable=not progress,
                                        position=workers.index(w), leave=False, dynamic_ncols=True)
            busy = [w for w in workers if w.run]
            if not busy:
                raise RobertaError("runs wait for the MNLI model but no MNLI run is left to make it")
            readable, _, _ = select.select([w.proc.stdout for w in busy], [], [], 0.5)
            for w in busy:
                done, total = run_progress(w.run.out)
                bar = bars[w.slot]
                bar.total = total
                bar.n = done
                bar.refresh()
                if w.proc.stdout not in readable:
                    continue
                run, result = w.run, w.result()
                bar.close()
                if "error" in result:
                    log = sweep.out / "logs" / run.task / f"{run.name}.log"
                    message = f"{run.task} {run.name}: {result['error']} (log: {log})"
                    raise RuntimeError(message) if result.get("bug") else RobertaError(message)
                score = read_score(run.out)
                tqdm.write(f"done {run.task} {run.name}: dev {score[0]} {score[1]:.2f} "
                           f"({time.monotonic() - w.since:.0f} s on {w.slot})")
    finally:
        for bar in bars.values():
            bar.close()
        for w in workers:
            if w.run is None:
                w.close()
            else:  # an error elsewhere: stop it; its checkpoints let the next sweep resume it
                w.proc.kill()
                w.proc.wait()


def run_progress(out: Path) -> tuple[int, int | None]:
    """(updates done, planned) from a run's metrics.jsonl: the plan is its first line, the last
    complete line the latest update."""
    path = out / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().splitlines()
        total = first.get("plan", {}).get("updates")
        for line in reversed(tail):
            with contextlib.suppress(ValueError):
                return int(json.loads(line).get("step", 0)), total
        return 0, total
    except (OSError, ValueError, AttributeError):
        return 0, None


# --------------------------------------------------------------------------------------------------
# The table


def read_score(out: Path) -> tuple[str, float, dict]:
    """(metric, score in percent, all dev metrics in percent) from a finished run's eval.json."""
    path = out / "eval.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        metric, dev = result["metric"], result["dev"]
        scale = 1.0 if result["task"] == "squad" else 100.0  # SQuAD's metrics are percent already
        scores = {k: scale * v for k, v in dev.items() if isinstance(v, (int, float)) and k != "total"}
        return metric, scores[metric], scores
    except (OSError, ValueError, KeyError, TypeError):
        raise RobertaError(f"{path} is not a fine-tuning result (eval.json with metric and dev): rerun the "
                           f"sweep to redo it, after removing {out}") from None


def task_result(task: str, runs: list[Run], size: str | None) -> dict:
    """Per setting the scores by seed and their median; the best setting (highest median, the first on
    a tie) and its median, min and max; the published number for the size."""
    settings, metric = [], None
    for point, group in itertools.groupby(runs, key=lambda r: json.dumps(r.point, sort_keys=True)):
        group = list(group)
        scores, also = {}, {}
        for r in group:
            if r.status() == "done":
                metric, score, all_scores = read_score(r.out)
                scores[str(r.seed)] = score
                also[str(r.seed)] = all_scores
        settings.append({"setting": group[0].point, "name": group[0].name.rsplit("-seed", 1)[0], "runs": len(group),
                         "scores": scores, "metrics": also,
                         "median": statistics.median(scores.values()) if scores else None})
    scored = [i for i, s in enumerate(settings) if s["median"] is not None]
    best = max(scored, key=lambda i: (settings[i]["median"], -i)) if scored else None
    row = {"task": task, "started_from": runs[0].model if runs else None, "metric": metric, "best": best,
           "settings": settings,
           "runs_done": sum(len(s["scores"]) for s in settings), "runs": len(runs),
           "published": PUBLISHED.get(size or "", {}).get(task), "published_note": PUBLISHED_NOTES.get(task)}
    if best is not None:
        values = list(settings[best]["scores"].values())
        row.update(median=statistics.median(values), min=min(values), max=max(values), seeds=len(values))
        names = sorted({k for m in settings[best]["metrics"].values() for k in m} - {metric})
        row["other_medians"] = {k: statistics.median(m[k] for m in settings[best]["metrics"].values() if k in m)
                                for k in names}
    return row


def table(sweep: Sweep) -> dict:
    rows = [task_result(t, [r for r in sweep.runs if r.task == t], sweep.size) for t in sweep.tasks]
    incomplete = [f"{r['task']}: {r['runs_done']} of {r['runs']} runs done" for r in rows if r["runs_done"] < r["runs"]]
    p = sweep.protocol
    return {"model": str(sweep.model), "size": sweep.size, "protocol": p.name, "seeds": list(p.seeds),
            "warmup_ratio": WARMUP_RATIO, "mnli_start": [t for t in p.mnli_start if p.starts_from_mnli(t, sweep.size)],
            "mnli_model": sweep.mnli_model, "set": sweep.extra, "cuts": sweep.cuts + incomplete,
            "is_protocol": not (sweep.cuts or incomplete), "tasks": rows}


def markdown(t: dict) -> str:
    size = t["size"] or "no released size: no published numbers"
    lines = [f"# Dev results of {t['model']} ({size})", ""]
    if t["is_protocol"]:
        lines += [f"The paper's protocol: median over {len(t['seeds'])} seeds of the best setting of the grid.", ""]
    else:
        lines += ["**Not the paper's protocol: the numbers below are not comparable to the published ones.** Cut:", ""]
        lines += [f"- {c}" for c in t["cuts"]] + [""]
    lines += ["| task | metric | median | min | max | seeds | best setting | published |",
              "|---|---|---|---|---|---|---|---|"]
    for r in t["tasks"]:
        pub = r["published"]
        pub = "/".join(f"{v:.1f}" for v in pub.values()) if isinstance(pub, dict) else \
            "-" if pub is None else f"{pub:.1f}"
        if r["published_note"] and r["published"] is not None:
            pub += f" ({r['published_note']})"
        if r["best"] is None:
            lines.append(f"| {r['task']} | - | - | - | - | 0 | - | {pub} |")
            continue
        median = f"{r['median']:.2f}"
        if r["task"] == "squad":  # EM/F1 as published
            median = f"{r['other_medians'].get('exact', math.nan):.2f}/{median}"
        lines.append(f"| {r['task']} | {r['metric']} | {median} | {r['min']:.2f} | {r['max']:.2f} | {r['seeds']} | "
                     f"{r['settings'][r['best']]['name']} | {pub} |")
    if t["set"]:
        lines += ["", "Every run also: " + ", ".join(f"{k}={v}" for k, v in t["set"].items()) + "."]
    if t["mnli_start"]:
        lines += ["", f"{', '.join(t['mnli_start'])} started from the MNLI model"
                      + (f" {t['mnli_model']}." if t["mnli_model"] else " of this sweep (its best setting's median run).")]
    return "\n".join(lines) + "\n"


def plot(t: dict, png: Path) -> None:
    """Each task's dev scores per setting: one dot per seed, the median as a bar, the published line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = t["tasks"]
    cols = min(4, len(rows))
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(4 * cols, 3.5 * math.ceil(len(rows) / cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        for x, s in enumerate(r["settings"]):
            values = list(s["scores"].values())
            ax.plot([x] * len(values), values, "o", color="C0", alpha=0.6)
            if s["median"] is not None:
                ax.plot([x - 0.3, x + 0.3], [s["median"]] * 2, "-", color="C1" if x == r["best"] else "C7", lw=2)
        pub = r["published"]
        pub = pub.get(r["metric"]) if isinstance(pub, dict) else pub
        if pub is not None:
            ax.axhline(pub, ls="--", color="C3", label=f"published {pub}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(r["settings"])), [s["name"] for s in r["settings"]], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{r['task']} ({r['metric'] or 'no runs'})")
        ax.set_ylabel("dev score (%)")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=80)
    plt.close(fig)
    atomic_write(png, image.getvalue())


def collect(sweep: Sweep) -> dict:
    """The table from what the run directories hold: table.json, table.md and scores.png in OUT."""
    t = table(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep.out / "table.json", json.dumps(t, indent=2) + "\n")
    atomic_write(sweep.out / "table.md", markdown(t))
    plot(t, sweep.out / "scores.png")
    return t


def expand_tasks(names: list[str]) -> tuple[str, ...]:
    """glue, squad, race, or task names, in the order given."""
    tasks = []
    for name in names:
        tasks += SUITES.get(name.lower(), None) or [_task(name, "reproduce")]
    return tuple(dict.fromkeys(tasks))


def reproduce(tasks: list[str], model: str, data, out, grid: str = "paper", budget: Budget | None = None,
              device: str = "auto", mnli_model: str | None = None, jobs: int | None = None,
              threads: int | None = None, print_commands: bool = False, collect_only: bool = False,
              progress: bool = True, extra: dict | None = None) -> dict | list[str]:
    """Run (or list, or only collect) the protocol's runs and return the table (the command lines).
    `extra`: recipe settings every run takes besides the protocol's, e.g. {"precision": "bf16"}."""
    if jobs is not None and jobs < 1 or threads is not None and threads < 1:
        raise RobertaError("--jobs and --threads take 1 or more")
    if device not in ("auto", "cpu", "cuda"):  # each worker sees one GPU as cuda:0
        raise RobertaError(f"--device {device}: use auto, cpu or cuda (CUDA_VISIBLE_DEVICES and --jobs choose the GPUs)")
    sweep = Sweep(expand_tasks(tasks), model, data, out, protocol(grid), budget or Budget(), device, mnli_model,
                  extra or {}, size=model_size(model))
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    sweep.check_out(create=not collect_only)
    if print_commands:
        return sweep.commands()
    if not collect_only:
        execute(sweep, jobs, threads, progress)
    return collect(sweep)

"""`roberta reproduce`: the protocol's data against the published values, its validation, and a real
sweep on the shared SST-2 and RTE files with a tiny model (2 settings x 2 seeds): the table from the
runs' own eval files, every run bitwise the run of the printed `roberta finetune` command, and a
sweep killed with kill -9 that a rerun completes to the same table without redoing finished runs."""
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import shared_path
from roberta import reproduce as rp
from roberta.cli import main
from roberta.errors import RobertaError
from roberta.finetune import WARMUP_RATIO, published, recipe_for

ROOT = Path(__file__).resolve().parents[1]
GLUE_DATA = shared_path("glue")
# 2 settings x 2 seeds (learning rates at which a tiny model's dev scores still differ by seed); a fraction
# of the data that keeps each run to a few updates: SST-2 337 of 67349 rows (11 updates an epoch at
# batch 32), RTE 7 of 1244 rows (one update an epoch).
GRID = {"seeds": [1, 2], "grid": {"lr": [1e-4, 1e-5]},
        "set": {"batch_size": 32, "max_epochs": 2, "max_dev_examples": 32}}
FRACTION = 0.005
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------------
# The protocol as data, against the paper (Section 5.1, Appendix C Table 10, Tables 5-7) and fairseq's README


def test_the_paper_protocol_is_the_published_one():
    p = rp.protocol("paper")
    assert p.seeds == (1, 2, 3, 4, 5)  # "medians over five runs"
    assert WARMUP_RATIO == 0.06
    for task in rp.GLUE:
        points = p.points[task]
        assert sorted((x["lr"], x["batch_size"]) for x in points) == \
            sorted((lr, b) for lr in (1e-5, 2e-5, 3e-5) for b in (16, 32))
        assert all(x["max_epochs"] == 10 for x in points)
        recipe = recipe_for(task, **points[0])
        assert (recipe.weight_decay, recipe.adam_betas, recipe.adam_eps, recipe.warmup_updates) == (0.1, (0.9, 0.98), 1e-6, None)
    # SQuAD and RACE: one setting, the recipe's (lr None: the published rate, taken when the run starts)
    assert p.points["squad"] == p.points["race"] == ({},)
    squad, race = recipe_for("squad"), recipe_for("race")
    assert (published("squad")["lr"], squad.batch_size, squad.max_epochs, squad.weight_decay) == (1.5e-5, 48, 2, 0.01)
    assert (published("race")["lr"], race.batch_size, race.max_epochs, race.weight_decay) == (1e-5, 16, 4, 0.1)
    assert set(p.mnli_start) == {"RTE", "STS-B", "MRPC"} and p.mnli_start_sizes == ("large",)
    assert p.starts_from_mnli("RTE", "large") and not p.starts_from_mnli("RTE", "base")


def test_the_fairseq_grid_is_its_readme_table():
    readme = {"MNLI": (1e-5, 32), "QNLI": (1e-5, 32), "QQP": (1e-5, 32), "RTE": (2e-5, 16), "SST-2": (1e-5, 32),
              "MRPC": (1e-5, 16), "CoLA": (1e-5, 16), "STS-B": (2e-5, 16)}
    p = rp.protocol("fairseq")
    for task, (lr, batch) in readme.items():
        assert p.points[task] == ({"max_epochs": 10, "lr": lr, "batch_size": batch},)


def test_published_numbers():
    assert rp.PUBLISHED["base"] == {"MNLI": 87.6, "QNLI": 92.8, "QQP": 91.9, "RTE": 78.7, "SST-2": 94.8, "MRPC": 90.2,
                                    "CoLA": 63.6, "STS-B": 91.2}
    assert rp.PUBLISHED["large"] == {"MNLI": 90.2, "QNLI": 94.7, "QQP": 92.2, "RTE": 86.6, "SST-2": 96.4, "MRPC": 90.9,
                                     "CoLA": 68.0, "STS-B": 92.4, "squad": {"exact": 88.9, "f1": 94.6}, "race": 83.2}


@pytest.mark.parametrize("data, problem", [
    ({"grid": {"lr": []}}, "grid.lr must be a non-empty list"),
    ({"grid": {"lr": [1e-5, 1e-5]}}, "repeats a value"),
    ({"grid": {"seed": [1, 2]}}, "seed is not a protocol setting"),
    ({"set": {"max_train_examples": 10}}, "max_train_examples is not a protocol setting"),
    ({"grid": {"lrr": [1e-5]}}, "unknown recipe setting 'lrr'"),
    ({"grid": {"lr": [-1.0]}}, "lr=-1.0 is out of range"),
    ({"set": {"max_epochs": "ten"}}, "max_epochs='ten' is not a valid int"),
    ({"seeds": [1, 1]}, "repeat a seed"),
    ({"seeds": []}, "non-empty list"),
    ({"tasks": {"SST3": {}}}, "unknown task 'SST3'"),
    ({"mnli_start": ["MNLI"]}, "mnli_start lists GLUE tasks other than MNLI"),
    ({"mnli_start_sizes": ["huge"]}, "mnli_start_sizes must be a list of base, large"),
    ({"grids": {}}, "unknown key(s) grids"),
])
def test_a_bad_protocol_is_refused_when_built(data, problem):
    with pytest.raises(RobertaError) as err:
        rp.Protocol.build(data, "grid.json")
    assert problem in str(err.value) and str(err.value).startswith("grid.json")


def test_a_grid_file_json_or_yaml(tmp_path):
    (tmp_path / "g.yaml").write_text("seeds: [3, 4]\ngrid:\n  lr: [1.0e-4, 2.0e-4]\nset:\n  max_epochs: 3\n")
    p = rp.protocol(str(tmp_path / "g.yaml"))
    assert p.seeds == (3, 4) and p.points["CoLA"] == ({"max_epochs": 3, "lr": 1e-4}, {"max_epochs": 3, "lr": 2e-4})
    (tmp_path / "g.json").write_text(json.dumps({"seeds": [3, 4], "grid": {"lr": [1e-4, 2e-4]}, "set": {"max_epochs": 3}}))
    assert rp.protocol(str(tmp_path / "g.json")).points == p.points
    (tmp_path / "bad.yaml").write_text("grid: [unclosed\n")
    with pytest.raises(RobertaError, match="is not valid YAML"):
        rp.protocol(str(tmp_path / "bad.yaml"))
    with pytest.raises(RobertaError, match="neither paper, fairseq nor a JSON/YAML file"):
        rp.protocol(str(tmp_path / "missing.json"))


def test_budget_cuts_are_checked_and_named(tmp_path):
    sweep = rp.Sweep(("SST-2",), "m", GLUE_DATA, tmp_path / "o", rp.protocol("paper"),
                     rp.Budget(seeds=2, lr=(2e-5,), batch_size=(32,)))
    assert [(r.point["lr"], r.point["batch_size"], r.seed) for r in sweep.runs] == [(2e-5, 32, 1), (2e-5, 32, 2)]
    assert sweep.cuts == ["seeds: 2 of the protocol's 5 (1, 2)", "SST-2: 1 of the grid's 6 settings"]
    with pytest.raises(RobertaError, match=r"--lr 5e-05: SST-2's grid has lr 1e-05, 2e-05, 3e-05"):
        rp.Sweep(("SST-2",), "m", GLUE_DATA, tmp_path / "o", rp.protocol("paper"), rp.Budget(lr=(5e-5,)))


def test_large_starts_rte_from_the_mnli_runs_of_the_sweep(tmp_path):
    """MNLI is added; RTE's commands wait for it; once MNLI's runs hold eval.json, RTE starts from the
    model of the best setting's lower-median run."""
    data = tmp_path / "glue"
    for task in ("MNLI", "RTE"):
        (data / task).mkdir(parents=True)
    sweep = rp.Sweep(("RTE",), "roberta.large", data, tmp_path / "out", rp.protocol("paper"), rp.Budget(seeds=2),
                     size="large")
    assert sweep.tasks == ("MNLI", "RTE") and "MNLI's runs are added" in sweep.notes[0]
    lines = sweep.commands()
    assert sum(line.startswith("roberta finetune --task MNLI") for line in lines) == 12
    assert not any("--task RTE" in line for line in lines) and "RTE start from the MNLI model" in lines[-1]
    scores = {}  # setting index -> seed -> accuracy: setting 3 has the best median
    for run in [r for r in sweep.runs if r.task == "MNLI"]:
        i = rp.protocol("paper").points["MNLI"].index(run.point)
        acc = 0.80 + 0.01 * i + 0.001 * run.seed
        run.out.mkdir(parents=True)
        (run.out / "recipe.json").write_text(run.recipe.to_json())
        (run.out / "eval.json").write_text(json.dumps({"task": "MNLI", "metric": "matched_accuracy",
                                                       "dev": {"matched_accuracy": acc}}))
        scores.setdefault(i, {})[run.seed] = acc
    assert sweep.resolve_mnli()
    best = max(scores, key=lambda i: statistics.median(scores[i].values()))
    chosen = next(r for r in sweep.runs if r.task == "MNLI" and r.seed == 1 and
                  r.point == rp.protocol("paper").points["MNLI"][best])  # the lower of two is seed 1's
    assert {r.model for r in sweep.runs if r.task == "RTE"} == {str(chosen.out / "model")}
    assert sum("--task RTE" in line and f"--model {chosen.out / 'model'}" in line for line in sweep.commands()) == 12


# --------------------------------------------------------------------------------------------------
# A real sweep


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "roberta", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def sweep_args(model, out, grid_file, *extra, tasks=("SST-2", "RTE")):
    return ["reproduce", *tasks, "--model", model, "--data", GLUE_DATA, "--out", out, "--grid", grid_file,
            "--data-fraction", FRACTION, "--device", "cpu", "--threads", 1, "--no-progress", *extra]


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


@pytest.fixture(scope="module")
def swept(tiny_mlm_dir, grid_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    table = rp.reproduce(["SST-2", "RTE"], str(tiny_mlm_dir), GLUE_DATA, out, str(grid_file),
                         rp.Budget(data_fraction=FRACTION), device="cpu", threads=1, progress=False)
    return out, table


def run_dirs(out):
    return sorted(p.parent for p in Path(out).glob("*/*/recipe.json"))


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.slow
def test_the_table_is_the_median_of_the_best_setting_from_the_runs_eval_files(swept):
    out, table = swept
    assert len(run_dirs(out)) == 8 and all((r / "eval.json").is_file() for r in run_dirs(out))
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(table))
    for row in table["tasks"]:
        by_setting = {}
        for run in (out / row["task"]).iterdir():
            result = json.loads((run / "eval.json").read_text())
            by_setting.setdefault(run.name.rsplit("-seed", 1)[0], []).append(100 * result["dev"][result["metric"]])
        assert sorted(by_setting) == sorted(s["name"] for s in row["settings"]) and len(by_setting) == 2
        medians = {name: statistics.median(v) for name, v in by_setting.items()}
        best = max(medians.values())
        best_scores = by_setting[row["settings"][row["best"]]["name"]]
        assert row["median"] == best and medians[row["settings"][row["best"]]["name"]] == best
        assert (row["min"], row["max"], row["seeds"]) == (min(best_scores), max(best_scores), 2)
        assert row["published"] is None  # a tiny model has no published number
    assert table["is_protocol"] is False
    md = (out / "table.md").read_text()
    assert "Not the paper's protocol" in md and "SST-2: 337 of 67349 training rows (0.005)" in md
    assert "RTE: 7 of 1244 training rows (0.005)" in md and "grid: grid.json, not the paper's sweep" in md
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def in_process(args, capsys) -> tuple[int, str, str]:
    """`roberta ARGS` in this process (what the command runs, without a second interpreter's start)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's workers (--threads 1): CPU results are bitwise at a thread count
    try:
        status = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow
def test_a_run_is_bitwise_the_run_of_its_printed_finetune_command(swept, tiny_mlm_dir, grid_file, tmp_path, capsys):
    out, _ = swept
    status, printed, _ = in_process(sweep_args(tiny_mlm_dir, out, grid_file, "--print-commands"), capsys)
    assert status == 0 and printed.startswith("# 8 runs, 8 done") and len(printed.splitlines()) == 1
    # the command of one run, from a fresh sweep directory (no run done there yet)
    status, printed, _ = in_process(sweep_args(tiny_mlm_dir, tmp_path / "fresh", grid_file, "--print-commands"), capsys)
    commands = [line for line in printed.splitlines() if line.startswith("roberta finetune")]
    assert status == 0 and len(commands) == 8
    status, printed, _ = in_process(sweep_args(tiny_mlm_dir, tmp_path / "fresh", grid_file, "--collect"), capsys)
    assert status == 0 and "- SST-2: 0 of 4 runs done" in printed and "| RTE | - | - | - | - | 0 | - | - |" in printed
    args = shlex.split(next(c for c in commands if "--task RTE" in c and "seed2" in c))
    ran = Path(args[args.index("--out") + 1])
    args[args.index("--out") + 1] = str(tmp_path / "direct")
    status, printed, err = in_process(args[1:], capsys)
    assert status == 0, err
    mine = out / "RTE" / ran.name
    assert json.loads((tmp_path / "direct" / "recipe.json").read_text()) == json.loads((mine / "recipe.json").read_text())
    a, b = weights(tmp_path / "direct"), weights(mine)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert json.loads((tmp_path / "direct" / "eval.json").read_text())["dev"] == json.loads((mine / "eval.json").read_text())["dev"]


@pytest.mark.slow
def test_kill_9_mid_sweep_then_rerun_completes_it_to_the_same_table(swept, tiny_mlm_dir, grid_file, tmp_path, capsys):
    reference, table = swept
    out = tmp_path / "killed"  # SST-2's four runs of the sweep above
    proc = cli(*sweep_args(tiny_mlm_dir, out, grid_file, tasks=("SST-2",)), start_new_session=True)
    while proc.poll() is None:  # kill when two runs are finished and another has saved a checkpoint
        dirs = run_dirs(out)
        if sum((d / "eval.json").is_file() for d in dirs) >= 2 and \
                any(not (d / "eval.json").is_file() and list(d.glob("checkpoints/step-*")) for d in dirs):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # its worker dies with it (PR_SET_PDEATHSIG)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker outlived the killed sweep")
    finished = [d for d in run_dirs(out) if (d / "eval.json").is_file()]
    unfinished = [d for d in run_dirs(out) if not (d / "eval.json").is_file()]
    assert len(finished) >= 2 and len(unfinished) == 1
    stamps = {f: f.stat().st_mtime_ns for d in finished for f in d.rglob("*") if f.is_file()}

    status, output, err = in_process(sweep_args(tiny_mlm_dir, out, grid_file, tasks=("SST-2",)), capsys)
    assert status == 0, err
    assert f"{len(finished)} of 4 runs already done; 1 resume, the rest start" in output
    log = out / "logs" / unfinished[0].parent.name / f"{unfinished[0].name}.log"
    assert "; resuming at update " in log.read_text()  # from its checkpoint, through finetune's --resume
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # finished runs untouched
    assert sum(line.startswith("done ") for line in output.splitlines()) == 4 - len(finished)
    again = json.loads((out / "table.json").read_text())
    assert again["tasks"] == json.loads(json.dumps([row for row in table["tasks"] if row["task"] == "SST-2"]))
    assert len(run_dirs(out)) == 4
    for run in run_dirs(out):  # every run, the resumed one included, bitwise the uninterrupted one
        run = reference / run.parent.name / run.name
        a, b = weights(run), weights(out / run.parent.name / run.name)
        assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_another_model_in_the_same_out_is_refused(swept, tiny_mlm_dir, tmp_path, grid_file, capsys):
    out, _ = swept
    (tmp_path / "other").symlink_to(tiny_mlm_dir)  # the same weights, but not the model the sweep names
    status, printed, err = in_process(sweep_args(tmp_path / "other", out, grid_file), capsys)
    assert status == 2 and printed == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {out} holds a sweep of model {tiny_mlm_dir}: give the same, or choose another --out")


def test_set_adds_a_setting_to_every_run_and_a_cut_unless_it_leaves_the_protocol_as_it_is(tmp_path):
    def sweep(**extra):
        return rp.Sweep(("RTE",), "m", GLUE_DATA, tmp_path / "o", rp.protocol("paper"), extra=extra)
    same = sweep(precision="bf16", update_freq="2")
    assert same.cuts == [] and all(r.recipe.precision == "bf16" and r.recipe.update_freq == 2 for r in same.runs)
    assert "--set update_freq=2" in shlex.join(same.runs[0].command())
    assert sweep(max_dev_examples="100").cuts == ["--set max_dev_examples=100: not the protocol's"]
    with pytest.raises(RobertaError, match="--set lr: the protocol and the budget choose lr, not --set"):
        sweep(lr="1e-5")


def test_bad_command_values_are_refused(tmp_path):
    with pytest.raises(RobertaError, match=r"--data-fraction 0: give a fraction in \(0, 1\]"):
        rp.Budget(data_fraction=0)
    with pytest.raises(RobertaError, match="--seeds 0: give 1 or more"):
        rp.Budget(seeds=0)
    with pytest.raises(RobertaError, match="--device cuda:1: use auto, cpu or cuda"):
        rp.reproduce(["RTE"], "m", GLUE_DATA, tmp_path / "o", device="cuda:1")
    with pytest.raises(RobertaError, match="unknown task 'SST3'"):
        rp.expand_tasks(["glue", "SST3"])
    assert rp.expand_tasks(["rte", "glue", "squad"]) == ("RTE", "MNLI", "QNLI", "QQP", "SST-2", "MRPC", "CoLA", "STS-B",
                                                         "squad")

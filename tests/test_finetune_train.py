"""Fine-tuning on the shared training layer: exact resume after kill -9, 2-process DDP equals one
process, bf16 reaches the fp32 score, headerless files, the plan, early stopping. Tiny models only."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from roberta import finetune as ft
from roberta import tasks

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = "good great fine lovely superb".split(), "bad awful poor dull boring".split()
FILLER = "the movie plot actor scene film story was is a an and with very quite".split()


def keyword_rows(n, seed):
    """A sentiment-like task a tiny model learns in a few epochs: one polar word among fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randrange(len(words)), rng.choice(GOOD if i % 2 else BAD))
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    return rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("keywords")
    for split, n, seed in (("train", 320, 0), ("dev", 200, 1)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(n, seed)))
    return path


# Checkpoints every 4 updates: 40 rows / batch 8 = 5 updates per epoch, 2 epochs = 10 updates.
SETTINGS = dict(max_epochs=2, batch_size=8, max_train_examples=40, max_dev_examples=16, save_every=4, log_every=1,
                lr=1e-3)


def run_cli(out, model, data, *extra, wait=True, torchrun=False, **settings):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    args = prefix + ["-m", "roberta", "finetune", "--task", "custom", "--data", str(data), "--model", str(model),
                     "--out", str(out), "--device", "cpu"]
    for k, v in {**SETTINGS, **settings}.items():
        args += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        proc.output = output
    return proc


def logged(out, key="loss"):
    path = Path(out) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if key in r]


@pytest.mark.slow
def test_kill_9_then_resume_gives_bitwise_the_same_best_and_last_weights(tiny_mlm_dir, task_dir, tmp_path):
    reference = tmp_path / "reference"
    run_cli(reference, tiny_mlm_dir, task_dir)
    out = tmp_path / "killed"
    proc = run_cli(out, tiny_mlm_dir, task_dir, wait=False)
    while not any(r["step"] >= 6 for r in logged(out)) and proc.poll() is None:  # past the checkpoint of update 4
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_cli(out, tiny_mlm_dir, task_dir, "--resume")
    assert "resuming at update" in resumed.output
    for name in ("model/model.safetensors", "checkpoints/step-00000010/model.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    steps = [r["step"] for r in logged(out)]
    assert steps == list(range(1, 11))  # the log was cut back to the checkpoint: no update twice
    assert json.loads((out / "eval.json").read_text())["dev"] == json.loads((reference / "eval.json").read_text())["dev"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]  # keep-last 1


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_mlm_dir, task_dir, tmp_path):
    """2 processes x 4 examples = 1 process accumulating 2 micro-batches of 4: same losses, same weights."""
    settings = dict(max_epochs=1, dropout=0.0, save_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(one, tiny_mlm_dir, task_dir, update_freq=2, **settings)
    result = run_cli(two, tiny_mlm_dir, task_dir, torchrun=True, **settings)
    assert "8 = 4 x 1 micro-steps x 2 process(es)" in result.output
    assert result.output.count('"best_step"') == 1  # the result, printed by the first process only
    for x, y in zip(logged(one), logged(two), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# One process's dev evaluation, or torchrun's share of it: the batches each process runs and what it gets back.
SHARED_EVAL = """
import json, sys, torch
from roberta import finetune as ft
from roberta.train import setup_distributed
d = setup_distributed("cpu")
recipe = ft.recipe_for("custom", device="cpu")
data = ft.load_task(recipe, sys.argv[1], None)
torch.manual_seed(0)  # the same new head in every process
model, data.tokenizer = ft.open_task_model(sys.argv[2], data.model_class, head_name="custom", **data.config_overrides())
data.recipe = ft._fit_max_len(recipe, model)
dev = [data.encode(examples[:36]) for examples in data.data["dev"]]
batches = []
model.register_forward_hook(lambda module, args, out: batches.append(out.logits.shape[0]))
preds, metrics = ft._split_metrics(data, data.files["dev"], dev, model, d.device, 8, d=d)
logits = ft.forward_all(model, data, dev[0], d.device, 8, d=d)["logits"]
with open(f"{sys.argv[3]}-{d.rank}.json", "w") as f:
    json.dump({"world": d.world, "batches": batches, "preds": [int(p) for p in preds[0]], "metrics": metrics,
               "logits": logits.tolist()}, f)
d.close()
"""


@pytest.mark.slow
def test_dev_evaluation_under_torchrun_shares_the_batches_and_equals_one_process(tiny_mlm_dir, task_dir, tmp_path):
    """Each of 2 processes runs half of the dev batches (36 rows in batches of 8: 5 batches, 3 and 2) and
    gets every prediction back: the logits and metrics of one process, to the bit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "shared_eval.py"
    script.write_text(SHARED_EVAL)
    for prefix, name in (([], "one"), (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two")):
        run = subprocess.run([sys.executable, *prefix, str(script), str(task_dir), str(tiny_mlm_dir), str(tmp_path / name)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    one = json.loads((tmp_path / "one-0.json").read_text())
    two = [json.loads((tmp_path / f"two-{rank}.json").read_text()) for rank in (0, 1)]
    assert one["world"] == 1 and [t["world"] for t in two] == [2, 2]
    assert len(one["batches"]) == 10 and sum(one["batches"]) == 72  # 5 batches, twice (metrics, then logits)
    assert [len(t["batches"]) for t in two] == [6, 4]  # batches 0, 2, 4 and 1, 3, each time
    assert sorted(one["batches"]) == sorted(two[0]["batches"] + two[1]["batches"])
    for t in two:
        assert t["logits"] == one["logits"] and t["preds"] == one["preds"] and t["metrics"] == one["metrics"]
    assert len(one["logits"]) == 36 and one["metrics"]["accuracy"] == sum(
        p == label for p, label in zip(one["preds"], [1 if i % 2 else 0 for i in range(36)])) / 36


def test_bf16_reaches_the_fp32_dev_score_within_a_point(tiny_mlm_dir, task_dir, tmp_path):
    scores = {}
    for precision in ("fp32", "bf16"):
        result = ft.finetune("custom", task_dir, tiny_mlm_dir, tmp_path / precision, precision=precision, max_epochs=4,
                             batch_size=16, dropout=0.0, device="cpu")
        assert result["plan"]["precision"] == precision
        scores[precision] = result["dev"]["accuracy"]
    assert scores["fp32"] > 0.9  # the task is learned (chance: 0.5)
    assert abs(scores["bf16"] - scores["fp32"]) <= 0.01, scores


def test_plan_is_derived_from_the_rows_read_and_logged_before_training(tiny_mlm_dir, task_dir, tmp_path, capsys):
    result = ft.finetune("RTE", ROOT.parent / "shared" / "data" / "glue" / "RTE", tiny_mlm_dir, tmp_path / "rte",
                         max_train_examples=48, max_dev_examples=8, max_epochs=2, log_every=1, device="cpu") \
        if (ROOT.parent / "shared" / "data" / "glue" / "RTE").is_dir() else pytest.skip("no ../shared/data/glue/RTE")
    plan = result["plan"]
    assert (plan["rows"], plan["updates_per_epoch"], plan["total_updates"], plan["warmup_updates"]) == (48, 3, 6, 0)
    assert plan["lr"] == 1e-3  # a 64-wide model: the published 2e-5 scaled, capped
    printed = capsys.readouterr().out
    assert "48 rows: 3 updates/epoch" in printed and "the published 2036/122 are for the official training set" in printed
    assert "set lr to choose" in printed
    first = json.loads((tmp_path / "rte" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["plan"] == plan
    lrs = [r["lr"] for r in logged(tmp_path / "rte")]
    assert lrs == pytest.approx([1e-3 * (1 - u / 6) for u in range(6)])  # no warmup, linear decay, last > 0


def test_early_stopping_keeps_the_best_checkpoint(tiny_mlm_dir, task_dir, tmp_path):
    result = ft.finetune("custom", task_dir, tiny_mlm_dir, tmp_path / "run", lr=0.0, max_epochs=5, patience=2,
                         max_train_examples=8, max_dev_examples=8, batch_size=8, device="cpu")
    # lr 0: the first score is never beaten, so two evaluations later the run stops
    assert result["stopped_early"] and result["updates"] == 3 and result["best_step"] == 1
    assert [r["step"] for r in logged(tmp_path / "run", "dev")] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "checksums.json").is_file()
    assert not list((tmp_path / "run").glob(".tmp-*"))


HEADERLESS = {
    "train.csv": "pos,\"a good, fine film\"\nneg,a dull film\npos,great\nneg,awful\n",
    "train.tsv": "pos\ta good film\nneg\ta dull film\npos\tgreat\nneg\tawful\n",
    "train.jsonl": '["pos", "a good film"]\n["neg", "a dull film"]\n["pos", "great"]\n["neg", "awful"]\n',
}


@pytest.mark.parametrize("name", sorted(HEADERLESS))
def test_headerless_files_by_column_position(tmp_path, name):
    path = tmp_path / name
    path.write_text(HEADERLESS[name])
    split, labels = tasks.read_table(path, ["1"], "0")
    assert labels == ["neg", "pos"] and len(split.examples) == 4  # the first row is data, not a header
    assert split.examples[0].label == 1 and split.examples[1].text_a == "a dull film"
    if name.endswith(".csv"):
        assert split.examples[0].text_a == "a good, fine film"  # quoting still applies
    with pytest.raises(tasks.TaskDataError, match="no value for column"):
        tasks.read_table(path, ["1"], "label")  # a name on a headerless file: the first row is taken as header


def test_headerless_csv_fine_tunes_from_the_cli(tiny_mlm_dir, tmp_path):
    from roberta.cli import main

    rows = keyword_rows(24, 3)
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("".join(f"{r['label']},{r['text']}\n" for r in rows))
    assert main(["finetune", "--task", "custom", "--data", str(tmp_path), "--model", str(tiny_mlm_dir), "--out",
                 str(tmp_path / "out"), "--text-columns", "1", "--label-column", "0", "--max-epochs", "1",
                 "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["plan"]["rows"] == 24 and result["updates"] == 1

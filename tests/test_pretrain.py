"""Pretraining (roberta/pretrain.py): schedule, exact resume after kill -9, DDP over gloo, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from roberta.errors import RobertaError
from roberta.pretrain import CHANGEABLE_ON_RESUME, PretrainConfig, pretrain
from test_data import synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on a synthetic corpus: 1.2K-token vocabulary, 32-token sequences, 8 per update.
TINY = dict(model="tiny", max_len=32, batch_size=8, micro_batch_size=4, lr=1e-3, warmup_updates=3, total_updates=12,
            clip_norm=1.0, val_samples=64, log_every=1, val_every=0, save_every=4, keep_last=2, threads=1,
            progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_docs=40, valid_docs=4)[0]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run of the TINY settings, to compare resumed runs against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_cli(out, corpus)
    return out


def config(corpus, **kw):
    return PretrainConfig.from_dict({**TINY, "data": str(corpus), **kw})


def run_cli(out, corpus, *extra, env=None, wait=True, **settings):
    args = [sys.executable, "-m", "roberta", "pretrain", "--preset", "tiny", "--data", str(corpus), "--out", str(out)]
    for k, v in {**TINY, **settings}.items():
        if k != "model":
            args += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(args + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    return proc


def torchrun(out, corpus, *extra, **settings):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "roberta", "pretrain", "--preset", "tiny", "--data", str(corpus), "--out", str(out)]
    args += [a for k, v in settings.items() if k != "model" for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args + list(extra), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights_bytes(out):
    return (Path(out) / "model" / "model.safetensors").read_bytes()


def logged_steps(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_presets_carry_the_paper_settings():
    base, large = PretrainConfig.preset("base"), PretrainConfig.preset("large")
    assert (base.lr, base.warmup_updates, large.lr, large.warmup_updates) == (6e-4, 24_000, 4e-4, 30_000)
    for cfg in (base, large):
        assert (cfg.batch_size, cfg.max_len, cfg.total_updates, cfg.adam_betas, cfg.adam_eps, cfg.weight_decay) == \
            (8192, 512, 500_000, (0.9, 0.98), 1e-6, 0.01)
    assert PretrainConfig.preset("small").with_sets(["lr=3e-4"]).lr == 3e-4
    with pytest.raises(RobertaError, match="unknown pretraining setting"):
        PretrainConfig.preset("small").with_sets(["learning_rate=1"])


@pytest.mark.slow
def test_kill_9_and_resume_gives_bitwise_the_same_weights(corpus, reference, tmp_path):

    # killed between checkpoints: after step 6 is logged, step 4 is the latest checkpoint
    out = tmp_path / "killed"
    proc = run_cli(out, corpus, wait=False)
    while not any(s >= 6 for s in logged_steps(out)) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model").exists()
    run_cli(out, corpus, "--resume")
    assert weights_bytes(out) == weights_bytes(reference)
    steps = logged_steps(out)
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 12  # the log has no repeated steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]


def kill_while_writing(proc, root: Path, moment) -> tuple[int, list[str]]:
    """kill -9 at a moment seen from outside: a checkpoint (after the first) is being written in its
    temporary directory beside the others, and `moment(files in it)` holds. The run is stopped there
    (SIGSTOP) to look again; if that is still so it is killed, else let go on. Returns the step and the
    files the temporary directory held."""
    def look():
        try:
            tmp = next(root / n for n in os.listdir(root) if n.startswith(".step-"))
            step, files = int(tmp.name[6:14]), sorted(os.listdir(tmp))
        except (FileNotFoundError, StopIteration):
            return None
        return (step, files) if step >= 4 and moment(files) and not (root / f"step-{step:08d}").exists() else None

    stat = Path(f"/proc/{proc.pid}/stat")
    try:
        while proc.poll() is None:
            if look() is None:
                time.sleep(0.0005)
                continue
            proc.send_signal(signal.SIGSTOP)
            while proc.poll() is None and stat.read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
                time.sleep(0.0002)  # until it stands still
            caught = look()
            if caught:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return caught
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    raise AssertionError(f"the run ended before a checkpoint was caught being written: {proc.stdout.read()[-2000:]}")


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint(corpus, reference, tmp_path):
    """Killed twice while a checkpoint is written (once with some of its files written, once with all of
    them and their checksums but before the rename), then resumed: the checkpoint being written is absent,
    never half there, the older ones are whole, and the weights end bitwise those of an uninterrupted run.
    (A checkpoint every 2 updates rather than 4 changes nothing in the weights, which is checked too.)"""
    from roberta.train import verify_dir

    out, root = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    moments = {"files written": lambda files: "trainer.pt" in files and "checksums.json" not in files,
               "checksums written": lambda files: "checksums.json" in files}
    for i, moment in enumerate(moments.values()):
        proc = run_cli(out, corpus, *(["--resume"] if i else []), wait=False, save_every=2)
        step, files = kill_while_writing(proc, root, moment)
        assert proc.returncode == -signal.SIGKILL
        older = sorted(p.name for p in root.glob("step-*"))
        assert older == [f"step-{s:08d}" for s in (step - 4, step - 2) if s > 0], (step, files)
        for name in older:
            verify_dir(root / name)  # whole: every file matches its checksum
        assert len(list(root.glob(f".step-{step:08d}.tmp-*"))) == 1  # the killed write's debris
        assert not (out / "model").exists()
    run_cli(out, corpus, "--resume", save_every=2)
    assert weights_bytes(out) == weights_bytes(reference)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000012"]  # debris removed


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(corpus, tmp_path, fsdp):
    """torchrun with 2 CPU processes accumulating 2 x 4 sequences equals 1 process accumulating 4 x 4."""
    settings = dict(TINY, batch_size=16, dropout=0.0, total_updates=3, save_every=3, val_every=3, fsdp=fsdp)
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(config(corpus, **dict(settings, fsdp=False)), one)
    result = torchrun(two, corpus, **settings)
    assert "2 process(es)" in result.stdout
    # the same loss and (all-reduced) gradient norm at every step: the two batches are split, not scaled
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    for x, y in zip(*logs):
        assert x["step"] == y["step"]
        if "valid" in x:  # validation is split over the processes too
            assert x["valid"]["loss"] == pytest.approx(y["valid"]["loss"], rel=1e-5)
            assert x["valid"]["acc"] == y["valid"]["acc"]
            continue
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_process_fsdp_run_resumes_exactly(corpus, tmp_path):
    """Sharded weights and optimizer state, and each process's dropout stream, survive a restart."""
    settings = dict(TINY, batch_size=16, total_updates=4, save_every=2, val_every=2, fsdp=True)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(full, corpus, **settings)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")  # as if stopped after step 2's checkpoint
    torchrun(resumed, corpus, "--resume", **settings)
    assert weights_bytes(resumed) == weights_bytes(full)


def test_output_directory_of_another_run_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain(config(corpus, total_updates=2, save_every=2), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RobertaError, match="holds another run.*--resume"):
        pretrain(config(corpus, total_updates=2), out)
    with pytest.raises(RobertaError, match="with other settings: lr is 0.001 in the run, 0.005 here"):
        pretrain(config(corpus, lr=5e-3), out, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RobertaError, match="not empty"):
        pretrain(config(corpus), tmp_path / "other")
    with pytest.raises(RobertaError, match="nothing to resume"):
        pretrain(config(corpus), tmp_path / "other", resume=True)


def test_resume_takes_the_run_settings_and_names_one_given_again_that_differs(corpus, tmp_path, capsys):
    from roberta.cli import main

    out = tmp_path / "run"
    start = ["pretrain", "--preset", "tiny", "--data", str(corpus), "--out", str(out)]
    sets = [a for k, v in {**TINY, "total_updates": 2, "save_every": 2}.items() if k != "model"
            for a in ("--set", f"{k}={v}")]
    assert main(start + sets) == 0
    first = json.loads((out / "pretrain.json").read_text())
    # the preset and data again, without the --set items: the run's own settings, continued to 4 updates
    assert main(start + ["--resume", "--set", "total_updates=4"]) == 0
    assert logged_steps(out)[-1] == 4 and json.loads((out / "pretrain.json").read_text()) == {**first, "total_updates": 4}
    assert main(["pretrain", "--out", str(out), "--resume", "--set", "total_updates=5"]) == 0  # --out alone too
    capsys.readouterr()
    assert main(start + ["--resume", "--set", "warmup_updates=9"]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot resume {out} with other settings: warmup_updates is 3 in the run, 9 here; "
        f"`roberta pretrain --out {out} --resume` continues it with its own (only "
        f"{', '.join(sorted(CHANGEABLE_ON_RESUME))} may change)\n")
    assert main(["pretrain", "--preset", "base", "--out", str(out), "--resume"]) == 2
    assert "model is 'tiny' in the run, 'base' here" in capsys.readouterr().err


def test_missing_or_corrupt_checkpoint_at_resume(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain(config(corpus, total_updates=4, save_every=2), out)
    with pytest.raises(RobertaError, match="does not exist or is incomplete"):
        pretrain(config(corpus, total_updates=6), out, resume=str(out / "checkpoints" / "step-00000003"))
    with pytest.raises(RobertaError, match="newer than step-00000002"):
        pretrain(config(corpus, total_updates=6), out, resume=str(out / "checkpoints" / "step-00000002"))
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RobertaError, match="step-00000004 is unreadable.*remove it"):
        pretrain(config(corpus, total_updates=6), out, resume=True)


def test_non_finite_loss_is_reported(corpus, tmp_path):
    with pytest.raises(RobertaError, match="loss became (nan|inf) at update"):
        pretrain(config(corpus, lr=1e12, warmup_updates=1, total_updates=50, save_every=100), tmp_path / "run")


@pytest.fixture(scope="module")
def text_corpora(tmp_path_factory):
    """Two small corpora of generated English, each with its own trained vocabulary."""
    from roberta.data import preprocess

    root = tmp_path_factory.mktemp("text")
    words = "the cat dog bird sat ran flew on under over a mat tree house quickly slowly today".split()
    rng = __import__("random").Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "." for _ in range(1500)]
    (root / "a.txt").write_text("\n\n".join(lines))
    (root / "b.txt").write_text("\n\n".join(lines[::-1]).upper())
    for name, vocab in (("a", 300), ("b", 320)):
        preprocess([root / f"{name}.txt"], root / name, vocab_size=vocab, valid_fraction=0.05, workers=1,
                   progress=False)
    return root / "a", root / "b"


def test_continued_pretraining_starts_from_the_checkpoint(text_corpora, tmp_path):
    first = tmp_path / "first"
    pretrain(config(text_corpora[0], total_updates=4, save_every=4), first)
    second = tmp_path / "second"
    pretrain(config(text_corpora[0], init_from=str(first / "model"), total_updates=1, save_every=1, lr=0.0), second)
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    for key in a:  # lr 0 at the one step: weights unchanged
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    import roberta
    assert roberta.load(second / "model").fill_mask("The cat sat on the <mask>.", topk=2)  # a usable model


def test_corpus_tokenized_with_another_vocabulary_is_refused(text_corpora, tmp_path):
    pretrain(config(text_corpora[0], total_updates=1, save_every=1), tmp_path / "a")
    with pytest.raises(RobertaError, match="tokenized with another vocabulary.*--vocab"):
        pretrain(config(text_corpora[1], init_from=str(tmp_path / "a" / "model")), tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.slow
def test_wikitext_validation_loss_falls_below_the_unigram_baseline(tmp_path):
    """A tiny model on WikiText-2: masked-LM loss falls far below its start and below what token
    frequencies alone give (the unigram cross-entropy), so it learned to use the context."""
    import numpy as np

    from conftest import shared_path
    from roberta.data import preprocess

    data = tmp_path / "data"
    meta = preprocess([shared_path("corpus", "wikitext2-valid.txt")], data, vocab_size=2048, valid_fraction=0.05,
                      progress=False)
    train = np.fromfile(data / "train-00000.bin", dtype=np.uint16)
    valid = np.fromfile(data / "valid-00000.bin", dtype=np.uint16)
    train, valid = train[train > 3], valid[valid > 3]  # the masked positions are real tokens only
    unigram = np.bincount(train, minlength=meta["vocab_size"]) + 1.0
    unigram_ce = -np.log(unigram[valid] / unigram.sum()).mean()

    out = tmp_path / "run"
    pretrain(PretrainConfig.preset("tiny", data=str(data), max_len=64, batch_size=32, micro_batch_size=32, lr=3e-3,
                                   warmup_updates=30, total_updates=400, dropout=0.0, val_every=400, save_every=400,
                                   threads=1, progress=False), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in rows if "valid" in r]
    (first_step, first), (last_step, last) = [(r["step"], r["valid"]) for r in (validations[0], validations[-1])]
    assert (first_step, last_step) == (0, 400)
    assert last["loss"] < 0.8 * first["loss"]
    assert last["loss"] < unigram_ce - 0.3, (last["loss"], unigram_ce)
    assert last["acc"] > 0.1 and last["ppl"] == pytest.approx(np.exp(last["loss"]))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[1])


def test_activation_checkpointing_and_mixed_precision(corpus, tmp_path):
    """Recomputing activations changes memory, not results; bf16 and fp16 (with loss scaling) train."""
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    pretrain(config(corpus, total_updates=2, save_every=2, dropout=0.0), plain)
    pretrain(config(corpus, total_updates=2, save_every=2, dropout=0.0, activation_checkpointing=True), recomputed)
    a, b = load_file(plain / "model" / "model.safetensors"), load_file(recomputed / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        pretrain(config(corpus, total_updates=3, save_every=3, precision=precision), out)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 3 and all(7 < loss < 8 for loss in losses)  # ln(1.2K vocab) = 7.1 at the start
    trainer = torch.load(tmp_path / "fp16" / "checkpoints" / "step-00000003" / "trainer.pt", weights_only=True)
    assert trainer["scaler"]["scale"] > 0  # the loss scale is part of the checkpoint


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """`make demo` in miniature: corpus, BPE, pretraining, fill-mask, fine-tuning, all written under out."""
    from roberta.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, steps=20, vocab_size=1000)
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "dev accuracy on 600 sentences" in printed
    assert "POST /predict" in printed and "stopped with SIGTERM: exit status 0" in printed  # served, then stopped
    for path in ("pretrain/model/model.safetensors", "pretrain/metrics.jsonl", "pretrain/curves.png",
                 "finetune/pretrained/eval.json", "finetune/from-scratch/eval.json"):
        assert (out / path).is_file(), path
    assert str(out / "pretrain" / "model") in printed
    (out / "mine.txt").write_text("keep")  # the demo replaces its own earlier output, nothing else
    with pytest.raises(RobertaError, match="holds files the demo did not write"):
        run_demo(out, steps=2)
    assert (out / "mine.txt").read_text() == "keep"

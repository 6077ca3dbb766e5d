"""Issue 11's training faults, as a hostile user meets them: each bad input to pretrain, finetune and
evaluate is one `error: ...` line with exit status 2, before any work, and the files on disk are as
they were (or absent)."""
import json
from pathlib import Path

import pytest

from roberta.cli import main
from test_data import synthetic_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_docs=20, valid_docs=2)[0]


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("custom")
    rows = "text,label\na good film,pos\na dull film,neg\n"
    (path / "train.csv").write_text(rows)
    (path / "dev.csv").write_text(rows)
    return path


def snapshot(*roots):
    return {p: p.read_bytes() for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


PRETRAIN_BAD = [
    (["--set", "micro_batch_size=-1"], "micro_batch_size=-1 is out of range"),
    (["--set", "batch_size=0"], "batch_size=0 is out of range"),
    (["--set", "mask_prob=2"], "mask_prob=2.0 is out of range"),
    (["--set", "max_len=100000"], "max_len 100000 exceeds RoBERTa's 512 positions"),
    (["--set", "lr=abc"], "lr='abc' is not a valid float"),
    (["--set", "keep_last=0"], "keep_last=0 is out of range"),
    (["--set", "precision=fp64"], "precision='fp64' is not one of fp32, bf16, fp16"),
    (["--set", "batch_size=10", "--set", "micro_batch_size=4"], "batch_size 10 is not a multiple"),
    (["--set", "threads=-3"], "threads=-3 is out of range"),
    (["--set", "nonsense=1"], "unknown pretraining setting 'nonsense'"),
    (["--set", "device=quantum"], "unknown device 'quantum'"),
    (["--set", "device=cuda:7"], "device 'cuda:7'"),
]


@pytest.mark.parametrize("extra,message", PRETRAIN_BAD, ids=[" ".join(e) for e, _ in PRETRAIN_BAD])
def test_pretrain_bad_settings(corpus, tmp_path, capsys, extra, message):
    code, err = run(["pretrain", "--preset", "tiny", "--data", corpus, "--out", tmp_path / "run"] + extra, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pretrain_output_paths_and_saved_state(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, err = run(["pretrain", "--preset", "tiny", "--data", corpus, "--out", tmp_path / "file"], capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "file").read_text() == "mine"

    out = tmp_path / "run"
    settings = ["--set", "total_updates=2", "--set", "save_every=2", "--set", "val_every=0", "--set", "progress=false",
                "--set", "max_len=32", "--set", "batch_size=4", "--set", "micro_batch_size=4", "--set", "threads=1"]
    assert run(["pretrain", "--preset", "tiny", "--data", corpus, "--out", out] + settings, capsys)[0] == 0
    before = snapshot(out)
    # a stray folder under checkpoints/ is not a checkpoint: resuming ignores it
    (out / "checkpoints" / "step-foo").mkdir()
    assert run(["pretrain", "--out", out, "--resume", "--set", "total_updates=2"], capsys)[0] == 0
    # a flipped bit in the checkpoint: one line, nothing resumed, nothing changed
    weights = out / "checkpoints" / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    code, err = run(["pretrain", "--out", out, "--resume", "--set", "total_updates=4"], capsys)
    assert code == 2 and "model.safetensors does not match its checksum" in err and "remove it" in err
    assert not (out / "checkpoints" / "step-00000004").exists()
    # a corrupt pretrain.json
    (out / "pretrain.json").write_text("{not json")
    code, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 2 and "pretrain.json is not a valid settings file" in err
    (out / "pretrain.json").write_text(json.dumps({"lr": "fast"}))
    code, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 2 and "lr='fast' is not a valid float" in err
    assert (out / "model" / "model.safetensors").read_bytes() == before[out / "model" / "model.safetensors"]


FINETUNE_BAD = [
    (["--set", "lr=abc"], "lr='abc' is not a valid float"),
    (["--batch-size", "0"], "batch_size=0 is out of range"),
    (["--lr", "-1"], "lr=-1.0 is out of range"),
    (["--device", "quantum"], "unknown device 'quantum'"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
    (["--set", "update_freq=3"], "batch_size 32 is not a multiple of update_freq"),
    (["--set", "adam_betas=0.9,2"], "adam_betas=0.9,2.0 is out of range"),
    (["--set", "precision=int8"], "precision='int8' is not one of"),
    (["--set", "header=maybe"], "header='maybe' is not one of auto, yes, no"),
    (["--set", "warmup_updates=-1"], "warmup_updates=-1 is out of range"),
]


@pytest.mark.parametrize("extra,message", FINETUNE_BAD, ids=[" ".join(e) for e, _ in FINETUNE_BAD])
def test_finetune_bad_settings(tiny_mlm_dir, custom_data, tmp_path, capsys, extra, message):
    before = snapshot(tiny_mlm_dir)
    code, err = run(["finetune", "--task", "custom", "--data", custom_data, "--model", tiny_mlm_dir,
                     "--out", tmp_path / "run"] + extra, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists() and snapshot(tiny_mlm_dir) == before


def test_finetune_refuses_to_write_over_its_model(tiny_mlm_dir, custom_data, tmp_path, capsys):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in tiny_mlm_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = snapshot(copy)
    for out in (copy, copy.parent):
        code, err = run(["finetune", "--task", "custom", "--data", custom_data, "--model", copy, "--out", out], capsys)
        assert code == 2 and ("is the input" in err or "holds the input" in err), err
    assert snapshot(copy) == before


@pytest.mark.parametrize("content,message", [
    ("text,label\na,1.5\nb,nan\n", "train.csv:3: label 'nan' is not a finite number"),
    ("text,label\na,inf\n", "train.csv:2: label 'inf' is not a finite number"),
    ("text,label\na,1\nb,\n", "train.csv:3: label '' is not a number"),
])
def test_regression_labels_must_be_finite_numbers(tiny_mlm_dir, tmp_path, capsys, content, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text(content)
    (tmp_path / "data" / "dev.csv").write_text("text,label\na,1\n")
    code, err = run(["finetune", "--task", "custom", "--data", tmp_path / "data", "--model", tiny_mlm_dir,
                     "--out", tmp_path / "run", "--problem-type", "regression"], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_invalid_utf8_names_the_file_and_line(tiny_mlm_dir, tmp_path, capsys, suffix):
    data = tmp_path / "data"
    data.mkdir()
    sep = "\t" if suffix == ".tsv" else ","
    good = '{"text": "fine", "label": "a"}\n' if suffix == ".jsonl" else f"text{sep}label\nfine{sep}a\n"
    (data / f"dev{suffix}").write_text(good)
    (data / f"train{suffix}").write_bytes(good.encode() + good.splitlines()[-1].encode().replace(b"fine", b"caf\xe9")
                                          + b"\n")
    code, err = run(["finetune", "--task", "custom", "--data", data, "--model", tiny_mlm_dir, "--out", tmp_path / "run"],
                    capsys)
    line = 2 if suffix == ".jsonl" else 3
    assert code == 2 and f"train{suffix}:{line}: byte 0xe9 is not valid UTF-8" in err, err


def test_evaluate_without_the_task_head_and_into_a_missing_directory(tiny_mlm_dir, custom_data, tmp_path, capsys):
    code, err = run(["evaluate", "--task", "custom", "--data", custom_data, "--model", tiny_mlm_dir,
                     "--out", tmp_path / "m.json"], capsys)
    assert code == 2 and "has no trained custom head" in err and not (tmp_path / "m.json").exists()
    code, err = run(["evaluate", "--task", "custom", "--data", custom_data, "--model", tiny_mlm_dir,
                     "--predictions", tmp_path / "missing" / "p.tsv"], capsys)
    assert code == 2 and "the directory" in err and "does not exist" in err


def test_finetune_run_directory_rules(tiny_mlm_dir, custom_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--task", "custom", "--data", custom_data, "--model", tiny_mlm_dir, "--out", out,
            "--max-epochs", "1", "--device", "cpu"]
    assert run(args, capsys)[0] == 0
    before = snapshot(out)
    code, err = run(args, capsys)
    assert code == 2 and "holds another run: pass --resume" in err
    code, err = run(args + ["--resume", "--lr", "0.5"], capsys)
    assert code == 2 and err == (f"error: cannot resume {out} with other settings: lr is None in the run, 0.5 here; "
                                 f"`roberta finetune --task custom --data DATA --model MODEL --out {out} --resume` "
                                 "continues it with its own (only device, log_every may change)")
    assert snapshot(out) == before
    # the old names of settings still work and say the new one
    code = main([str(a) for a in args[:-2]] + ["--out", str(tmp_path / "other"), "--set", "clip_grad=1"])
    assert code == 0 and "'clip_grad' is now called 'clip_norm'" in capsys.readouterr().out
    assert json.loads((tmp_path / "other" / "recipe.json").read_text())["clip_norm"] == 1.0


def test_help_lists_the_settings(capsys):
    for command in ("pretrain", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "settings for --set KEY=VALUE" in text and "warmup_updates=" in text and "adam_betas=" in text

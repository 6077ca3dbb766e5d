"""Faults in streaming jobs and long inputs (roberta/jobs.py, `roberta features/predict`): a resumed
job whose input or model changed, damaged shards, byte-order marks, pairs cut to the model's limit,
and single lines of many megabytes. Each row asserts exit 2 with one `error:` line naming what
changed, or the right result; the memory rows assert peak memory in a fresh process."""
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import roberta
from roberta import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer, jobs
from roberta.cli import main as cli_main
from roberta.errors import RobertaError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta river stone light night green small house music".split()


def save_model(directory, bpe_dir, seed: int = 0, **config):
    """A small RoBERTa with the real vocabulary and an mnli head (max_tokens 64 unless told)."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=50265, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=66)
    model = RobertaForMaskedLM(RobertaConfig(**{**sizes, **config}))
    model.register_classification_head("mnli", 3)
    model.eval().save_pretrained(directory, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir):
    return save_model(tmp_path_factory.mktemp("jobs-faults") / "model", bpe_dir)


@pytest.fixture(scope="module")
def hub(model_dir):
    return roberta.load(model_dir, precision="fp32")


def lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(WORDS[j] for j in row) for i, row in enumerate(rng.integers(0, 12, size=(n, 5)))]


def call(capsys, monkeypatch, *args, stdin: bytes | None = None, job: bool = True) -> tuple[int, str]:
    """The command in this process: (exit status, the one error line or '')."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    code = cli_main([str(a) for a in args] + (["--precision", "fp32", "--no-progress"] if job else []))
    out, err = capsys.readouterr()
    call.out = out
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    if code:
        assert len(errors) == 1 and errors[0].startswith("error: "), err
    return code, errors[0] if errors else ""


def digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.name != "metrics.jsonl"}


# ---- resuming a job: content identity ----------------------------------------------------------
# Each row changes one thing after a job ran (finished, or cut short: index.json and the last shard
# gone, as a kill leaves it) and resumes it. 3,000 lines: past the first 64 KiB of the file.

def edit_input_in_place(case):
    data = bytearray(case["input"].read_bytes())
    assert len(data) > 1 << 16
    data[-3] = ord("x") if data[-3] != ord("x") else ord("y")  # the last line, same size
    case["input"].write_bytes(bytes(data))


def retrain_model_in_place(case):
    save_model(case["model"], case["bpe_dir"], seed=1)


def swap_two_lines(case):
    texts = case["input"].read_text().splitlines()
    texts[0], texts[1] = texts[1], texts[0]
    case["input"].write_text("".join(t + "\n" for t in texts))


RESUME_CHANGES = [
    ("input edited past 64 KiB, same size", edit_input_in_place, "the input's content changed since the job started"),
    ("input lines swapped, same bytes", swap_two_lines, "the input's content changed since the job started"),
    ("model retrained in place", retrain_model_in_place, "the model's files (weights, config or tokenizer) changed"),
]


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "cut-short"])
@pytest.mark.parametrize("name, change, message", RESUME_CHANGES, ids=[r[0] for r in RESUME_CHANGES])
def test_resume_refuses_a_changed_input_or_model(bpe_dir, tmp_path, capsys, monkeypatch, finished, name, change,
                                                 message):
    case = {"model": save_model(tmp_path / "model", bpe_dir), "bpe_dir": bpe_dir,
            "input": tmp_path / "in.txt"}
    case["input"].write_text("".join(t + "\n" for t in lines(3000)))
    out = tmp_path / "out"
    job = ("features", "-m", case["model"], "-i", case["input"], "-o", out, "--shard-rows", 1000)
    assert call(capsys, monkeypatch, *job) == (0, "")
    if not finished:
        (out / "index.json").unlink()
        (out / "features-00002.npy").unlink()
    before = digests(out)
    change(case)
    code, error = call(capsys, monkeypatch, *job, "--resume")
    assert code == 2 and message in error and str(out) in error, error
    assert digests(out) == before  # nothing mixed in


def stdin_job(capsys, monkeypatch, out, model, data: bytes, *more):
    return call(capsys, monkeypatch, "features", "-m", model, "-o", out, "--shard-rows", 2, *more, stdin=data)


STDIN_CHANGES = [
    ("other content", b"".join(f"{t}\n".encode() for t in lines(5, seed=1)), "stdin lines 1-2 differ from those"),
    ("one line changed", b"".join(f"{t}\n".encode() for t in lines(4)) + b"other\n", "stdin lines 5-5 differ"),
    ("a shard's lines fewer", b"".join(f"{t}\n".encode() for t in lines(3)), "stdin lines 3-3 differ"),
    ("a shard fewer", b"".join(f"{t}\n".encode() for t in lines(4)), "stdin ended after 4 rows"),
    ("a line added", b"".join(f"{t}\n".encode() for t in lines(6)), "stdin lines 5-6 differ"),
]


@pytest.mark.parametrize("name, data, message", STDIN_CHANGES, ids=[r[0] for r in STDIN_CHANGES])
def test_resume_from_stdin_checks_each_shard_against_the_lines_it_reads(model_dir, tmp_path, capsys, monkeypatch,
                                                                       name, data, message):
    first = b"".join(f"{t}\n".encode() for t in lines(5))
    out = tmp_path / "out"
    assert stdin_job(capsys, monkeypatch, out, model_dir, first) == (0, "")
    before = digests(out)
    code, error = stdin_job(capsys, monkeypatch, out, model_dir, data, "--resume")
    assert code == 2 and message in error, error
    assert digests(out) == before
    # the same stdin again resumes (here: finds every shard done and checked) with the same files
    assert stdin_job(capsys, monkeypatch, out, model_dir, first, "--resume") == (0, "")
    assert digests(out) == before


def delete(path):
    path.unlink()


def truncate(path):
    path.write_bytes(path.read_bytes()[:-4])


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x10  # inside a float of the last row: the shape still reads
    path.write_bytes(bytes(data))


SHARD_DAMAGE = [
    ("shard deleted", "features-00001.npy", delete, "features-00001.npy is missing", None),
    ("shard truncated", "features-00001.npy", truncate, "features-00001.npy is damaged", "is damaged"),
    ("a bit flipped", "features-00001.npy", flip_a_bit, "features-00001.npy is damaged", "is damaged"),
    ("record deleted", "features-00001.json", delete, "features-00001.npy is damaged", "is missing"),
]


@pytest.mark.parametrize("name, file, damage, load_error, resume_error", SHARD_DAMAGE,
                         ids=[r[0] for r in SHARD_DAMAGE])
def test_a_damaged_shard_of_a_finished_job_is_detected(model_dir, hub, tmp_path, capsys, monkeypatch, name, file,
                                                       damage, load_error, resume_error):
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in lines(5)))
    out = tmp_path / "out"
    job = ("features", "-m", model_dir, "-i", source, "-o", out, "--shard-rows", 2)
    assert call(capsys, monkeypatch, *job) == (0, "")
    whole, rows = digests(out), jobs.load_rows(out).copy()
    damage(out / file)
    if file.endswith(".npy"):
        with pytest.raises(RobertaError, match=load_error):
            jobs.load_rows(out)
    code, error = call(capsys, monkeypatch, *job, "--resume")
    if resume_error is None:  # a missing shard is computed again: the job is whole, as it was
        assert code == 0 and digests(out) == whole
        np.testing.assert_array_equal(jobs.load_rows(out), rows)
    else:
        assert code == 2 and resume_error in error and file.replace(".json", "") in error, error
        assert (out / "index.json").is_file()  # left as it was, for the user to mend as told


def test_every_shard_and_its_input_lines_have_checksums_in_the_index(model_dir, hub, tmp_path):
    source = tmp_path / "in.txt"
    texts = lines(5)
    source.write_text("".join(t + "\n" for t in texts))
    index = jobs.run(hub, "features", str(source), tmp_path / "out", shard_rows=2, progress=False)
    import xxhash

    for k, shard in enumerate(index["shards"]):
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert shard["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)
        assert shard["input_xxh3_128"] == xxhash.xxh3_128_hexdigest("".join(t + "\n" for t in texts[2 * k:2 * k + 2]).encode())
    settings = json.loads((tmp_path / "out" / "job.json").read_text())
    assert settings["input_xxh3_128"] == xxhash.xxh3_128_hexdigest(source.read_bytes())
    assert settings["model_xxh3_128"] == jobs.model_digest(hub)


# ---- a byte-order mark is not text ---------------------------------------------------------------

BOM_INPUTS = [
    ("text", "in.txt", "Hello world!\nHi\n"),
    ("tsv", "in.tsv", "Hello world!\tHi\nA\tB\n"),
    ("jsonl", "in.jsonl", '{"text": "Hello world!"}\n{"text": "Hi"}\n'),
]


@pytest.mark.parametrize("format, name, text", BOM_INPUTS, ids=[r[0] for r in BOM_INPUTS])
@pytest.mark.parametrize("via", ["file", "stdin"])
@pytest.mark.parametrize("out", ["f.npy", "shards"])
def test_a_byte_order_mark_is_stripped_not_tokenized(model_dir, tmp_path, capsys, monkeypatch, format, name, text,
                                                     via, out):
    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    results = []
    for source in (plain, marked):
        target = tmp_path / f"{source.stem}-{out}"
        args = ("features", "-m", model_dir, "-o", target, "--format", format)
        if via == "file":
            assert call(capsys, monkeypatch, *args, "-i", source) == (0, "")
        else:
            assert call(capsys, monkeypatch, *args, stdin=source.read_bytes()) == (0, "")
        results.append(np.load(target) if out.endswith(".npy") else jobs.load_rows(target))
    np.testing.assert_array_equal(results[1], results[0])


@pytest.mark.parametrize("command", ["encode", "predict"])
def test_the_other_commands_read_no_byte_order_mark(model_dir, capsys, monkeypatch, command):
    outputs = []
    for data in (b"Hello world!\n", b"\xef\xbb\xbfHello world!\n"):
        assert call(capsys, monkeypatch, command, "-m", model_dir, "--json", stdin=data, job=False) == (0, "")
        outputs.append(json.loads(call.out))
    assert outputs[1] == outputs[0]
    if command == "encode":
        assert outputs[0] == [0, 31414, 232, 328, 2]

"""The `roberta` command for using a model, run as a subprocess as a person or a script would."""
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
from roberta.cli import main
from hub_helpers import FileServer, serve_models

ROOT = Path(__file__).resolve().parents[1]


def run(*args, stdin=None, env=None):
    """`python -m roberta ARGS` in a fresh process, as a person at a terminal runs it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "roberta", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=environment, timeout=120)


@pytest.fixture
def call(capsys, monkeypatch):
    """The same command in this process (a fresh interpreter per call would make the suite slow)."""
    def call(*args, stdin=None, env=None):
        monkeypatch.setenv("ROBERTA_OFFLINE", "1")
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        capsys.readouterr()
        returncode = main(list(map(str, args)))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out, err)
    return call


def test_help_documents_the_exit_codes():
    result = run("--help")
    assert result.returncode == 0
    for command in ("encode", "decode", "fill-mask", "features", "predict", "download", "info"):
        assert command in result.stdout
    assert "2 bad input" in result.stdout and "1 unexpected" in result.stdout


def test_encode_arguments_stdin_pairs_and_json(hub_checkpoints):
    result = run("encode", "-m", hub_checkpoints["hf"], "Hello world!", "Hi\tHello world!")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0 31414 232 328 2", "0 30086 2 2 31414 232 328 2"]
    result = run("encode", "-m", hub_checkpoints["fairseq_bpe"], "--json", stdin="Hello world!\n\nHi\n")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [[0, 31414, 232, 328, 2], [0, 30086, 2]]


def test_decode_arguments_and_stdin(hub_checkpoints, call):
    result = call("decode", "-m", hub_checkpoints["hf"], "0", "31414", "232", "328", "2")
    assert result.stdout == "Hello world!\n"
    result = call("decode", "-m", hub_checkpoints["hf"], "--json", stdin="[0, 30086, 2, 2, 31414, 232, 2]\n0 30086 2\n")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [["Hi", "Hello world"], "Hi"]


def test_fill_mask_json_objects_match_the_library(hub_checkpoints, tiny_hub, call):
    texts = ["Hello <mask>!", "The <mask> sat on the <mask>."]
    result = run("fill-mask", "-m", hub_checkpoints["hf"], "--json", "--topk", 3, "--precision", "fp32", stdin="\n".join(texts) + "\n")
    assert result.returncode == 0, result.stderr
    for line, text in zip(result.stdout.splitlines(), texts):
        got, expected = json.loads(line), tiny_hub.fill_mask(text, topk=3, as_dicts=True)
        assert [d["sequence"] for d in _flat(got)] == [d["sequence"] for d in _flat(expected)]
        assert [d["token"] for d in _flat(got)] == [d["token"] for d in _flat(expected)]
        assert [d["score"] for d in _flat(got)] == pytest.approx([d["score"] for d in _flat(expected)], abs=1e-6)
    readable = call("fill-mask", "-m", hub_checkpoints["hf"], "--topk", 2, "--precision", "fp32", texts[0])
    best = tiny_hub.fill_mask(texts[0], topk=2)[0]
    assert readable.stdout.splitlines()[0] == texts[0] and best[0] in readable.stdout.splitlines()[1]


def _flat(result):
    return [d for choices in result for d in choices] if isinstance(result[0], list) else result


def test_features_to_npy_and_jsonl(hub_checkpoints, tiny_hub, tmp_path, call):
    texts = ["Hello world!", "A longer sentence\tand its pair."]
    result = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "f.npy", "--precision", "fp32", *texts)
    assert result.returncode == 0, result.stderr
    vectors = np.load(tmp_path / "f.npy")
    assert vectors.shape == (2, 64)
    for vector, text in zip(vectors, texts):
        expected = tiny_hub.extract_features(tiny_hub.encode(*text.split("\t")))[0, 0]
        np.testing.assert_allclose(vector, expected.numpy(), atol=1e-5)
    result = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "f.jsonl", "--pool", "none", "--layer", 0,
                  "--precision", "fp32",
                 stdin=texts[0] + "\n")
    record = json.loads((tmp_path / "f.jsonl").read_text())
    tokens = tiny_hub.encode(texts[0])
    assert record["text"] == texts[0] and record["tokens"] == tokens.tolist()
    np.testing.assert_allclose(record["features"], tiny_hub.extract_features(tokens, return_all_hiddens=True)[0][0],
                               atol=1e-5)
    # bf16: close to the float32 vectors, not equal
    result = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "b.npy", "--precision", "bf16", *texts)
    assert result.returncode == 0, result.stderr
    fast = np.load(tmp_path / "b.npy")
    cosine = (fast * vectors).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > 0.99 and np.abs(fast - vectors).max() > 0
    refused = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "g.npy", "--pool", "none", "Hi")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and not (tmp_path / "g.npy").exists()


def test_predict_pairs_json(hub_checkpoints, tiny_hub, call):
    result = call("predict", "-m", hub_checkpoints["fairseq_bpe"], "--head", "mnli", "--json", "--precision", "fp32",
                 "A man sleeps.\tA person rests.", "Hi")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = tiny_hub.predict("mnli", [tiny_hub.encode("A man sleeps.", "A person rests."), tiny_hub.encode("Hi")]).exp()
    for row, probs in zip(rows, expected):
        assert row["label"] == probs.argmax().item()
        assert row["probabilities"] == pytest.approx(probs.tolist(), abs=1e-5)


def test_info_reports_what_the_checkpoint_holds(hub_checkpoints, tiny_hub, call):
    result = run("info", "-m", hub_checkpoints["fairseq"], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "fairseq" and info["heads"] == {"mnli": 3}
    assert info["parameters"] == tiny_hub.model.num_parameters() and info["dtype"] == "float32"
    assert info["config"]["num_hidden_layers"] == 2 and info["max_tokens"] == 64
    assert info["size_bytes"] == sum(f.stat().st_size for f in hub_checkpoints["fairseq"].iterdir())
    readable = call("info", "-m", hub_checkpoints["hf"])
    assert "mnli (3 classes)" in readable.stdout and f"{tiny_hub.model.num_parameters():,}" in readable.stdout


def test_download_then_use_offline(hub_checkpoints, bpe_dir, tmp_path, call):
    cache = tmp_path / "cache"
    with FileServer() as server:
        serve_models(server, hub_checkpoints, bpe_dir)
        result = run("download", "roberta.base", "--cache-dir", cache, env={"ROBERTA_OFFLINE": "",
                                                                             "ROBERTA_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cache / "roberta.base")
    listing = call("download", "--cache-dir", cache)
    assert "roberta.base" in listing.stdout and "cached" in listing.stdout
    encoded = call("encode", "-m", "roberta.base", "--cache-dir", cache, "Hello world!")
    assert encoded.stdout == "0 31414 232 328 2\n"


def test_bad_input_exits_2_with_one_line(hub_checkpoints, tmp_path, call):
    for args in (("encode", "-m", "roberta.huge", "x"),
                 ("fill-mask", "-m", hub_checkpoints["hf"], "no mask here"),
                 ("info", "-m", "roberta.large", "--cache-dir", tmp_path),  # offline, not cached
                 ("decode", "-m", hub_checkpoints["hf"], "1", "two")):
        result = call(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    with pytest.raises(SystemExit) as exit_info:  # argparse: -m is required
        call("encode")
    assert exit_info.value.code == 2
    result = run("fill-mask", "-m", hub_checkpoints["hf"], "no mask here")  # and from a real process
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("name, message", [
    ("quantum", "unknown device 'quantum'"),
    ("xla", "is not supported"),
    ("cuda:7", "cuda:7"),
])
def test_bad_device_is_one_line_error(name, message):
    from roberta.device import resolve_device
    from roberta.errors import RobertaError

    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(RobertaError, match=message):
        resolve_device(name)


def test_auto_device():
    from roberta.device import resolve_device

    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


def test_info_device_says_what_auto_picks_here(hub_checkpoints, call):
    from roberta.inference import resolve_precision

    result = call("info", "--device", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["device"], info["precision"], info["reason"]) == ("cpu", *resolve_precision("auto", "cpu"))
    readable = call("info", "--device", "cpu", "-m", hub_checkpoints["hf"])
    assert f"auto -> {info['precision']}" in readable.stdout and "mnli (3 classes)" in readable.stdout
    assert call("info").returncode == 2


def test_inference_commands_say_what_auto_chose_and_jobs_keep_to_it(call, hub_checkpoints, tmp_path):
    from roberta.inference import resolve_precision

    chosen, why = resolve_precision("auto", "cpu")
    result = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "f.npy", "Hello world!")
    assert result.returncode == 0 and result.stderr.splitlines() == [
        f"ran on cpu in {chosen} ({why})" + ("" if chosen == "fp32" else "; --precision fp32 for the exact float32 numbers")]
    exact = call("features", "-m", hub_checkpoints["hf"], "-o", tmp_path / "g.npy", "--precision", "fp32", "Hello")
    assert exact.returncode == 0 and exact.stderr == ""  # asked for: nothing to say
    source = tmp_path / "in.txt"
    source.write_text("Hello world!\nA second line.\n")
    job = ["features", "-m", hub_checkpoints["hf"], "-i", source, "-o", tmp_path / "job", "--no-progress"]
    assert call(*job, "--precision", "int8").returncode == 0
    assert json.loads((tmp_path / "job" / "job.json").read_text())["precision"] == "int8"
    refused = call(*job, "--precision", "fp32", "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "precision was 'int8' and is now 'fp32'" in refused.stderr

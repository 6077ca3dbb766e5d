"""Faults in the files a user hands over, as a hostile user makes them: a Hugging Face cache whose
entries link out of it, JSON nested 100,000 deep or with 5,000-digit numbers, a tokenizer.json of the
wrong shapes, Hub ids huggingface_hub refuses, ZipNN files that declare gigabytes, id2label values
that are not names, task commands on checkpoints without their head, fine-tuning data with one class
or resumed with other data, and exports killed with -9. Each row: exit status 2 and one `error:`
line (or the right result), no traceback, and the files outside what the command owns untouched."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from roberta import RobertaConfig, RobertaError
from roberta.fileio import JSON_DEPTH, parse_json, read_json, remove_owned
from test_faults import ROOT, call, one_error_line, run  # noqa: F401  (call is a fixture)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GARBAGE = b"\xff\xfe my thesis, not a model file \x00\x01"
DEEP = b"[" * 100_000 + b"]" * 100_000
LONG_NUMBER = b'{"hidden_size": ' + b"7" * 5000 + b"}"


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- a cache never deletes what it does not own -------------------------------------------------

def hub_cache(root: Path, source: Path) -> tuple[Path, Path]:
    """A Hugging Face cache holding `evil/one` as huggingface_hub lays it out (snapshot entries are
    links into blobs/ named by their sha256); returns (cache, snapshot)."""
    cache = root / "cache"
    repo = cache / "models--evil--one"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        data = (source / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return cache, snapshot


@pytest.mark.parametrize("entry", ["config.json", "merges.txt", "vocab.json", "model.safetensors", "snapshot-folder"])
def test_a_cache_link_to_a_file_outside_is_never_deleted(hub_checkpoints, tmp_path, call, entry):
    cache, snapshot = hub_cache(tmp_path, hub_checkpoints["hf"])
    home = tmp_path / "home"
    home.mkdir()
    if entry == "snapshot-folder":  # the whole snapshot folder links to a folder of the user's
        victim = home / "config.json"
        for item in snapshot.iterdir():
            (home / item.name).write_bytes(item.read_bytes())
        victim.write_bytes(GARBAGE)
        shutil.rmtree(snapshot)
        snapshot.symlink_to(home, target_is_directory=True)
    else:
        victim = home / "thesis.bin"
        victim.write_bytes(GARBAGE)
        (snapshot / entry).unlink()
        (snapshot / entry).symlink_to(victim)
    before = {p: p.read_bytes() for p in home.iterdir()}
    result = call("info", "-m", "evil/one", "--cache-dir", cache)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "evil/one" in line and "not" in line, line
    assert {p: p.read_bytes() for p in home.iterdir()} == before  # every byte and file outside is there
    assert victim.read_bytes() == GARBAGE


def test_a_broken_blob_inside_the_cache_is_still_removed(hub_checkpoints, tmp_path, call):
    """The neighbour that must keep working: what the cache owns (the link and its blob) is removed,
    so that the next download fetches it afresh."""
    cache, snapshot = hub_cache(tmp_path, hub_checkpoints["hf"])
    blob = (snapshot / "merges.txt").resolve()
    blob.write_bytes(GARBAGE)
    result = call("info", "-m", "evil/one", "--cache-dir", cache)
    assert result.returncode == 2 and "removed from the cache" in one_error_line(result)
    assert not os.path.lexists(snapshot / "merges.txt") and not blob.exists()
    assert (snapshot / "config.json").is_file()  # the good files stay


def test_remove_owned_removes_entries_inside_its_root_only(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "thesis").write_bytes(b"mine")
    (root / "link").symlink_to(outside / "thesis")
    (root / "folder").symlink_to(outside, target_is_directory=True)
    (root / "own").write_bytes(b"cache")
    assert not remove_owned(root / "folder" / "thesis", root)  # inside a linked folder: not ours
    assert not remove_owned(outside / "thesis", root)
    assert not remove_owned(root / "folder", root / "folder")  # a folder is never removed
    assert remove_owned(root / "link", root) and not os.path.lexists(root / "link")
    assert remove_owned(root / "own", root) and not (root / "own").exists()
    assert (outside / "thesis").read_bytes() == b"mine"
    assert (root / "folder").is_symlink()


def test_a_partial_download_that_is_a_link_is_never_written_through(tmp_path):
    """`blobs/<etag>.incomplete` and `<file>.part` are appended to when a download resumes (and cut to
    nothing when they are not a prefix): a link there is replaced by a file of our own."""
    from roberta.fileio import open_for_append

    victim = tmp_path / "thesis.bin"
    victim.write_bytes(GARBAGE)
    partial = tmp_path / "blob.incomplete"
    partial.symlink_to(victim)
    with open_for_append(partial) as out:
        assert out.tell() == 0
        out.truncate(0)
        out.write(b"downloaded")
    assert victim.read_bytes() == GARBAGE
    assert not partial.is_symlink() and partial.read_bytes() == b"downloaded"
    with open_for_append(partial) as out:  # an ordinary partial file is resumed
        assert out.tell() == len(b"downloaded")


# ---- one bounded reader for every JSON file -------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (DEEP, f"nested deeper than {JSON_DEPTH} levels"),
    (b"[" * (JSON_DEPTH + 2) + b"]" * (JSON_DEPTH + 2), f"nested deeper than {JSON_DEPTH} levels"),
    (LONG_NUMBER, "a number of 5,000 digits"),
    (b'{"x": 1.' + b"5" * 5000 + b"}", "a number of 5,002 digits"),
    (b'{"x": -' + b"9" * 401 + b"}", "a number of 402 digits"),
    (b"{not json", "not valid JSON (Expecting property name"),
    (b'{"a": "caf\xe9"}', "not UTF-8 text (byte b'\\xe9' at 10)"),
    (b"", "not valid JSON (Expecting value"),
])
def test_parse_json_bounds(text, message):
    with pytest.raises(RobertaError) as info:
        parse_json(text, "in.json")
    assert str(info.value).startswith("in.json is ") and message in str(info.value) and "\n" not in str(info.value)


def test_parse_json_keeps_what_real_files_hold(bpe_dir):
    assert parse_json(b"[" * JSON_DEPTH + b"]" * JSON_DEPTH, "ok") == eval("[" * JSON_DEPTH + "]" * JSON_DEPTH)
    assert parse_json('{"x": -' + "9" * 399 + ', "y": 1e-300}', "ok") == {"x": -int("9" * 399), "y": 1e-300}
    assert read_json(bpe_dir / "vocab.json") == json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(RobertaError, match=r"x\.json is a JSON array where JSON an object belongs"):
        parse_json("[1]", "x.json", kind=dict)


def _json_fault(kind: str, where: Path, hf: Path, bad: bytes) -> tuple[list, Path]:
    """A checkpoint folder with one JSON file of `kind` replaced by `bad`: (argv, the file)."""
    model = copy_dir(hf, where / "model")
    if kind == "model.safetensors.index.json":
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    if kind in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        (model / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (model / "1_Pooling").mkdir()
        (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    if kind == "tokenizer.json":
        for name in ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "dict.txt"):
            (model / name).unlink(missing_ok=True)
    (model / kind).write_bytes(bad)
    argv = ["encode", "-m", model, "hello"] if kind in ("vocab.json", "tokenizer.json") else ["info", "-m", model]
    return argv, model / kind


JSON_KINDS = ["config.json", "model.safetensors.index.json", "vocab.json", "tokenizer.json", "modules.json",
              "sentence_bert_config.json", "1_Pooling/config.json", "tokenizer_config.json"]


@pytest.mark.parametrize("bad, message", [(DEEP, "nested deeper"), (LONG_NUMBER, "a number of 5,000 digits")],
                         ids=["deep", "digits"])
@pytest.mark.parametrize("kind", JSON_KINDS)
def test_every_json_file_of_a_checkpoint_is_read_with_bounds(hub_checkpoints, tmp_path, call, kind, bad, message):
    if kind == "tokenizer_config.json":  # read for a sentence-transformers model's max_seq_length
        argv, file = _json_fault("modules.json", tmp_path, hub_checkpoints["hf"],
                                 json.dumps([{"path": "", "type": "Transformer"}]).encode())
        (file.parent / kind).write_bytes(bad)
        file = file.parent / kind
    else:
        argv, file = _json_fault(kind, tmp_path, hub_checkpoints["hf"], bad)
    result = call(*argv)
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"{file.name} is not usable JSON" in line and message in line, line


@pytest.mark.parametrize("kind, size", [("config.json", 17 << 20), ("tokenizer.json", 65 << 20),
                                        ("vocab.json", 65 << 20), ("model.safetensors.index.json", 65 << 20)])
def test_a_json_file_too_large_for_its_kind_is_refused_before_reading(hub_checkpoints, tmp_path, call, kind, size):
    argv, file = _json_fault(kind, tmp_path, hub_checkpoints["hf"], b"")
    with open(file, "wb") as f:  # sparse: the size is what is checked, before a byte is read
        f.truncate(size)
    result = call(*argv)
    assert result.returncode == 2
    assert f"{file.name} is {size:,} bytes, more than the" in one_error_line(result)


def test_jsonl_inputs_task_files_and_run_files_are_read_with_bounds(hub_checkpoints, tiny_mlm_dir, tmp_path, call):
    # an input line of a job
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "fine"}\n' + LONG_NUMBER + b"\n")
    result = call("predict", "-m", hub_checkpoints["hf"], "--head", "mnli", "-i", tmp_path / "in.jsonl")
    assert result.returncode == 2 and "in.jsonl line 2 is not usable JSON" in one_error_line(result)
    (tmp_path / "in.jsonl").write_bytes(DEEP + b"\n")
    result = call("features", "-m", hub_checkpoints["hf"], "-i", tmp_path / "in.jsonl", "-o", tmp_path / "f",
                  "--no-progress")
    assert result.returncode == 2 and "in.jsonl line 1 is not usable JSON: it is nested deeper" in \
        one_error_line(result)
    # a task's training file
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(b'{"text": "a", "label": "x"}\n' + DEEP + b"\n")
    (data / "dev.jsonl").write_text('{"text": "a", "label": "x"}\n')
    result = call("finetune", "--task", "custom", "--data", data, "--model", tiny_mlm_dir, "--out", tmp_path / "run")
    assert result.returncode == 2 and "train.jsonl:2: not usable JSON: it is nested deeper" in one_error_line(result)
    assert not (tmp_path / "run").exists()
    # a run's recipe
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "recipe.json").write_bytes(LONG_NUMBER)
    result = call("finetune", "--task", "custom", "--data", data, "--model", tiny_mlm_dir, "--out", run_dir, "--resume")
    assert result.returncode == 2 and "recipe.json is not a valid settings file (not usable JSON: it holds a number" \
        in one_error_line(result)


# ---- tokenizer.json and vocab.json of the wrong shapes ---------------------------------------------

def _tokenizer_json(bpe_dir) -> dict:
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (bpe_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    return {"version": "1.0", "added_tokens": [{"id": 50264, "content": "<mask>"}],
            "model": {"type": "BPE", "vocab": vocab, "merges": [m for m in merges if m]}}


TOKENIZER_JSON_FAULTS = [
    (lambda d: d["model"].update(merges=[5]), "merge 1 (5) is not two tokens of its vocabulary"),
    (lambda d: d["model"].update(merges=[None]), "merge 1 (None) is not two tokens"),
    (lambda d: d["model"].update(merges=[["a"]]), "merge 1 (['a']) is not two tokens"),
    (lambda d: d["model"].update(merges=[[1, 2]]), "merge 1 ([1, 2]) is not two tokens"),
    (lambda d: d["model"].update(merges={"a": "b"}), "model.merges is {'a': 'b'}, not a list"),
    (lambda d: d["model"].update(merges=7), "model.merges is 7, not a list"),
    (lambda d: d.update(added_tokens=5), "added_tokens is 5, not a list of tokens"),
    (lambda d: d.update(added_tokens=["<x>"]), "added token 1 ('<x>') is not an object"),
    (lambda d: d.update(added_tokens=[{"id": 1.0, "content": "<pad>"}]), "added token 1"),
    (lambda d: d.update(added_tokens=[{"id": "1", "content": "<pad>"}]), "added token 1"),
    (lambda d: d.update(added_tokens=[{"id": 1, "content": None}]), "added token 1"),
    (lambda d: d["model"]["vocab"].update({"Hello": 1.5}), "model.vocab gives 'Hello' the id 1.5"),
    (lambda d: d["model"]["vocab"].update({"Hello": "31414"}), "model.vocab gives 'Hello' the id '31414'"),
    (lambda d: d["model"]["vocab"].update({"Hello": None}), "model.vocab gives 'Hello' the id None"),
    (lambda d: d["model"]["vocab"].update({"Hello": True}), "model.vocab gives 'Hello' the id True"),
    (lambda d: d["model"].update(vocab=[1, 2]), "is not a BPE tokenizer"),
    (lambda d: d.update(model=5), "is not a BPE tokenizer"),
    (lambda d: d["model"]["vocab"].update({"Hello": 10 ** 12}), "token ids must be 0..50264"),
]


@pytest.mark.parametrize("edit, message", TOKENIZER_JSON_FAULTS, ids=[m for _, m in TOKENIZER_JSON_FAULTS])
def test_malformed_tokenizer_json(bpe_dir, tmp_path, call, edit, message):
    data = _tokenizer_json(bpe_dir)
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(RobertaError) as info:
        from roberta.tokenizer import RobertaTokenizer
        RobertaTokenizer.from_pretrained(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_well_formed_tokenizer_json_still_loads(bpe_dir, tmp_path):
    from roberta.tokenizer import RobertaTokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(bpe_dir)))
    assert RobertaTokenizer.from_pretrained(tmp_path).encode("Hello world!") == [0, 31414, 232, 328, 2]


@pytest.mark.parametrize("content, message", [
    ('{"<s>": 0, "a": 1.0}', "integer id (found 1.0)"),
    ('{"<s>": 0, "a": "1"}', "integer id (found '1')"),
    ('{"<s>": 0, "a": null}', "integer id (found None)"),
    ('["<s>", "a"]', "integer id (found ['<s>', 'a'])"),
    ('"vocab"', "integer id (found 'vocab')"),
])
def test_malformed_vocab_json(bpe_dir, tmp_path, call, content, message):
    (tmp_path / "vocab.json").write_text(content)
    (tmp_path / "merges.txt").write_bytes((bpe_dir / "merges.txt").read_bytes())
    result = call("encode", "-m", tmp_path, "hello")
    assert result.returncode == 2 and message in one_error_line(result)


# ---- Hub ids huggingface_hub refuses ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["evil/..x", "org/na--me", "org/" + "n" * 97, "org/-name", "org/na..me", "o--rg/name",
                                  "org/name-", "org/name."])
def test_hub_ids_huggingface_hub_refuses(tmp_path, call, name):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    with pytest.raises(HFValidationError):  # the reference: huggingface_hub itself refuses each of these
        validate_repo_id(name)
    result = call("info", "-m", name, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2
    line = one_error_line(result)
    # the last two the project's own pattern already refused; the others it admitted
    assert ("is neither an existing path nor a known model name" if name[-1] in "-." else
            "is not a valid Hub id") in line, line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["org/name@../../../x", "org/name@/etc", "org/name@a//b"])
def test_revisions_that_leave_the_refs_folder(tmp_path, call, name):
    result = call("info", "-m", name, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2 and "is not a branch, tag or commit name" in one_error_line(result)


# ---- ZipNN files: declared sizes checked before anything is decoded ---------------------------------

def _zipnn_stream(original: int, chunk_log2: int = 30) -> bytes:
    """A bytes-format ZipNN stream (fp32 grouping) that declares `original` bytes from one chunk whose
    four byte groups are each a one-byte run: a few dozen bytes that decode to `original`."""
    import struct

    k = 4
    header = bytearray(32)
    header[0:2] = b"ZN"
    header[5], header[8], header[14], header[15] = 220, 1, chunk_log2, 1
    codecs = bytes([1] * k)
    ends = struct.pack("<4Q", 1, 1, 1, 1)
    body = bytes(codecs) + ends + b"\x00" * k
    struct.pack_into("<QQ", header, 16, original, 32 + len(body))
    return bytes(header) + body


def test_a_tiny_safetensors_znn_declaring_a_gibibyte_is_refused_in_little_memory(models_dir, tmp_path):
    """Fresh processes: a 60-byte `model.safetensors.znn` that declares 1 GiB, and a
    `model.znn.safetensors` whose tensor metadata claims 1 GiB, are refused with under 100 MB of growth."""
    whole = copy_dir(models_dir, tmp_path / "whole")
    (whole / "model.safetensors").unlink()
    (whole / "model.safetensors.znn").write_bytes(_zipnn_stream(1 << 30))
    assert (whole / "model.safetensors.znn").stat().st_size < 200
    per_tensor = copy_dir(models_dir, tmp_path / "per-tensor")
    state = load_file(per_tensor / "model.safetensors")
    (per_tensor / "model.safetensors").unlink()
    blob = torch.frombuffer(bytearray(_zipnn_stream(1 << 30)), dtype=torch.uint8)
    table = {"roberta.embeddings.word_embeddings.weight": {"dtype": "float32", "shape": str([1 << 18, 1024])}}
    save_file({**state, "roberta.embeddings.word_embeddings.weight": blob}, per_tensor / "model.znn.safetensors",
              metadata={"znn_compressed_vectors": json.dumps(table)})
    script = textwrap.dedent("""
        import json, resource, sys, warnings
        from roberta import RobertaError, RobertaForMaskedLM
        warnings.simplefilter("ignore")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            RobertaForMaskedLM.from_pretrained(sys.argv[1])
            outcome = "accepted"
        except RobertaError as exc:
            outcome = str(exc)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(json.dumps([outcome, grown]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for path, message in ((whole, "declares 1,073,741,824 bytes of weights, more than"),
                          (per_tensor, "declares 1,073,741,824 bytes of compressed tensors, more than")):
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        outcome, grown = json.loads(out.stdout)
        assert message in outcome, outcome
        assert grown < 100 * 2 ** 20, (path.name, grown)


def test_a_znn_tensor_whose_stream_disagrees_with_its_metadata_is_refused_before_decoding(models_dir, tmp_path,
                                                                                           monkeypatch):
    from roberta import compress, znn
    from roberta.checkpoint import read_checkpoint

    path = copy_dir(models_dir, tmp_path / "m")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    name = "roberta.embeddings.word_embeddings.weight"
    shape = list(state[name].shape)
    blob = torch.frombuffer(bytearray(_zipnn_stream(1 << 20, chunk_log2=20)), dtype=torch.uint8)
    save_file({**state, name: blob}, path / "model.znn.safetensors",
              metadata={"znn_compressed_vectors": json.dumps({name: {"dtype": "float32", "shape": str(shape)}})})
    monkeypatch.setattr(znn, "_decode", lambda *a, **k: pytest.fail("decoded before the check"))
    monkeypatch.setattr(compress, "decompress_tensor", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(RobertaError, match="not a valid ZipNN blob"):
        read_checkpoint(path)


def test_znn_files_declaring_gigabytes_under_a_memory_limit_are_one_line(models_dir, tmp_path):
    """Under `ulimit -v` (1.5 GB: enough for the command, not for what the files declare), the command
    line says one `error:` line with exit status 2 for both layouts, no traceback."""
    paths = {}
    for name in ("model.safetensors.znn", "model.znn.safetensors"):
        path = paths[name] = copy_dir(models_dir, tmp_path / name)
        state = load_file(path / "model.safetensors")
        (path / "model.safetensors").unlink()
        stream = _zipnn_stream(1 << 30)
        if name == "model.safetensors.znn":
            (path / name).write_bytes(stream)
        else:
            key = "roberta.encoder.layer.0.intermediate.dense.weight"
            table = {key: {"dtype": "float32", "shape": str([1 << 16, 1 << 12])}}
            save_file({**state, key: torch.frombuffer(bytearray(stream), dtype=torch.uint8)}, path / name,
                      metadata={"znn_compressed_vectors": json.dumps(table)})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1"}
    for name, path in paths.items():
        result = subprocess.run(["bash", "-c", f"ulimit -v 1500000; exec {sys.executable} -m roberta info -m {path}"],
                                capture_output=True, env=env, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        assert "1,073,741,824 bytes" in one_error_line(result)
    # `roberta decompress` of the same directory: the same check, nothing written
    for name, path in paths.items():
        result = subprocess.run(["bash", "-c", f"ulimit -v 1500000; exec {sys.executable} -m roberta decompress "
                                 f"{path} {tmp_path / 'out'}"], capture_output=True, env=env, timeout=120)
        assert result.returncode == 2 and "1,073,741,824 bytes" in one_error_line(result), (name, result.stderr)
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from test_faults import tiny_model

    path = tmp_path_factory.mktemp("znn-faults") / "A"
    tiny_model(1).save_pretrained(path)
    return path


# ---- id2label names -------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [{"0": {"x": 1}, "1": "pos"}, {"0": ["neg"], "1": "pos"}, {"0": None, "1": "pos"},
                                    {"0": 0, "1": "pos"}, {"0": "neg", "1": True}])
def test_id2label_names_must_be_strings(models_dir, tmp_path, call, labels):
    path = copy_dir(models_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "id2label": labels, "num_labels": 2}))
    result = call("info", "-m", path)
    assert result.returncode == 2 and "id2label must name each class with a string" in one_error_line(result)
    with pytest.raises(RobertaError, match="id2label must name each class with a string"):
        RobertaConfig(id2label=labels)


# ---- task commands on checkpoints without their head ------------------------------------------------

def _with_architectures(hf: Path, where: Path, architectures, drop: str | None = None) -> Path:
    path = copy_dir(hf, where)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    if drop:
        state = load_file(path / "model.safetensors")
        save_file({k: v for k, v in state.items() if not k.startswith(drop)}, path / "model.safetensors")
    return path


@pytest.mark.parametrize("architectures", [
    "XRobertaForTokenClassificationX RobertaForQuestionAnswering",  # a string holding the names
    ["RobertaForTokenClassification"],  # the name, but the weights hold no classifier
    ["RobertaForQuestionAnswering"],
    ["RobertaForMaskedLM"],
])
def test_tag_and_answer_refuse_a_checkpoint_without_their_head(hub_checkpoints, tmp_path, call, architectures):
    path = _with_architectures(hub_checkpoints["hf"], tmp_path / "m", architectures)
    for argv in (["tag", "-m", path, "Ada Lovelace lived in London"],
                 ["answer", "-m", path, "--context", "Ada lived in London.", "Where did Ada live?"]):
        result = call(*argv)
        assert result.returncode == 2, (argv, result.stdout)
        line = one_error_line(result)
        assert "needs a token-classification" in line or "needs a question-answering" in line, line


def test_tag_names_what_a_classifier_checkpoint_is(hub_checkpoints, tmp_path, call):
    """A sequence classifier loads as the masked-LM model with its heads; the refusal says what the
    user gave (its heads), not that class's name."""
    path = _with_architectures(hub_checkpoints["hf"], tmp_path / "m", ["RobertaForMaskedLM"], drop="lm_head.")
    line = one_error_line(call("tag", "-m", path, "Ada Lovelace lived in London"))
    assert "this one is a sequence-classification checkpoint (heads: mnli)" in line, line
    line = one_error_line(call("tag", "-m", hub_checkpoints["hf"], "Ada Lovelace lived in London"))
    assert "this one is a masked-LM checkpoint with classification heads (mnli)" in line, line


def test_fill_mask_refuses_a_checkpoint_without_its_lm_head(hub_checkpoints, tmp_path, call):
    path = _with_architectures(hub_checkpoints["hf"], tmp_path / "m", ["RobertaForMaskedLM"], drop="lm_head.")
    result = call("fill-mask", "-m", path, "Hello <mask>!")
    assert result.returncode == 2 and result.stdout == ""
    assert "has no masked-LM head (lm_head.*)" in one_error_line(result)
    assert call("fill-mask", "-m", hub_checkpoints["hf"], "Hello <mask>!").returncode == 0


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory, bpe_dir):
    import roberta

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reader")
    roberta.RobertaForQuestionAnswering(RobertaConfig.tiny(vocab_size=50265, max_position_embeddings=66)) \
        .save_pretrained(path, tokenizer=roberta.RobertaTokenizer.from_pretrained(bpe_dir))
    return path


@pytest.mark.parametrize("context", ["", "   ", "\n\t "])
def test_answer_with_a_blank_context(reader_dir, call, context):
    result = call("answer", "-m", reader_dir, "--context", context, "Where?")
    assert result.returncode == 2 and "the context is empty" in one_error_line(result)
    result = call("answer", "-m", reader_dir, "--context", context, "--no-answer", "--json", "Where?")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [{"answer": "", "score": 1.0, "start": 0, "end": 0}]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_null_threshold_must_be_finite(reader_dir, call, value):
    result = call("answer", "-m", reader_dir, "--context", "Ada lived in London.", "--no-answer",
                  f"--null-threshold={value}", "Where?")
    assert result.returncode == 2 and "null_threshold must be a finite number" in one_error_line(result)


# ---- fine-tuning: one class, an empty train file, resuming with other data or another model -------

def _custom(path: Path, train: str, dev: str = "text,label\na good film,pos\na dull film,neg\n") -> Path:
    path.mkdir()
    (path / "train.csv").write_text(train)
    (path / "dev.csv").write_text(dev)
    return path


@pytest.mark.parametrize("train, message", [
    ("text,label\na good film,pos\nanother good film,pos\n", "holds one class only ('pos')"),
    ("text,label\n", "train.csv has no training examples"),
    ("text,label\n\n\n", "train.csv:2: expected 2 fields as in the header, found 0"),
])
def test_finetune_refuses_data_it_cannot_learn_from(tiny_mlm_dir, tmp_path, call, train, message):
    data = _custom(tmp_path / "data", train)
    result = call("finetune", "--task", "custom", "--data", data, "--model", tiny_mlm_dir, "--out", tmp_path / "run",
                  "--device", "cpu")
    assert result.returncode == 2
    line = one_error_line(result)
    assert message in line and "train.csv" in line and "dev.csv" not in line, line
    assert not (tmp_path / "run").exists()


def test_finetune_resume_checks_the_content_of_its_data_and_model(tiny_mlm_dir, tmp_path, call):
    rows = "text,label\na good film,pos\na dull film,neg\na fine film,pos\na bad film,neg\n"
    data = _custom(tmp_path / "data", rows)
    model = copy_dir(tiny_mlm_dir, tmp_path / "model")
    out = tmp_path / "run"
    args = ["finetune", "--task", "custom", "--model", model, "--out", out, "--max-epochs", "1", "--device", "cpu",
            "--batch-size", "2"]
    assert call(*args, "--data", data).returncode == 0
    sources = json.loads((out / "sources.json").read_text())
    assert set(sources) == {"data", "model"}
    recorded = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    # the same content under another name resumes; other content under the same names is refused
    same = copy_dir(data, tmp_path / "same-data")
    assert call(*args, "--data", same, "--resume").returncode == 0
    other = _custom(tmp_path / "other-data", rows.replace("a fine film", "a fine movie"))
    result = call(*args, "--data", other, "--resume")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--data (the task's files) differ in content" in line and "--model" not in line.split(";")[0], line
    (data / "train.csv").write_text(rows.replace("bad", "poor"))  # edited in place, same name
    result = call(*args, "--data", data, "--resume")
    assert result.returncode == 2 and "--data (the task's files) differ" in one_error_line(result)
    (data / "train.csv").write_text(rows)
    weights = load_file(model / "model.safetensors")
    save_file({k: v + 1 if k.endswith("bias") else v for k, v in weights.items()}, model / "model.safetensors")
    result = call(*args, "--data", data, "--resume")
    assert result.returncode == 2 and "--model (its checkpoint files) differ" in one_error_line(result)
    result = call(*args, "--data", other, "--resume")  # both differ: both are named
    assert "--data (the task's files) and --model (its checkpoint files) differ" in one_error_line(result)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}.keys() >= recorded.keys()


# ---- export killed with -9 ------------------------------------------------------------------------

@pytest.mark.parametrize("after", [0.5, 2.0, 4.0])
def test_an_export_killed_with_9_leaves_nothing_the_next_export_does_not_remove(hub_checkpoints, tmp_path, after):
    pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "roberta", "export", "-m", str(hub_checkpoints["hf"]),
                              "--onnx", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # kill it `after` seconds after its temporary folder appears (or when it ends first)
    while child.poll() is None and not any(p.name.startswith(".onnx") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(after)
    finished = child.poll() is not None
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = sorted(p.name for p in tmp_path.iterdir())  # the export, or its temporary sibling, or nothing
    assert len(left) <= 1 and all(n == "onnx" or n.startswith(".onnx.tmp-") for n in left), left
    if out.exists():
        assert (out / "onnx.json").is_file()  # renamed into place whole
        return
    assert not finished
    result = run("export", "-m", hub_checkpoints["hf"], "--onnx", out, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # the debris of the killed export is gone


def test_content_digest_follows_bytes_not_times_and_reads_folders(tmp_path):
    from roberta.fileio import content_digest

    folder = tmp_path / "race" / "train"
    folder.mkdir(parents=True)
    (folder / "1.txt").write_bytes(b"article one")
    (folder / "2.txt").write_bytes(b"article two")
    first = content_digest([folder])
    assert first == content_digest(sorted(folder.iterdir()))  # a folder stands for its files
    os.utime(folder / "1.txt", (0, 0))
    assert content_digest([folder]) == first  # times do not count
    (folder / "2.txt").write_bytes(b"article tw0")  # one byte, same size
    assert content_digest([folder]) != first

"""Faults as a hostile or careless user makes them: bad configs, absurd sizes, outputs onto the wrong
place, kill -9 in the middle of a write. Each case asserts the exit status or error, the one-line
message, and what is left on disk afterwards."""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from roberta import RobertaConfig, RobertaError, RobertaForMaskedLM
from roberta.checkpoint import read_checkpoint, save_fairseq
from roberta.cli import main
from roberta.errors import RobertaWarning
from roberta.fileio import check_output, replace_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=40)


def tiny_model(seed: int, **overrides) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    model = RobertaForMaskedLM(RobertaConfig(**{**TINY, **overrides}))
    model.register_classification_head("mnli", 3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights_of(path) -> dict:
    """The weights a load of `path` gives (whichever file it reads), as the model's state dict."""
    return RobertaForMaskedLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny checkpoints, A and B, in the layouts the writes start from."""
    root = tmp_path_factory.mktemp("faults")
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        model = tiny_model(seed)
        model.save_pretrained(root / name)
        save_fairseq(model, root / f"{name}-fairseq")
        paths[name] = root / name
        paths[f"{name}-fairseq"] = root / f"{name}-fairseq"
        paths[f"{name}-weights"] = weights_of(root / name)
        paths[f"{name}-fairseq-weights"] = weights_of(root / f"{name}-fairseq")
    from roberta.compress import compress_checkpoint

    for name in ("A", "B"):
        compress_checkpoint(paths[name], root / f"{name}-z")
        paths[f"{name}-z"] = root / f"{name}-z"
    return paths


def run(*args, stdin=None, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1"}
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "roberta", *argv], input=stdin, capture_output=True,
                          env=env, timeout=timeout, cwd=cwd)


@pytest.fixture
def call(capsys, monkeypatch):
    """The command in this process (each fresh interpreter costs seconds of importing torch)."""
    def call(*args, stdin=""):
        monkeypatch.setenv("ROBERTA_OFFLINE", "1")
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        returncode = main(list(map(str, args)))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out, err)
    return call


def one_error_line(result) -> str:
    err = result.stderr.decode("utf-8", "replace") if isinstance(result.stderr, bytes) else result.stderr
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- RobertaConfig: checked when built ----------------------------------------------------------

BAD_CONFIGS = [
    ({"num_attention_heads": 0}, "num_attention_heads is 0, which is out of range"),
    ({"hidden_size": -64}, "hidden_size is -64, which is out of range"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ({"hidden_size": 100, "num_attention_heads": 3}, "not a multiple of num_attention_heads"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps must be a small positive number"),
    ({"layer_norm_eps": 0}, "layer_norm_eps must be a small positive number"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be a probability"),
    ({"attention_probs_dropout_prob": float("nan")}, "attention_probs_dropout_prob must be a probability"),
    ({"id2label": ["neg", "pos"]}, "id2label must map class ids to names"),
    ({"id2label": {"a": "neg"}}, "id2label keys must be class ids"),
    ({"id2label": {"0": "neg", "5": "pos"}}, "id2label must number its classes 0 to 1"),
    ({"classification_heads": {"big": 10_000_000_000}}, r"classification_heads\['big'\] is 10,000,000,000"),
    ({"classification_heads": {"x": 0}}, r"classification_heads\['x'\] is 0"),
    ({"num_hidden_layers": 10_000_000}, "num_hidden_layers is 10,000,000, which is out of range"),
    ({"vocab_size": 10 ** 12}, "vocab_size is 1,000,000,000,000"),
    ({"hidden_size": 65536, "num_attention_heads": 64, "num_hidden_layers": 1000, "intermediate_size": 262144},
     "about 5.2e\\+13 parameters"),
    ({"pad_token_id": 500, "vocab_size": 100}, "pad_token_id is 500, which is out of range"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"problem_type": "ranking"}, "problem_type 'ranking' is not one of"),
    ({"pruned_heads": {"7": [0]}}, "pruned_heads names layers or heads the model does not have"),
]


@pytest.mark.parametrize("fields, message", BAD_CONFIGS, ids=[str(f) for f, _ in BAD_CONFIGS])
def test_bad_config_fields_are_one_line_errors(fields, message, tmp_path):
    with pytest.raises(RobertaError, match=message):
        RobertaConfig(**{**TINY, **fields})
    # the same through a config.json, where such values arrive from a file
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **fields}))
    with pytest.raises(RobertaError, match=message):
        RobertaConfig.load(path)


def test_published_configs_still_pass():
    for config in (RobertaConfig.base(), RobertaConfig.large(), RobertaConfig.small(), RobertaConfig.tiny()):
        assert config.estimated_parameters() > 0
    with torch.device("meta"):  # the estimate that bounds sizes is the real count
        assert RobertaForMaskedLM(RobertaConfig.base()).num_parameters() == pytest.approx(
            RobertaConfig.base().estimated_parameters(), rel=0.01)


# ---- the config against the weights, before anything is built ----------------------------------

def _with_config(models, tmp_path, **fields) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors").write_bytes((models["A"] / "model.safetensors").read_bytes())
    config = json.loads((models["A"] / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **fields}))
    return target


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 5}, "num_hidden_layers = 5 but the weights hold 2 layers"),
    ({"num_hidden_layers": 1}, "num_hidden_layers = 1 but the weights hold 2 layers"),
    ({"hidden_size": 64}, "vocab_size, hidden_size = 120, 64 but the weights hold"),
    ({"vocab_size": 200}, "vocab_size, hidden_size = 200, 32"),
    ({"max_position_embeddings": 80}, "max_position_embeddings, hidden_size = 80, 32"),
    ({"intermediate_size": 64}, "intermediate_size, hidden_size = 64, 32"),
])
def test_config_that_does_not_describe_its_weights(models, tmp_path, fields, message, call):
    path = _with_config(models, tmp_path, **fields)
    with pytest.raises(RobertaError, match=message):
        RobertaForMaskedLM.from_pretrained(path)
    result = call("info", "-m", path)
    assert result.returncode == 2 and message.split(" but")[0] in one_error_line(result)


def test_head_sizes_come_from_the_weights(models, tmp_path):
    path = _with_config(models, tmp_path, classification_heads={"mnli": 7, "ghost": 4})
    with pytest.warns(RobertaWarning) as caught:
        config, _ = read_checkpoint(path)
    assert config.classification_heads == {"mnli": 3}
    messages = " | ".join(str(w.message) for w in caught)
    assert "head 'mnli' 7 classes but its weights have 3" in messages and "'ghost' that the weights lack" in messages


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_stored_as_integers_are_refused(models, tmp_path, dtype, call):
    path = _with_config(models, tmp_path)
    state = load_file(path / "model.safetensors")
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    state[key] = state[key].to(dtype)
    save_file(state, path / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(RobertaError, match=f"tensor {key} is stored as {name}, but model weights are floating"):
        RobertaForMaskedLM.from_pretrained(path)
    result = call("info", "-m", path)
    assert result.returncode == 2 and f"stored as {name}" in one_error_line(result)


def test_nan_and_infinite_weights_warn(models, tmp_path, call):
    path = _with_config(models, tmp_path)
    state = load_file(path / "model.safetensors")
    state["roberta.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    state["roberta.encoder.layer.0.output.dense.bias"][3] = float("inf")
    save_file(state, path / "model.safetensors")
    with pytest.warns(RobertaWarning, match=r"2 tensor\(s\) hold NaN or infinite values"):
        RobertaForMaskedLM.from_pretrained(path)
    result = call("info", "-m", path)
    assert result.returncode == 0 and "2 layers x 32" in result.stdout
    assert result.stderr.startswith("warning: ") and "NaN or infinite" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_check_agrees_with_isfinite_everywhere(dtype):
    # the check sums each part first: sums that overflow on finite values, NaN, infinities of both signs
    # (which sum to NaN), a bad value past the first part, and the largest finite values of each dtype
    from roberta.checkpoint import _finite

    big = torch.finfo(dtype).max
    cases = [torch.randn(1000, dtype=dtype), torch.full((8,), big, dtype=dtype), torch.full((8,), -big, dtype=dtype),
             torch.tensor([big, -big, big], dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000, dtype=dtype)
        t[517] = bad
        cases.append(t)
    cases.append(torch.tensor([float("inf"), -float("inf"), 1.0], dtype=dtype))
    late = torch.zeros((1 << 22) + 5, dtype=dtype)
    late[-1] = float("nan")  # in the second part
    cases += [late, torch.zeros(0, dtype=dtype)]
    for t in cases:
        assert _finite(t) == bool(torch.isfinite(t).all()), (dtype, t[:4])


def test_absurd_sizes_are_refused_at_once_in_little_memory(models, tmp_path):
    """Each case in a fresh process: refused in under a second, with under 100 MB of extra memory."""
    cases = {}
    for name, fields in {"layers": {"num_hidden_layers": 10_000_000},
                         "classes": {"classification_heads": {"mnli": 10_000_000_000}},
                         "vocab": {"vocab_size": 2 ** 40},
                         "positions": {"max_position_embeddings": 10 ** 9}}.items():
        (tmp_path / name).mkdir()
        path = _with_config(models, tmp_path / name, **fields)
        cases[name] = str(path)
    script = textwrap.dedent("""
        import json, resource, sys, time, tracemalloc, warnings
        import roberta
        from roberta import RobertaConfig, RobertaError, RobertaForSequenceClassification
        from roberta.hub import describe
        warnings.simplefilter("ignore")
        cases = json.loads(sys.argv[1])
        calls = {f"{name}:{how}": (how, path) for name, path in cases.items() for how in ("load", "info")}
        calls["config:layers"] = ("config", {"num_hidden_layers": 10 ** 7})
        calls["config:size"] = ("config", {"hidden_size": 65536, "num_attention_heads": 64,
                                           "intermediate_size": 262144, "num_hidden_layers": 1000})
        report = {}
        for name, (how, arg) in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            tracemalloc.start()
            start = time.perf_counter()
            try:
                if how == "load":
                    RobertaForSequenceClassification.from_pretrained(arg)
                elif how == "info":
                    describe(arg)
                else:
                    RobertaConfig(**arg)
                outcome = "accepted"
            except RobertaError as exc:
                outcome = str(exc)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            report[name] = [outcome, seconds, peak, grown]
        print(json.dumps(report))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report) == 10
    for name, (outcome, seconds, peak, grown) in report.items():
        assert outcome != "accepted", name
        assert seconds < 1.0, (name, seconds, outcome)
        assert peak < 100 * 2 ** 20 and grown < 100 * 2 ** 20, (name, peak, grown, outcome)


# ---- directories written whole: replace_dir, check_output ---------------------------------------

def test_replace_dir_swaps_whole_and_keeps_only_what_it_is_told(tmp_path):
    dst = tmp_path / "out"
    with replace_dir(dst) as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]
    with replace_dir(dst, keep=lambda name: name == "notes.md") as tmp:  # nothing old survives ...
        (dst / "notes.md").write_text("mine")
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt", "notes.md"]  # ... but what keep names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no debris beside it
    with pytest.raises(ZeroDivisionError):
        with replace_dir(dst) as tmp:
            (tmp / "c.txt").write_text("3")
            1 / 0
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt", "notes.md"]  # an error changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RobertaError, match="is a file, not a directory"):
        with replace_dir(tmp_path / "file"):
            pass


def test_check_output_refuses_files_and_the_input(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.pt").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RobertaError, match="is an existing file"):
        check_output(tmp_path / "file", tmp_path / "src")
    with pytest.raises(RobertaError, match="is the input"):
        check_output(tmp_path / "src", tmp_path / "src")
    with pytest.raises(RobertaError, match="is the input"):
        check_output(tmp_path / "src", tmp_path / "src" / "model.pt")
    with pytest.raises(RobertaError, match="holds the input"):
        check_output(tmp_path, tmp_path / "src")
    assert check_output(tmp_path / "new", tmp_path / "src") == tmp_path / "new"


def test_no_stale_file_wins_after_a_write(models, tmp_path):
    """decompress onto another compressed checkpoint; compress (fairseq) onto a stale config.json;
    save/convert onto another checkpoint: what loads afterwards is the new model, always."""
    from roberta.compress import compress_checkpoint, decompress_checkpoint

    dst = tmp_path / "dst"
    compress_checkpoint(models["B"], dst)
    decompress_checkpoint(models["A-z"], dst)
    assert not (dst / "model.rbz").exists()
    assert same_weights(weights_of(dst), models["A-weights"])

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 1}))
    (stale / "pytorch_model.bin").write_bytes(b"stale weights")
    (stale / "notes.txt").write_text("kept")
    compress_checkpoint(models["A-fairseq"], stale)
    assert json.loads((stale / "config.json").read_text())["num_hidden_layers"] == 2
    assert (stale / "notes.txt").read_text() == "kept" and not (stale / "pytorch_model.bin").exists()
    assert same_weights(weights_of(stale), models["A-fairseq-weights"])

    fairseq_dst = tmp_path / "fs"
    save_fairseq(tiny_model(2), fairseq_dst)
    RobertaForMaskedLM.from_pretrained(models["A"]).save_pretrained(fairseq_dst)  # model.pt must not win
    assert not (fairseq_dst / "model.pt").exists()
    assert same_weights(weights_of(fairseq_dst), models["A-weights"])


CLI_OUTPUT_FAULTS = [
    # (command, what the output is, message), each leaving the existing file untouched
    ("compress", "file", "is an existing file"),
    ("decompress", "file", "is an existing file"),
    ("convert", "file", "is an existing file"),
    ("compress", "same", "is the input"),
    ("convert", "same", "is the input"),
    ("compress", "parent", "holds the input"),
    # a directory of the user's (a config.json of theirs, no weights): never written into
    ("convert", "mine", "holds no checkpoint"),
    ("compress", "mine", "holds no checkpoint"),
    ("decompress", "mine", "holds no checkpoint"),
]


@pytest.mark.parametrize("command, output, message", CLI_OUTPUT_FAULTS)
def test_cli_outputs_onto_the_wrong_place(models, tmp_path, command, output, message, call):
    src = tmp_path / "src"
    src.mkdir()
    source = models["A-z"] if command == "decompress" else models["A"]
    for item in source.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    target = {"file": tmp_path / "existing.bin", "same": src, "parent": tmp_path, "mine": tmp_path / "mine"}[output]
    if output == "file":
        target.write_bytes(b"precious")
    if output == "mine":
        target.mkdir()
        (target / "config.json").write_text('{"foo": 1}')
        (target / "precious.txt").write_text("precious")
    result = call(command, src, target)
    assert result.returncode == 2 and message in one_error_line(result)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    if output == "file":
        assert target.read_bytes() == b"precious"
    if output == "mine":
        assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": '{"foo": 1}',
                                                                     "precious.txt": "precious"}


# ---- kill -9 in the middle of a write ------------------------------------------------------------
# The child pauses (prints PAUSED and sleeps) at a chosen moment of replace_dir, by wrapping the
# module's steps from outside, and the test kills it there with SIGKILL: right after the temporary
# directory is made, once every file is written in it, and right after the swap.

_CHILD = textwrap.dedent("""
    import functools, sys, time
    import roberta.fileio as fileio
    from roberta.cli import main

    point, argv = sys.argv[1], sys.argv[2:]

    def pause_after(module, name):
        original = getattr(module, name)
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if name != "mkdtemp" or ".dst.tmp-" in result:  # replace_dir's directory, nobody else's
                print("PAUSED", flush=True)
                time.sleep(60)
            return result
        setattr(module, name, wrapper)

    if point == "started":
        pause_after(fileio.tempfile, "mkdtemp")
    elif point == "written":
        pause_after(fileio, "_fsync_tree")
    elif point == "swapped":
        pause_after(fileio, "_exchange")
    if argv[0] == "save":
        from roberta import RobertaForMaskedLM
        RobertaForMaskedLM.from_pretrained(argv[1]).save_pretrained(argv[2])
    else:
        sys.exit(main(argv))
""")

KILLS = [("compress", "started"), ("compress", "written"), ("compress", "swapped"), ("decompress", "written"),
         ("decompress", "swapped"), ("save", "started"), ("save", "swapped"), ("convert", "written"),
         ("convert", "swapped")]


@pytest.mark.parametrize("operation, point", KILLS)
def test_kill_9_leaves_the_old_or_the_new_model(models, tmp_path, operation, point, call):
    from roberta.compress import compress_checkpoint

    dst = tmp_path / "dst"
    if operation == "compress":
        compress_checkpoint(models["B"], dst)  # the old model there is B, the new one A
    else:
        RobertaForMaskedLM.from_pretrained(models["B"]).save_pretrained(dst)
        if operation == "decompress":
            compress_checkpoint(models["B"], tmp_path / "old-z")
            for item in (tmp_path / "old-z").iterdir():  # a stale model.rbz beside B's safetensors
                (dst / item.name).write_bytes(item.read_bytes())
    src = {"compress": models["A"], "decompress": models["A-z"], "save": models["A"], "convert": models["A-fairseq"]}
    argv = [operation, str(src[operation]), str(dst)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, point, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline()
        assert line == b"PAUSED\n", child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    new = models["A-fairseq-weights" if operation == "convert" else "A-weights"]
    expected = new if point == "swapped" else models["B-weights"]
    assert same_weights(weights_of(dst), expected)
    assert RobertaForMaskedLM.from_pretrained(dst) is not None
    debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")]
    assert len(debris) == 1, debris  # the killed write's temporary directory ...
    if operation == "save":
        RobertaForMaskedLM.from_pretrained(models["A"]).save_pretrained(dst)
    else:
        result = call(*argv)
        assert result.returncode == 0, result.stderr
    assert same_weights(weights_of(dst), new)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # ... is gone after the next


# ---- compressed files: bounds checked before decoding ---------------------------------------------

def _forge_blob(blob: bytes, edit) -> bytes:
    """A tensor blob whose header JSON `edit` changed, with every hash made valid again."""
    import struct

    import xxhash

    length, _ = struct.unpack_from("<IQ", blob)
    entry = edit(json.loads(blob[12:12 + length]))
    text = json.dumps(entry, separators=(",", ":")).encode()
    return struct.pack("<IQ", len(text), xxhash.xxh3_64_intdigest(text)) + text + blob[12 + length:]


def test_a_chunk_table_declaring_more_than_its_frames_hold_is_refused_before_decoding(monkeypatch):
    from roberta import compress

    blob = compress.compress_tensor(torch.zeros(1000))  # fp16-exact zeros: two zstd planes

    def inflate(entry):  # claim 131072 elements from frames that hold 1000 bytes each
        entry["shape"] = [compress.CHUNK_ELEMENTS]
        entry["chunks"][0][1] = compress.CHUNK_ELEMENTS
        for plane in entry["chunks"][0][3]:
            assert plane[0] == compress.ZSTD
            plane[2] = compress.CHUNK_ELEMENTS
        return entry

    forged = _forge_blob(blob, inflate)
    monkeypatch.setattr(compress.np, "empty", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(RobertaError, match="malformed header of tensor 'w'"):
        compress.decompress_tensor(forged, name="w")


def test_only_the_tensors_a_model_has_are_decoded(models, tmp_path, monkeypatch):
    from roberta import compress

    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_bytes((models["A"] / "config.json").read_bytes())
    state = load_file(models["A"] / "model.safetensors")
    compress.save_file({**state, "zz_optimizer_state": torch.randn(1000)}, path / "model.rbz")
    data = bytearray((path / "model.rbz").read_bytes())
    data[-1] ^= 0xFF  # the extra tensor (written last) is now corrupt: decoding it would be an error
    (path / "model.rbz").write_bytes(bytes(data))
    assert same_weights(weights_of(path), models["A-weights"])
    with pytest.raises(RobertaError, match="zz_optimizer_state"):
        compress.load_file(path / "model.rbz")


def test_compressed_sizes_are_checked_against_the_config_before_decoding(models, tmp_path, monkeypatch):
    from roberta import compress

    path = _with_config(models, tmp_path, vocab_size=100)
    compress.save_file(load_file(path / "model.safetensors"), path / "model.rbz")
    (path / "model.safetensors").unlink()
    monkeypatch.setattr(compress, "decompress_tensor", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(RobertaError, match="vocab_size, hidden_size = 100, 32 but the weights hold"):
        read_checkpoint(path)


# ---- the command line: every mistake is one `error:` line and exit status 2 ------------------------

LONG = "word " * 200


def _cli_cases(hub, tmp):
    """(argv, stdin, message, paths that must not exist afterwards)."""
    m = str(hub["hf"])
    return [
        (["compress", m, tmp / "z", "--threads", "-3"], "", "argument --threads: must be 1 or more, got -3", ["z"]),
        (["compress", m, tmp / "z", "--threads", "two"], "", "argument --threads: expected a whole number", ["z"]),
        (["decompress", m, tmp / "z"], "", "has no model.rbz to decompress", ["z"]),
        (["convert", m, tmp / "c", "--to", "onnx"], "", "argument --to: invalid choice: 'onnx'", ["c"]),
        (["fill-mask", "-m", m, "--topk", "0", "Hi <mask>"], "", "argument --topk: must be 1 or more", []),
        (["fill-mask", "-m", m, "--device", "cuda", "Hi <mask>"], "", "this PyTorch build has no CUDA", []),
        (["fill-mask", "-m", m, "--device", "quantum", "Hi <mask>"], "", "unknown device 'quantum'", []),
        (["fill-mask", "-m", m, "no mask here"], "", "fill_mask needs a <mask> in the text", []),
        (["fill-mask", "-m", m, LONG + "<mask>"], "", "the model takes at most 64", []),
        # a refused input among several is named by its line or argument (its output and later ones absent)
        (["fill-mask", "-m", m], "Hi <mask>\nno mask here\n", "stdin line 2: fill_mask needs a <mask>", []),
        (["fill-mask", "-m", m], "Hi <mask>\n" + LONG + "<mask>\n", "stdin line 2: input has", []),
        (["fill-mask", "-m", m, "Hi <mask>", "no mask"], "", "argument 2: fill_mask needs a <mask>", []),
        (["fill-mask", "-m", m], "Hi <mask>\n\nHo <mask>\n", "stdin line 2 is empty", []),
        (["predict", "-m", m], "Hi\n" + LONG + "\n", "stdin line 2 has", []),
        (["predict", "-m", m, "Hi", LONG], "", "argument 2: input has", []),
        (["answer", "-m", m], "Who?\tBob.\n", "error: answer needs a question-answering checkpoint", []),
        (["encode", "-m", m, "caf\udce9"], "", "argument 4 is not valid UTF-8", []),
        (["encode", "-m", str(tmp / "nowhere"), "hi"], "", "is neither an existing path nor a known model", []),
        (["decode", "-m", m, "1", "x"], "", "decode takes token ids", []),
        (["predict", "-m", m, "--head", "nope", "a\tb"], "", "nope", []),
        (["features", "-m", m, "-o", tmp / "f.txt", "hi"], "", ".npy or .jsonl", ["f.txt"]),
        (["preprocess", tmp / "missing.txt", "--out", tmp / "p", "--vocab-size", "0"], "", "must be 1 or more", ["p"]),
        (["info", "-m", tmp], "", "is not a model", []),
        (["no-such-command"], "", "invalid choice: 'no-such-command'", []),
        (["info"], "", "info needs -m MODEL", []),
        (["features", "-m", m], "", "the following arguments are required: -o/--out", []),
    ]


def test_cli_mistakes_table(hub_checkpoints, tmp_path, call):
    for argv, stdin, message, absent in _cli_cases(hub_checkpoints, tmp_path):
        try:
            result = call(*argv, stdin=stdin)
        except SystemExit as exc:  # argparse exits; as a process it is the same status and stderr
            result = subprocess.CompletedProcess(argv, exc.code, "", "")
            import contextlib
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
                main(list(map(str, argv)))
            result.stderr = err.getvalue()
        assert result.returncode == 2, (argv, result.stderr)
        line = one_error_line(result)
        assert message in line, (argv, line)
        for name in absent:
            assert not (tmp_path / name).exists(), (argv, name)


def test_invalid_utf8_on_stdin_and_in_argv(hub_checkpoints):
    result = run("encode", "-m", hub_checkpoints["hf"], stdin=b"fine\ncaf\xe9\n")
    assert result.returncode == 2 and "stdin line 2 is not UTF-8" in one_error_line(result)
    # streamed: line 1's ids come out, then the error; nothing for the bad line or after it
    assert result.stdout == run("encode", "-m", hub_checkpoints["hf"], stdin=b"fine\n").stdout
    result = run("encode", "-m", hub_checkpoints["hf"], b"caf\xe9")
    assert result.returncode == 2 and "argument 4 is not valid UTF-8 (byte b'\\xe9'" in one_error_line(result)


def test_a_closed_pipe_ends_quietly(hub_checkpoints):
    script = (f"{sys.executable} -m roberta fill-mask -m {hub_checkpoints['hf']} --topk 3 | head -1; "
              "echo \"status ${PIPESTATUS[0]}\"")
    texts = "".join(f"Sentence {i} is <mask>.\n" for i in range(3000))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1"}
    result = subprocess.run(["bash", "-c", script], input=texts, capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.splitlines()[0] == "Sentence 0 is <mask>."
    assert result.stdout.splitlines()[-1] == "status 141"
    assert result.stderr == ""


def test_encode_truncate_keeps_the_first_max_tokens(tiny_hub):
    ids = tiny_hub.encode(LONG, truncate=True)
    assert len(ids) == tiny_hub.max_tokens and ids[-1] == 2 and ids[0] == 0
    assert ids[:-1].tolist() == tiny_hub.encode(LONG)[:tiny_hub.max_tokens - 1].tolist()
    pair = tiny_hub.encode([LONG, "short"], ["x", "y"], truncate=True)
    assert len(pair[0]) == tiny_hub.max_tokens and pair[1].tolist() == tiny_hub.encode("short", "y").tolist()
    tiny_hub.predict("mnli", tiny_hub.encode(LONG, truncate=True))  # what the too-long error advises works


def test_fill_mask_with_a_random_lm_head_warns_and_the_command_refuses(hub_checkpoints, tmp_path, call):
    import roberta

    target = tmp_path / "no-lm-head"
    target.mkdir()
    for item in hub_checkpoints["hf"].iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    state = load_file(target / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("lm_head.")}, target / "model.safetensors")
    with pytest.warns(RobertaWarning, match="no masked-LM head"):
        roberta.load(target).fill_mask("Hello <mask>!")
    result = call("fill-mask", "-m", target, "Hello <mask>!")  # the command line refuses, as the server's 409
    assert result.returncode == 2 and "has no masked-LM head (lm_head.*)" in one_error_line(result)


def test_every_command_explains_itself_with_defaults():
    import argparse

    from roberta import __version__
    from roberta.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) >= 15
    for name, command in commands.items():
        assert command.description, f"`roberta {name} --help` does not say what it does"
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue  # positionals, switches
            assert action.help, f"roberta {name} {action.option_strings[0]}: no help"
            text = formatter._get_help_string(action)
            assert "default" in text or action.required, f"roberta {name} {action.option_strings[0]}: no default shown"
    compress_help = commands["compress"].format_help()
    assert "store a checkpoint's weights losslessly compressed" in compress_help
    fill_help = commands["fill-mask"].format_help()
    assert "(default 5)" in fill_help and "(required)" in fill_help
    assert "(default: dev)" in commands["evaluate"].format_help()
    result = run("--version")
    assert result.returncode == 0 and result.stdout.decode().startswith(f"roberta {__version__} (torch ")


# ---- fairseq 0.10: a real omegaconf DictConfig as `cfg` -------------------------------------------

def test_fairseq_model_pt_with_an_omegaconf_cfg(tmp_path):
    import pickle

    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is a test dependency (pip install -e '.[test]')")
    from roberta.checkpoint import hf_to_fairseq, read_fairseq

    model = tiny_model(5)
    cfg = omegaconf.OmegaConf.create({
        "_name": None,
        "common": {"fp16": True, "seed": 1, "log_interval": 100},
        "model": {"_name": "roberta_base", "encoder_attention_heads": 2, "encoder_layers": 2, "dropout": 0.15,
                  "attention_dropout": 0.05, "activation_fn": "gelu", "encoder_embed_dim": 32},
        "optimization": {"lr": [0.0005], "update_freq": [16], "max_update": 500000},
        "task": {"_name": "masked_lm", "data": "/data/bin", "tokens_per_sample": 512},
    })
    assert isinstance(cfg, omegaconf.DictConfig)
    path = tmp_path / "model.pt"
    torch.save({"args": None, "cfg": cfg, "model": hf_to_fairseq(model.state_dict())}, path)
    config, state = read_fairseq(path)
    assert (config.num_attention_heads, config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (2, 0.15, 0.05)
    loaded = RobertaForMaskedLM.from_pretrained(tmp_path)
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    assert torch.equal(loaded(ids).logits, RobertaForMaskedLM.from_pretrained(tmp_path)(ids).logits)
    # the Python 2 names protocol 2 uses are mapped, not trusted: a callable is still refused
    for module, name in (("__builtin__", "eval"), ("os", "system"), ("posix", "system")):
        class Evil:
            def __reduce__(self):
                return (getattr(__import__("builtins" if module == "__builtin__" else module), name), ("1",))
        bad = tmp_path / f"{name}-{module}.pt"
        torch.save({"model": {}, "cfg": Evil()}, bad, pickle_protocol=2)
        with pytest.raises(RobertaError, match="was refused: it references"):
            read_fairseq(bad)


# ---- tokenizer files that do not belong together ---------------------------------------------------

def _copy_bpe(bpe_dir, tmp_path, *names):
    target = tmp_path / "tok"
    target.mkdir()
    for name in names:
        (target / name).write_bytes((bpe_dir / name).read_bytes())
    return target


def test_an_empty_merges_file_is_refused(bpe_dir, tmp_path):
    from roberta.tokenizer import RobertaTokenizer

    target = _copy_bpe(bpe_dir, tmp_path, "vocab.json")
    for text in ("", "#version: 0.2\n"):
        (target / "merges.txt").write_text(text)
        with pytest.raises(RobertaError, match="merges.txt holds no merges"):
            RobertaTokenizer.from_pretrained(target)


def test_vocab_json_that_disagrees_with_dict_txt_is_refused(bpe_dir, tmp_path, call):
    from roberta.tokenizer import RobertaTokenizer

    target = _copy_bpe(bpe_dir, tmp_path, "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "dict.txt")
    assert len(RobertaTokenizer.from_pretrained(target)) == 50265  # the real files agree
    lines = (target / "dict.txt").read_text().splitlines(keepends=True)
    lines[10], lines[11] = lines[11], lines[10]  # two rows swapped: two tokens change ids
    (target / "dict.txt").write_text("".join(lines))
    with pytest.raises(RobertaError, match="vocab.json and dict.txt do not describe the same vocabulary"):
        RobertaTokenizer.from_pretrained(target)
    (target / "encoder.json").unlink()
    (target / "vocab.bpe").unlink()
    (target / "dict.txt").write_text("".join(lines[:-100]))  # without encoder.json: the sizes are compared
    with pytest.raises(RobertaError, match="50265 tokens in vocab.json, 50165 in dict.txt"):
        RobertaTokenizer.from_pretrained(target)
    result = call("encode", "-m", target, "hi")
    assert result.returncode == 2 and "do not describe the same vocabulary" in one_error_line(result)


# ---- preprocess: a smaller vocabulary than asked; the validation split of --doc-per-file -----------

def test_preprocess_warns_about_a_smaller_vocabulary_and_holds_out_lines_per_file(tmp_path, call):
    from roberta.data import preprocess, read_meta

    files = []
    for i in range(3):
        path = tmp_path / f"{i}.txt"
        path.write_text("".join(f"File {i} line {j} says a few words.\n" for j in range(200)))
        files.append(path)
    with pytest.warns(RobertaWarning, match=r"has [0-9,]+ tokens, fewer than the 32,000 asked"):
        meta = preprocess(files, tmp_path / "data", vocab_size=32000, doc_per_file=True, valid_fraction=0.01,
                          workers=1, progress=False)
    valid = sum(s["tokens"] for s in meta["shards"]["valid"])
    train = sum(s["tokens"] for s in meta["shards"]["train"])
    assert meta["valid_unit"] == "line" and sum(s["sentences"] for s in meta["shards"]["valid"]) == 6
    assert 0.005 < valid / (valid + train) < 0.02  # about valid_fraction, not a third
    assert sum(s["documents"] for s in meta["shards"]["train"]) == 3
    assert read_meta(tmp_path / "data")["vocab_size"] == meta["vocab_size"] < 32000
    result = call("preprocess", *files, "--out", tmp_path / "cli", "--vocab-size", "32000", "--doc-per-file",
                  "--workers", "1")
    assert result.returncode == 0 and "warning: the trained vocabulary has" in result.stderr


def test_replacing_the_current_directory_moves_the_process_into_the_new_one(tmp_path, monkeypatch):
    dst = tmp_path / "run"
    dst.mkdir()
    (dst / "model.safetensors").write_text("old")
    (dst / "metrics.jsonl").write_text("kept")
    monkeypatch.chdir(dst)
    with replace_dir(".", keep=lambda name: name == "metrics.jsonl") as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert Path("model.safetensors").read_text() == "new" and Path("metrics.jsonl").read_text() == "kept"
    assert os.getcwd() == str(dst) and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_library_thread_counts_are_checked():
    from roberta import compress

    for bad in (-3, 0, 2.5):
        with pytest.raises(RobertaError, match="threads must be a whole number of at least 1"):
            compress.compress_tensor(torch.zeros(300_000), threads=bad)

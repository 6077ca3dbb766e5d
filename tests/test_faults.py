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
    return subprocess.run([sys.executable, "-m", "roberta", *map(str, args)], input=stdin, capture_output=True,
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
    (stale / "notes.txt").write_text("kept")
    compress_checkpoint(models["A-fairseq"], stale)
    assert json.loads((stale / "config.json").read_text())["num_hidden_layers"] == 2
    assert (stale / "notes.txt").read_text() == "kept"
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
]


@pytest.mark.parametrize("command, output, message", CLI_OUTPUT_FAULTS)
def test_cli_outputs_onto_the_wrong_place(models, tmp_path, command, output, message, call):
    src = tmp_path / "src"
    src.mkdir()
    source = models["A-z"] if command == "decompress" else models["A"]
    for item in source.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    target = {"file": tmp_path / "existing.bin", "same": src, "parent": tmp_path}[output]
    if output == "file":
        target.write_bytes(b"precious")
    result = call(command, src, target)
    assert result.returncode == 2 and message in one_error_line(result)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    if output == "file":
        assert target.read_bytes() == b"precious"


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

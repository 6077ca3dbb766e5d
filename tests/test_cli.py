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
from roberta.errors import RobertaError
from roberta.tokenizer import RobertaTokenizer
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


def test_a_refused_line_is_named_after_the_outputs_of_every_line_before_it(hub_checkpoints, tiny_hub, call):
    """Commands that print run 32 lines at a time. A line the library refuses (no <mask>, too long) or
    that cannot be read (blank) stops the command with an error naming it, after the output of every
    line before it, those of its own chunk included (line 35: the second chunk's third); a call the
    library refuses whatever the lines (a model without the head) names no line."""
    good = [f"Line {i} has a <mask>." for i in range(40)]
    expected = [tiny_hub.fill_mask(text, topk=1, as_dicts=True)[0]["sequence"] for text in good[:34]]
    long = " word" * (tiny_hub.max_tokens + 10) + " <mask>"
    for bad, problem in (("no mask here", ": fill_mask needs a <mask> in the text"),
                         (long, f": input has {tiny_hub.max_tokens + 13} tokens but the model takes at most"),
                         ("", " is empty; each line is one input and one output row")):
        result = call("fill-mask", "-m", hub_checkpoints["hf"], "--json", "--topk", 1, "--precision", "fp32",
                      stdin="\n".join(good[:34] + [bad] + good[34:]) + "\n")
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: stdin line 35{problem}"), result.stderr
        assert [json.loads(line)[0]["sequence"] for line in result.stdout.splitlines()] == expected
    result = call("fill-mask", "-m", hub_checkpoints["hf"], "--topk", 1, "--precision", "fp32", good[0], "no mask")
    assert result.returncode == 2 and result.stderr.startswith("error: argument 2: fill_mask needs a <mask>")
    assert result.stdout.splitlines()[0] == good[0]
    # predict's errors name the line themselves
    result = call("predict", "-m", hub_checkpoints["hf"], "--json", "--precision", "fp32",
                  stdin="\n".join(good[:34] + [long] + good[34:]) + "\n")
    assert result.returncode == 2 and result.stderr.startswith("error: stdin line 35 has "), result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 34 and rows[0]["probabilities"] == pytest.approx(
        tiny_hub.predict("mnli", tiny_hub.encode(good[0])).exp()[0].tolist(), abs=1e-5)
    result = call("predict", "-m", hub_checkpoints["hf"], "--precision", "fp32", good[0], long)
    assert result.returncode == 2 and result.stderr.startswith("error: argument 2: input has "), result.stderr
    result = call("answer", "-m", hub_checkpoints["hf"], "--precision", "fp32", stdin="Who?\tBob.\n")
    assert result.returncode == 2 and result.stderr.startswith("error: answer needs a question-answering checkpoint")


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
    assert "mnli (sequence classification, 3 outputs)" in readable.stdout and f"{tiny_hub.model.num_parameters():,}" in readable.stdout


def test_download_then_use_offline(hub_checkpoints, bpe_dir, tmp_path, call):
    cache = tmp_path / "cache"
    with FileServer() as server:
        serve_models(server, hub_checkpoints, bpe_dir)
        result = run("download", "roberta.base", "--cache-dir", cache, env={"ROBERTA_OFFLINE": "",
                                                                             "ROBERTA_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cache / "roberta.base")
    listing = call("download", "--cache-dir", cache).stdout.splitlines()
    assert listing[0].startswith("fairseq releases (cached: downloaded, works offline; not cached: ")
    assert listing[1].split() == ["roberta.base", "cached"] and listing[2].split() == ["roberta.large", "not", "cached"]
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


CONFLICTS = [
    # (arguments after -m MODEL, what the one error line says); each refused before anything is written
    (("features", "-o", "{out}/v.npy", "--truncate", "--window", "64", "hi"), "--truncate cuts a long input"),
    (("features", "-o", "{out}/v.npy", "--truncate", "--stride", "8", "hi"), "give one of them"),
    (("predict", "--truncate", "--window", "64", "hi"), "--truncate cuts a long input"),
    (("features", "-o", "{out}/v.npy", "--resume", "hi"), "is one file, written whole each run"),
    (("features", "-o", "{out}/v.jsonl", "--overwrite", "hi"), "is one file, written whole each run"),
    (("answer", "--context", "a b", "--null-threshold", "1", "q?"), "only --no-answer allows"),
    (("answer", "--context", "a b", "q?\tits own context"), "argument 1 has a context after a TAB, and --context "
                                                              "gives another: drop one"),
    (("answer", "q? without a context"), "argument 1 has no context: give QUESTION<TAB>CONTEXT"),
    (("answer", "-i", "{out}/none.jsonl"), "cannot read input"),
    (("zero-shot", "--labels", "good,bad,good", "hi"), "candidate label 'good' is given more than once"),
    (("features", "-o", "{out}/v.npy", "--layer", "-4", "hi"), "or -1 (the last) to -3 counting from the end"),
]


@pytest.mark.parametrize("args, message", CONFLICTS)
def test_options_that_cannot_be_meant_together_exit_2_with_one_line(hub_checkpoints, tmp_path, call, args, message):
    result = call(args[0], "-m", hub_checkpoints["hf"], *[a.format(out=tmp_path) for a in args[1:]])
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_full_or_closed_stream_and_out_of_range_numbers_exit_2_with_one_line(hub_checkpoints, tmp_path, call,
                                                                               monkeypatch):
    model = str(hub_checkpoints["hf"])
    if Path("/dev/full").exists():  # a real process: its last flush at exit must not fail a second time
        result = subprocess.run(f"{sys.executable} -m roberta encode -m {model} hi > /dev/full", shell=True,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_OFFLINE": "1"})
        assert (result.returncode, result.stderr) == (2, "error: cannot write the output: No space left on device\n")
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed stdin (<&-)
    assert main(["encode", "-m", model]) == 2
    (tmp_path / "rows.npy").mkdir()  # a directory where the output file goes: named, not a temporary file
    (tmp_path / "in.txt").write_text("a\nb\n")
    assert call("features", "-m", model, "-i", tmp_path / "in.txt", "-o", tmp_path / "rows.npy").stderr == \
        f"error: {tmp_path / 'rows.npy'} is a directory; give the name of a file to write\n"
    # a command without --allow-empty does not offer it
    assert call("fill-mask", "-m", model, "").stderr == ("error: argument line 1 is empty; each line is one input "
                                                         "and one output row, so remove it\n")
    assert call("decode", "-m", model, "99999999999999999999999").stderr == \
        "error: cannot decode id 99999999999999999999999: the vocabulary has ids 0..50264\n"
    for command in (("fill-mask", "-m", model, "a <mask>"), ("compress", model, tmp_path / "c")):
        with pytest.raises(SystemExit) as exit_info:  # argparse: past any machine's cores
            call(*command, "--threads", "100000")
        assert exit_info.value.code == 2
    with pytest.raises(RobertaError, match="is too large: at most 16,777,216"):
        RobertaTokenizer.train_from_iterator(["a b c"], vocab_size=2**31)


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
    assert f"auto -> {info['precision']}" in readable.stdout and "mnli (sequence classification, 3 outputs)" in readable.stdout
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


# ---- a newcomer's first steps: fast help, run directories, label names, what each error says ------


def test_help_and_version_answer_without_importing_torch():
    script = ("import sys; from roberta.cli import main\n"
              "for args in (['--help'], ['--version']):\n"
              "    try:\n        main(args)\n    except SystemExit as exit:\n        assert exit.code == 0\n"
              "print(sorted(m for m in ('torch', 'numpy', 'roberta.hub') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "[]" and lines[-2] == f"roberta {roberta.__version__} (torch {torch.__version__}, " \
        f"Python {sys.version.split()[0]})"


def fine_tuning_run(hf_dir: Path, run: Path) -> Path:
    """A directory laid out as `roberta finetune --out run` leaves it: recipe.json, model/, checkpoints/."""
    import shutil

    shutil.copytree(hf_dir, run / "model")
    (run / "recipe.json").write_text("{}")
    return run


def test_a_run_directory_resolves_to_its_model_with_a_note(hub_checkpoints, tiny_hub, tmp_path, call):
    run = fine_tuning_run(hub_checkpoints["hf"], tmp_path / "sst2-run")
    for command in (("encode", "-m", run, "Hello world!"), ("predict", "-m", run, "--json", "--precision", "fp32", "Hello world!")):
        result = call(*command)
        assert result.returncode == 0, result.stderr
        assert result.stderr == f"note: {run} is a fine-tuning run; using its model, {run / 'model'}\n"
    assert call("encode", "-m", run, "Hello world!").stdout == "0 31414 232 328 2\n"
    expected = tiny_hub.predict("mnli", tiny_hub.encode("Hello world!")).exp()[0]
    assert json.loads(result.stdout)["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)
    info = call("info", "-m", run, "--json")
    assert json.loads(info.stdout)["path"] == str(run / "model")


def test_not_a_model_says_what_the_directory_is_and_which_path_to_use(hub_checkpoints, tmp_path, call):
    import shutil

    pretraining = tmp_path / "pretrain-run"  # killed before its model/: only a checkpoint so far
    (pretraining / "checkpoints").mkdir(parents=True)
    (pretraining / "pretrain.json").write_text("{}")
    shutil.copytree(hub_checkpoints["hf"], pretraining / "checkpoints" / "step-40")
    job = tmp_path / "vectors"
    job.mkdir()
    (job / "job.json").write_text("{}")
    holder = tmp_path / "holder"
    shutil.copytree(hub_checkpoints["hf"], holder / "my-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {
        pretraining: f"error: {pretraining} is a pretraining run that has not written its model/ yet: pass its "
                     f"latest checkpoint, {pretraining / 'checkpoints' / 'step-40'}, or finish the run with --resume, "
                     f"then pass {pretraining / 'model'}",
        job: f"error: {job} is the output of a sharded features/predict job, not a model; pass a checkpoint directory",
        holder: f"error: {holder} is not a model: it has neither config.json (Hugging Face) nor model.pt (fairseq); "
                f"pass the model inside it, {holder / 'my-model'}",
        empty: f"error: {empty} is not a model: it has neither config.json (Hugging Face) nor model.pt (fairseq); "
               "pass a checkpoint directory"}
    for directory, message in expected.items():
        for command in (("encode", "-m", directory, "Hi"), ("predict", "-m", directory, "Hi"),
                        ("info", "-m", directory), ("evaluate", "--task", "SST-2", "--data", tmp_path, "--model",
                                                    directory)):
            result = call(*command)
            assert (result.returncode, result.stderr) == (2, message + "\n"), command


@pytest.fixture
def labelled(hub_checkpoints, tmp_path):
    """The tiny model with its head named as fine-tuning names a GLUE task's, and the task's label names."""
    import shutil

    directory = tmp_path / "sst-2"
    shutil.copytree(hub_checkpoints["hf"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["classification_heads"] = {"sst-2": config["classification_heads"].pop("mnli")}
    config.update(head_name="sst-2", id2label={"0": "negative", "1": "neutral", "2": "positive"})
    (directory / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = {k.replace("classification_heads.mnli.", "classification_heads.sst-2."): v
               for k, v in load_file(directory / "model.safetensors").items()}
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("head", ["sst-2", "sst2", "SST-2", "Sst_2"])
def test_predict_prints_label_names_under_a_header_and_finds_the_head_by_any_spelling(labelled, tiny_hub, head, call):
    result = call("predict", "-m", labelled, "--head", head, "--precision", "fp32", "a great movie", "Hello world!")
    assert result.returncode == 0, result.stderr
    names = ["negative", "neutral", "positive"]
    probs = tiny_hub.predict("mnli", [tiny_hub.encode("a great movie"), tiny_hub.encode("Hello world!")]).exp()
    lines = result.stdout.splitlines()
    assert lines[0] == "label\tnegative neutral positive\tinput" and len(lines) == 3
    for line, row, text in zip(lines[1:], probs.tolist(), ["a great movie", "Hello world!"]):
        label, numbers, echoed = line.split("\t")
        assert label == names[max(range(3), key=row.__getitem__)] and echoed == text
        assert [float(p) for p in numbers.split()] == pytest.approx(row, abs=1e-4)
    machine = call("predict", "-m", labelled, "--head", head, "--json", "a great movie").stdout.splitlines()
    assert len(machine) == 1 and json.loads(machine[0])["labels"] == names
    hub = roberta.load(labelled, precision="fp32")
    assert hub.labels(head) == names
    torch.testing.assert_close(hub.predict(head, hub.encode("a great movie")).exp()[0], probs[0], rtol=0, atol=1e-5)


def test_an_unknown_head_names_the_ones_there_are(labelled, call):
    result = call("predict", "-m", labelled, "--head", "mnli", "--precision", "fp32", "a great movie")
    assert (result.returncode, result.stderr) == (2, "error: this model has no head named 'mnli': it has sst-2\n")


def test_info_shows_every_head_with_its_task_and_labels(bpe_dir, tmp_path, call):
    from roberta import RobertaConfig, RobertaForQuestionAnswering, RobertaForTokenClassification, RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(bpe_dir)
    tagger, reader = tmp_path / "ner", tmp_path / "qa"
    RobertaForTokenClassification(RobertaConfig.tiny(id2label={0: "O", 1: "B-PER", 2: "I-PER"})).save_pretrained(
        tagger, tokenizer=tokenizer)
    RobertaForQuestionAnswering(RobertaConfig.tiny()).save_pretrained(reader, tokenizer=tokenizer)
    heads = {path: next(line for line in call("info", "-m", path).stdout.splitlines() if line.startswith("heads"))
             for path in (tagger, reader)}
    assert heads[tagger] == "heads       token_classification (token classification, 3 outputs: O, B-PER, I-PER)"
    assert heads[reader] == "heads       qa (question answering, 2 outputs: start, end)"
    tasks = json.loads(call("info", "-m", tagger, "--json").stdout)["tasks"]
    assert tasks == [{"name": "token_classification", "task": "token classification", "classes": 3,
                      "labels": ["O", "B-PER", "I-PER"]}]


def test_compress_prints_the_sizes_and_the_ratio(hub_checkpoints, tmp_path, call):
    result = call("compress", hub_checkpoints["hf"], tmp_path / "z")
    assert result.returncode == 0, result.stderr
    before = (hub_checkpoints["hf"] / "model.safetensors").stat().st_size
    after = (tmp_path / "z" / "model.rbz").stat().st_size
    assert result.stdout == (f"wrote {tmp_path / 'z' / 'model.rbz'}: {after / 2**20:.2f} MiB, from "
                             f"{before / 2**20:.2f} MiB of weights ({after / before:.1%} of the size)\n")
    back = json.loads(call("decompress", tmp_path / "z", tmp_path / "back", "--json").stdout)
    assert back == {"path": str(tmp_path / "back" / "model.safetensors"), "bytes_before": after,
                    "bytes_after": before, "ratio": before / after}


def test_sharded_job_errors_name_the_line_leave_nothing_and_overwrite_starts_over(hub_checkpoints, tmp_path, call):
    lines = ["short line"] * 2 + ["word " * 200] + ["short line"] * 6  # too long, in the first shard
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vectors"
    failed = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", out, "--shard-rows", "4",
                  "--precision", "fp32")
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (f"error: {corpus} line 3 has 203 tokens but the model takes at "
                                              "most 64; pass truncate=True (--truncate) to keep the first 64, or shorten it")
    assert failed.stderr.count("error:") == 1 and failed.stderr.count("\n") == 1  # the bar left no line
    assert not out.exists()  # nothing computed: no directory asking for --resume
    (tmp_path / "kept").mkdir()  # a directory the user made is kept, and left as it was
    again = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", tmp_path / "kept", "--shard-rows", "4",
                 "--no-progress")
    assert again.returncode == 2 and list((tmp_path / "kept").iterdir()) == []
    done = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", out, "--truncate", "--shard-rows", "4")
    assert done.returncode == 0, done.stderr
    first = np.load(out / "features-00000.npy")
    refused = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", out, "--shard-rows", "4",
                   "--precision", "fp32")
    assert (refused.returncode, refused.stderr) == (2, f"error: {out} already exists; pass --resume to continue the "
                                                       "job in it, --overwrite to start it over, or choose a new directory\n")
    over = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", out, "--truncate", "--shard-rows", "3",
                "--overwrite")
    assert over.returncode == 0, over.stderr
    assert sorted(p.name for p in out.glob("features-*.npy")) == [f"features-0000{k}.npy" for k in range(3)]
    np.testing.assert_array_equal(np.load(out / "features-00000.npy"), first[:3])
    not_a_job = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", tmp_path, "--overwrite")
    assert (not_a_job.returncode, not_a_job.stderr) == (2, f"error: {tmp_path} holds no job.json: it is not a job's "
                                                           "output, so --overwrite leaves it alone; choose a new directory\n")
    # a file named job.json does not make a directory a job's: --overwrite removes nothing of the user's
    for name, record, extra in (("ci", '{"name": "my CI job"}', None), ("list", "[1]", None),
                                ("mixed", (out / "job.json").read_text(), "photos/a.jpg"),
                                ("notes", (out / "job.json").read_text(), "notes.txt")):
        mine = tmp_path / name
        mine.mkdir()
        (mine / "job.json").write_text(record)
        if extra:
            (mine / extra).parent.mkdir(exist_ok=True)
            (mine / extra).write_text("the user's")
        refused = call("features", "-m", hub_checkpoints["hf"], "-i", corpus, "-o", mine, "--overwrite")
        reason = "has a job.json that is not a job's record" if extra is None else \
            f"holds {extra.split('/')[0]}, which no job writes"
        assert (refused.returncode, refused.stderr) == (2, f"error: {mine} {reason}, so --overwrite leaves it alone; "
                                                           "choose a new directory\n")
        assert (mine / "job.json").read_text() == record and (extra is None or (mine / extra).is_file())


def test_predict_with_a_one_output_head_prints_its_score(bpe_dir, tmp_path, call):
    """A regression head (STS-B) or a cross-encoder has one output: its softmax is always 1, so predict
    prints the score itself, as fairseq's regression heads are read (return_logits), and shards hold it."""
    from roberta.hub import RobertaHub
    from roberta.model import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    tokenizer = RobertaTokenizer.from_pretrained(bpe_dir)
    model = RobertaForMaskedLM(RobertaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=66))
    head = model.register_classification_head("sts", 1)
    with torch.no_grad():
        head.out_proj.bias.fill_(2.5)
    RobertaHub(model, tokenizer).save(tmp_path / "sts")
    hub = roberta.load(tmp_path / "sts", precision="fp32")
    texts = ["A man sleeps.\tA person rests.", "a dog"]
    want = [hub.predict("sts", hub.encode(*t.split("\t")), return_logits=True)[0, 0].item() for t in texts]
    printed = call("predict", "-m", tmp_path / "sts", "--head", "sts", "--precision", "fp32", *texts)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0] == "score\tinput" and [line.split("\t")[1:] for line in lines[1:]] == [t.split("\t") for t in texts]
    assert [float(line.split("\t")[0]) for line in lines[1:]] == pytest.approx(want, abs=1e-4)
    assert abs(want[0] - 1.0) > 0.01  # not the softmax's 1
    assert [json.loads(line)["score"] for line in call("predict", "-m", tmp_path / "sts", "--head", "sts", "--json",
                                                        "--precision", "fp32", *texts).stdout.splitlines()] \
        == pytest.approx(want, abs=1e-5)

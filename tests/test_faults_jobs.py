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
from test_tokenizer import hf_loaded  # noqa: F401 (a fixture: transformers' tokenizer, checked on known ids)

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
        exact = ("--precision", "fp32") if command == "predict" else ()
        assert call(capsys, monkeypatch, command, "-m", model_dir, "--json", *exact, stdin=data, job=False) == (0, "")
        outputs.append(json.loads(call.out))
    assert outputs[1] == outputs[0]
    if command == "encode":
        assert outputs[0] == [0, 31414, 232, 328, 2]


# ---- pairs cut to the limit: the longer sentence first, as transformers ----------------------------

def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[j] for j in rng.integers(0, 12, size=n)) + "."


# (first, second) lengths in words around the limit's 60 tokens of room: one short, both long, a tie,
# one exactly half, neither cut
PAIRS = [(200, 3), (3, 200), (200, 200), (100, 101), (101, 100), (30, 40), (31, 29), (29, 31), (10, 10), (1, 500),
         (5000, 40), (40, 30000)]


@pytest.mark.parametrize("limit", [64, 63, 9])
def test_pairs_cut_longest_first_give_transformers_ids(hub, hf_loaded, limit):
    from roberta.hub import encode_within

    for n1, n2 in PAIRS:
        a, b = words(n1, n1), words(n2, n2 + 1)
        expected = hf_loaded(a, b, truncation="longest_first", max_length=limit)["input_ids"]
        assert len(expected) == min(limit, len(hf_loaded(a, b)["input_ids"])) and expected.count(2) == 3
        encoded = hub.encode(a, b)
        assert hub._fit(encoded[None], True, limit)[0].tolist() == expected, (n1, n2)
        assert encode_within(hub.tokenizer, [a, b], limit, True) == expected, (n1, n2)
        assert hub.tokenizer.encode(a, b, max_length=limit) == expected, (n1, n2)
        if limit == hub.max_tokens:
            assert hub.encode(a, b, truncate=True).tolist() == expected, (n1, n2)
            assert jobs.tokenize(hub, [[a, b]], truncate=True, windowed=False) == [expected], (n1, n2)


def test_a_padded_batch_of_pairs_is_cut_row_by_row(hub, hf_loaded):
    pairs = [(words(200, 1), words(3, 2)), (words(2, 3), words(5, 4)), (words(80, 5), words(90, 6))]
    batch = [hub.encode(a, b) for a, b in pairs]
    ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=hub.tokenizer.pad_token_id)
    fitted = hub._fit(ids, True)
    for row, (a, b) in zip(fitted.tolist(), pairs):
        expected = hf_loaded(a, b, truncation="longest_first", max_length=64)["input_ids"]
        assert row[:len(expected)] == expected and set(row[len(expected):]) <= {hub.tokenizer.pad_token_id}


def test_predict_truncate_keeps_the_hypothesis(model_dir, hub, hf_loaded, tmp_path, capsys, monkeypatch):
    """A long premise no longer pushes the hypothesis out: different hypotheses, different scores,
    each the scores of transformers' ids; the command line gives the same."""
    premise = words(300, 7)
    pairs = [(premise, "A man sleeps."), (premise, "Nobody is here at all today.")]
    expected = [hf_loaded(a, b, truncation="longest_first", max_length=64)["input_ids"] for a, b in pairs]
    reference = hub.predict("mnli", [torch.tensor(e) for e in expected]).exp()
    got = hub.predict("mnli", [hub.encode(a, b) for a, b in pairs], truncate=True).exp()
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)
    assert not torch.equal(got[0], got[1])  # (a random head: close to uniform, but not the same)
    source = tmp_path / "pairs.tsv"
    source.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    assert call(capsys, monkeypatch, "predict", "-m", model_dir, "-i", source, "--truncate", "--json",
                "--precision", "fp32", job=False) == (0, "")
    printed = [json.loads(line)["probabilities"] for line in call.out.splitlines()]
    np.testing.assert_allclose(printed, reference.numpy(), atol=1e-6)
    code, error = call(capsys, monkeypatch, "predict", "-m", model_dir, "-i", source, "--precision", "fp32", job=False)
    assert code == 2 and f"{source} line 1 has" in error and "--truncate" in error, error


# ---- long lines and many rows in bounded memory ------------------------------------------------------

def test_chunked_tokenizing_gives_the_ids_of_the_whole_text(hub):
    """`ids_in_chunks` (what long inputs are read with) against one call on the whole text, on texts
    built to break chunk ends: contractions, runs of spaces and newlines, digits, emoji, combining
    marks, long words; chunks down to one character (they grow past a word that does not fit)."""
    rng = np.random.default_rng(0)
    atoms = ["a", "they", "'", "'re", "'s", "'ll", "re", " ", "  ", "\n", "\t", "\r\n", "1", "23", " 42", "😀",
             "é", "e\u0301", "!", "..", "x" * 30, " Hello", "world", "\u00a0", "中文"]
    tokenizer = hub.tokenizer
    for trial in range(200):
        text = "".join(atoms[i] for i in rng.integers(0, len(atoms), size=rng.integers(1, 300)))
        whole = tokenizer.encode(text, add_special_tokens=False)
        for chars in (1, 3, 8, 13, 64):
            assert [t for c in tokenizer.ids_in_chunks(text, chars) for t in c] == whole, (trial, chars, text)


def test_a_long_line_cut_or_windowed_gives_what_the_whole_line_gives(hub, tmp_path):
    """Cut from its first chunk, a 200,000-character line gives the ids of tokenizing all of it then
    cutting; in windows, every id, and pooled features equal to the stitched sequence's."""
    from roberta.hub import encode_within

    text = " ".join(lines(15_000))
    assert len(text) > 3 * (1 << 16)
    whole = hub.encode(text).tolist()
    assert encode_within(hub.tokenizer, [text], 64, True) == whole[:63] + [2]
    assert jobs.tokenize(hub, [[text]], True, False) == [whole[:63] + [2]]
    assert jobs.tokenize(hub, [[text]], False, True) == [whole]
    with pytest.raises(RobertaError, match="in.txt line 7 has more than 64 tokens"):
        jobs.tokenize(hub, [["short"], [text]], False, False, first_line=6, name="in.txt")
    some = torch.tensor(whole[:3000])
    stitched = hub.extract_features(some, window=64, stride=16)[0]
    for pool, expected in (("cls", stitched[0]), ("mean", stitched.mean(0))):
        got = jobs.feature_rows(hub, [some.tolist()], pool, window=64, stride=16)[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


PEAK = "import resource, sys; from roberta.cli import main; code = main(sys.argv[1:]); " \
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)"


def peak_mib(*args) -> tuple[int, str, float]:
    """(exit status, stderr without the figure, peak resident MiB) of the command in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PEAK, *map(str, args), "--no-progress", "--precision", "fp32"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    *err, peak = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, "\n".join(err), int(peak) / 1024


@pytest.fixture(scope="module")
def fifty_mb_line(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.txt"
    words_line = " ".join(lines(2000))  # about 70 KB
    path.write_text(words_line * (50 * 2 ** 20 // len(words_line)) + "\nsecond line\n")
    return path


def test_a_50_mb_line_costs_little_memory(model_dir, fifty_mb_line, tmp_path):
    """The line is read once (its bytes, its text, the sentences split from it: a few times 50 MB);
    only as much of it is tokenized as the limit keeps. Tokenized whole it took 6.3 GB."""
    small = tmp_path / "small.txt"
    small.write_text("a short line\nsecond line\n")
    base = peak_mib("features", "-m", model_dir, "-i", small, "-o", tmp_path / "base")
    assert base[0] == 0, base
    for out in ("cut", "cut.npy"):
        code, err, peak = peak_mib("features", "-m", model_dir, "-i", fifty_mb_line, "-o", tmp_path / out, "--truncate")
        assert code == 0, err
        assert peak - base[2] < 300, (out, base[2], peak)  # 6 bytes per byte of the line (measured: 166 MiB)
    rows = jobs.load_rows(tmp_path / "cut")
    assert rows.shape == (2, 16)
    np.testing.assert_array_equal(np.load(tmp_path / "cut.npy"), rows)
    for out in ("refused", "refused.npy"):
        code, err, peak = peak_mib("features", "-m", model_dir, "-i", fifty_mb_line, "-o", tmp_path / out)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert f"{fifty_mb_line} line 1 has more than 64 tokens" in err and "--truncate" in err, err
        assert peak - base[2] < 300, (out, base[2], peak)
        assert not (tmp_path / out).exists() or not (tmp_path / out / "index.json").exists()


def test_windows_over_a_5_mb_line_keep_only_the_pooled_row(bpe_dir, tmp_path):
    """--window 512 over a 5 MB line (about 1.3 million tokens, 5,000 windows): each window's rows
    are dropped once they are pooled. Every window's every layer kept until stitching took 4.8 GB
    with a base-size model; with this one (two hidden states of 32) that is about 700 MB."""
    model = save_model(tmp_path / "model", bpe_dir, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=514)
    small, long = tmp_path / "small.txt", tmp_path / "long.txt"
    small.write_text("a short line\n")
    line = " ".join(lines(2000))
    long.write_text(line * (5 * 2 ** 20 // len(line)) + "\n")
    options = ("--window", 512, "--pool", "mean")
    base = peak_mib("features", "-m", model, "-i", small, "-o", tmp_path / "base", *options)
    code, err, peak = peak_mib("features", "-m", model, "-i", long, "-o", tmp_path / "long", *options)
    assert base[0] == 0 and code == 0, (base, err)
    # the line, its text, its ids (a Python list) and one batch of windows (107 MiB measured with hidden 64)
    assert peak - base[2] < 300, (base[2], peak)
    assert jobs.load_rows(tmp_path / "long").shape == (1, 32)


def test_features_into_one_npy_file_stream_in_bounded_memory(model_dir, hub, tmp_path):
    """`features -o out.npy` writes rows as they are computed: five times the lines, the same memory
    (held in memory it took 852 MiB for 20,000 lines and 3,078 MiB for 200,000: 12 KiB a line)."""
    texts = lines(40_000)
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("".join(t + "\n" for t in texts))
    small.write_text("".join(t + "\n" for t in texts[:8_000]))
    small_peak = peak_mib("features", "-m", model_dir, "-i", small, "-o", tmp_path / "small.npy", "--pool", "mean")
    big_peak = peak_mib("features", "-m", model_dir, "-i", big, "-o", tmp_path / "big.npy", "--pool", "mean")
    assert small_peak[0] == 0 and big_peak[0] == 0, (small_peak, big_peak)
    assert big_peak[2] - small_peak[2] < 30, (small_peak[2], big_peak[2])
    rows = np.load(tmp_path / "big.npy", mmap_mode="r")
    assert rows.shape == (40_000, 16) and rows.dtype == np.float32
    # other batches (the last chunk of the small file is shorter): equal to rounding
    np.testing.assert_allclose(rows[:8_000], np.load(tmp_path / "small.npy"), rtol=0, atol=1e-6)
    sample = [0, 4095, 4096, 39_999]
    expected = [hub.extract_features(hub.encode(texts[i]))[0].mean(0).numpy() for i in sample]
    np.testing.assert_allclose(rows[sample], np.stack(expected), atol=1e-5)

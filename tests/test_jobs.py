"""Streaming batch jobs (roberta/jobs.py, `roberta features/predict -o DIR`): one row per input line,
bounded memory on 200,000 lines, kill -9 then --resume, torchrun with two gloo processes."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xxhash

import roberta
from roberta import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer, jobs
from roberta.errors import RobertaError

WORDS = "alpha beta gamma delta river stone light night green small house music".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir):
    """The smallest RoBERTa that still has every part: one layer of 16, the real vocabulary, an mnli head."""
    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=50265, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=66))
    model.register_classification_head("mnli", 3)
    directory = tmp_path_factory.mktemp("jobs-model")
    model.eval().save_pretrained(directory, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    return directory


@pytest.fixture(scope="module")
def hub(model_dir):
    return roberta.load(model_dir, precision="fp32")


def lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(WORDS), size=(n, 4))
    return [f"{i} " + " ".join(WORDS[j] for j in row) for i, row in enumerate(picks)]


def write_lines(path, texts):
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def main(*args) -> int:
    from roberta.cli import main as cli_main

    return cli_main([str(a) for a in args] + ["--precision", "fp32"])


def digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.name != "metrics.jsonl"}


# ---- one row per line ---------------------------------------------------------------------------

def test_blank_lines_keep_rows_aligned_or_fail_naming_the_line(model_dir, hub, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("first\n\nthird\n", encoding="utf-8")
    assert main("features", "-m", model_dir, "-i", source, "-o", tmp_path / "f.npy") == 2
    err = capsys.readouterr().err
    assert "line 2 is empty" in err and "--allow-empty" in err
    assert not (tmp_path / "f.npy").exists()
    assert main("features", "-m", model_dir, "-i", source, "-o", tmp_path / "f.npy", "--allow-empty") == 0
    vectors = np.load(tmp_path / "f.npy")
    assert vectors.shape == (3, 16)
    expected = [hub.extract_features(hub.encode(t))[0, 0].numpy() for t in ("first", "", "third")]
    np.testing.assert_allclose(vectors, np.stack(expected), atol=1e-6)
    write_lines(source, ["", "  ", ""])
    for out in (tmp_path / "g.npy", tmp_path / "shards"):
        assert main("features", "-m", model_dir, "-i", source, "-o", out, "--no-progress") == 2
        assert "line 1 is empty" in capsys.readouterr().err
    assert not (tmp_path / "g.npy").exists() and not (tmp_path / "shards" / "index.json").exists()


@pytest.mark.parametrize("out", ["missing/f.npy", "missing/f.jsonl", "missing/shards"])
def test_output_into_a_missing_directory_is_refused_before_any_work(model_dir, tmp_path, out, capsys):
    assert main("features", "-m", tmp_path / "no-such-model", "-o", tmp_path / out, "x") == 2
    err = capsys.readouterr().err
    assert "does not exist; create it first" in err
    assert "no-such-model" not in err  # refused before the model was even looked for
    assert not (tmp_path / "missing").exists()


def test_job_formats_and_bad_lines(hub, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    write_lines(pairs, ["A man sleeps.\tA person rests.", "Hi\tthere"])
    index = jobs.run(hub, "predict", str(pairs), tmp_path / "p", head="mnli", progress=False)
    probs = jobs.load_rows(tmp_path / "p")
    expected = hub.predict("mnli", [hub.encode("A man sleeps.", "A person rests."), hub.encode("Hi", "there")]).exp()
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    assert index["rows"] == 2 and index["labels"] == ["0", "1", "2"]
    records = tmp_path / "in.jsonl"
    write_lines(records, [json.dumps({"body": "Hello world!"}), json.dumps({"body": "Hi"})])
    jobs.run(hub, "features", str(records), tmp_path / "j", field="body", pool="mean", progress=False)
    expected = [hub.extract_features(hub.encode(t))[0].mean(0).numpy() for t in ("Hello world!", "Hi")]
    np.testing.assert_allclose(jobs.load_rows(tmp_path / "j"), np.stack(expected), atol=1e-6)
    bad = [("in.jsonl", ['{"text": "ok"}', '{"other": 1}'], "line 2 has no string field 'text'"),
           ("in.jsonl", ['{"text": "ok"}', "not json"], "line 2 is not valid JSON"),
           ("in.tsv", ["a\tb", "only one"], "line 2 has 1 columns"),
           ("in.txt", ["fine", "\udcff"], "line 2 is not UTF-8")]
    for number, (name, rows, message) in enumerate(bad):
        path = tmp_path / f"bad-{number}-{name}"
        path.write_bytes("".join(r + "\n" for r in rows).encode("utf-8", "surrogateescape"))
        out = tmp_path / f"bad-{number}"
        with pytest.raises(RobertaError, match=message):
            jobs.run(hub, "features", str(path), out, progress=False)
        assert not (out / "index.json").exists()
    with pytest.raises(RobertaError, match="already exists; pass --resume"):
        jobs.run(hub, "features", str(records), tmp_path / "j", field="body", progress=False)
    with pytest.raises(RobertaError, match="pool was 'mean' and is now 'cls'"):
        jobs.run(hub, "features", str(records), tmp_path / "j", field="body", resume=True, progress=False)
    with pytest.raises(RobertaError, match="no classification head 'sst2'"):
        jobs.run(hub, "predict", str(pairs), tmp_path / "q", head="sst2", progress=False)


# ---- content identity and checksums --------------------------------------------------------------

def test_every_shard_and_its_input_lines_have_checksums_in_the_index(hub, tmp_path):
    texts = lines(5)
    source = write_lines(tmp_path / "in.txt", texts)
    index = jobs.run(hub, "features", str(source), tmp_path / "out", shard_rows=2, progress=False)
    assert [s["rows"] for s in index["shards"]] == [2, 2, 1]
    for k, shard in enumerate(index["shards"]):
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert shard["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)
        lines_of_shard = "".join(t + "\n" for t in texts[2 * k:2 * k + 2]).encode()
        assert shard["input_xxh3_128"] == xxhash.xxh3_128_hexdigest(lines_of_shard)
        record = json.loads((tmp_path / "out" / shard["file"].replace(".npy", ".json")).read_text())
        assert record == {"rows": shard["rows"], "first_row": 2 * k, "input_xxh3_128": shard["input_xxh3_128"],
                          "xxh3_128": shard["xxh3_128"], "computed_on": shard["computed_on"]}
        assert shard["computed_on"] == jobs.computed_on(hub)
        assert shard["computed_on"]["threads"] == torch.get_num_threads()
        assert shard["computed_on"]["cpu"] == roberta.inference.cpu_name()
    settings = json.loads((tmp_path / "out" / "job.json").read_text())
    assert settings["input_xxh3_128"] == xxhash.xxh3_128_hexdigest(source.read_bytes())
    assert settings["model_xxh3_128"] == jobs.model_digest(hub)


def test_a_job_resumed_on_another_machine_says_which_shards_came_from_where(hub, tmp_path, recwarn):
    source = write_lines(tmp_path / "in.txt", lines(11))
    out = tmp_path / "out"
    first = jobs.run(hub, "features", str(source), out, shard_rows=2, progress=False)
    # resumed where it ran: nothing to say
    assert jobs.run(hub, "features", str(source), out, shard_rows=2, resume=True, progress=False) == first
    assert not [w for w in recwarn if issubclass(w.category, roberta.errors.RobertaWarning)]
    # shards 0, 1, 2 and 4 as another machine left them; shard 3 to compute again
    elsewhere = {**jobs.computed_on(hub), "cpu": "Other CPU @ 3.0GHz", "threads": 64}
    for k in (0, 1, 2, 4):
        path = out / f"features-{k:05d}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "computed_on": elsewhere}))
    (out / "features-00003.npy").unlink()
    (out / "index.json").unlink()
    with pytest.warns(roberta.errors.RobertaWarning) as caught:
        index = jobs.run(hub, "features", str(source), out, shard_rows=2, resume=True, progress=False)
    (message,) = [str(w.message) for w in caught]
    here = jobs.computed_on(hub)
    assert (f"resumed on another machine or setup: shards 0-2, 4 with cpu Other CPU @ 3.0GHz (here {here['cpu']}), "
            f"threads 64 (here {here['threads']}). Rows computed") in message
    assert [s["computed_on"] for s in index["shards"]] == [elsewhere] * 3 + [here, elsewhere, here]
    assert [s["xxh3_128"] for s in index["shards"]] == [s["xxh3_128"] for s in first["shards"]]
    # a record whose `computed_on` is not a mapping (edited by hand) is named as it is, not a crash
    path = out / "features-00005.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "computed_on": ["not", "a", "mapping"]}))
    (out / "features-00003.npy").unlink()
    (out / "index.json").unlink()
    with pytest.warns(roberta.errors.RobertaWarning, match=r"shard 5 with \['not', 'a', 'mapping'\]"):
        again = jobs.run(hub, "features", str(source), out, shard_rows=2, resume=True, progress=False)
    assert again["shards"][5]["computed_on"] == ["not", "a", "mapping"]


def test_the_model_identity_is_its_files_content(model_dir, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    first = jobs.model_digest(roberta.load(copy, precision="fp32"))
    assert first == jobs.model_digest(roberta.load(model_dir, precision="fp32"))  # the content, not the path
    (copy / "metrics.jsonl").write_text("{}\n")  # not part of the model
    assert jobs.model_digest(roberta.load(copy, precision="fp32")) == first
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    assert jobs.model_digest(roberta.load(copy, precision="fp32")) != first
    built = roberta.RobertaHub(RobertaForMaskedLM.from_pretrained(model_dir), RobertaTokenizer.from_pretrained(copy))
    other = roberta.RobertaHub(RobertaForMaskedLM.from_pretrained(model_dir), RobertaTokenizer.from_pretrained(copy))
    assert jobs.model_digest(built) == jobs.model_digest(other)  # built in memory: its parameters
    with torch.no_grad():
        other.model.lm_head.bias[0] += 1
    assert jobs.model_digest(built) != jobs.model_digest(other)


# ---- size, crashes, processes -------------------------------------------------------------------

PEAK = "import resource, sys; from roberta.cli import main; code = main(sys.argv[1:]); " \
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)"


def peak_rss_kib(*args) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1])


def test_200k_lines_stream_in_bounded_memory_with_the_in_memory_vectors(model_dir, hub, tmp_path):
    texts = lines(200_000)
    big = write_lines(tmp_path / "big.txt", texts)
    small = write_lines(tmp_path / "small.txt", texts[:20_000])
    options = ("--pool", "mean", "--shard-rows", 20_000, "--no-progress", "--precision", "fp32")
    small_peak = peak_rss_kib("features", "-m", model_dir, "-i", small, "-o", tmp_path / "small", *options)
    big_peak = peak_rss_kib("features", "-m", model_dir, "-i", big, "-o", tmp_path / "big", *options)
    # ten times the input, the same memory: the in-memory path would hold 200,000 token lists and
    # vectors (well over 100 MB more); one shard of 20,000 rows is what stays resident
    assert big_peak - small_peak < 30 * 1024, (small_peak, big_peak)
    index = json.loads((tmp_path / "big" / "index.json").read_text())
    assert index["rows"] == 200_000 and len(index["shards"]) == 10 and index["width"] == 16
    rows = jobs.load_rows(tmp_path / "big")
    assert rows.shape == (200_000, 16) and rows.dtype == np.float32
    sample = [0, 1, 19_999, 20_000, 123_456, 199_999, *range(50_000, 200_000, 997)]
    roberta.hub.write_features(hub, [texts[i] for i in sample], tmp_path / "sample.npy", pool="mean")
    np.testing.assert_allclose(rows[sample], np.load(tmp_path / "sample.npy"), atol=1e-6)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("corpus") / "corpus.txt", lines(24_000, seed=1))


@pytest.fixture(scope="module")
def one_process(model_dir, corpus, tmp_path_factory):
    """The job run straight through, under torchrun with one process."""
    out = tmp_path_factory.mktemp("one") / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                             "-m", "roberta", "features", "-m", str(model_dir), "-i", str(corpus), "-o", str(out),
                             "--shard-rows", "2000", "--no-progress", "--precision", "fp32"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


def test_kill_9_then_resume_gives_identical_files(model_dir, corpus, one_process, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "roberta", "features", "-m", model_dir, "-i", corpus, "-o", out,
            "--shard-rows", 2000, "--no-progress", "--precision", "fp32"]
    job = subprocess.Popen(list(map(str, args)), env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list(out.glob("features-*.npy"))) >= 3 or job.poll() is not None)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = sorted(p.name for p in out.glob("features-*.npy"))
    assert 3 <= len(done) < 12 and not (out / "index.json").exists()
    # resumed in a new process as a user would, with the same thread count: the same float rounding
    resumed = subprocess.run(list(map(str, args + ["--resume"])), env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert digests(out) == digests(one_process)
    shards_rewritten = [json.loads(line)["shard"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(shards_rewritten) == len(set(shards_rewritten)) == 12  # each shard computed once
    assert main(*args[3:], "--resume") == 0 and digests(out) == digests(one_process)  # already done


def test_two_gloo_processes_under_torchrun_equal_one(model_dir, corpus, one_process, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "roberta", "features", "-m", str(model_dir), "-i", str(corpus), "-o", str(out),
                             "--shard-rows", "2000", "--no-progress", "--precision", "fp32"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert digests(out) == digests(one_process)
    ranks = {json.loads(line)["shard"]: json.loads(line)["rank"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert ranks == {k: k % 2 for k in range(12)}

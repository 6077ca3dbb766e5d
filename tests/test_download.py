"""Downloads against local HTTP servers: Hub repositories through huggingface_hub and its cache
(revisions, shards, gated repositories, the cache transformers wrote, bad files), fairseq archives."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import roberta
from hub_helpers import FileServer, HubServer, directory_files, tar_gz
from roberta import download
from roberta.cli import main
from roberta.errors import RobertaError

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_PATH = "/fairseq/models/roberta.base.tar.gz"


@pytest.fixture
def hub(hub_checkpoints):
    with HubServer() as server:
        server.add("org/tiny", directory_files(hub_checkpoints["hf"]))
        yield server


def blobs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("models--*/blobs/*"))


def features(model, text="Hello world!"):
    return model.extract_features(model.encode(text))


def test_hub_repository_downloads_into_the_hf_cache_and_loads_offline(hub, tiny_hub, tmp_path):
    cache = tmp_path / "hf"
    model = roberta.load("org/tiny", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    torch.testing.assert_close(features(model), features(tiny_hub), rtol=0, atol=0)
    snapshot = download.hub_snapshot("org/tiny", cache, hub.url, offline=True)
    assert snapshot.parent.parent.name == "models--org--tiny"  # huggingface_hub's own layout
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    requests = len(hub.log)
    roberta.load("org/tiny", cache_dir=cache, offline=True, precision="fp32")
    assert len(hub.log) == requests
    with pytest.raises(RobertaError, match="not in the Hugging Face cache .* offline mode is on"):
        roberta.load("org/other", cache_dir=cache, offline=True, precision="fp32")


def test_revisions_branch_tag_and_commit(hub, hub_checkpoints, tmp_path):
    files = directory_files(hub_checkpoints["hf"])
    other = roberta.load(hub_checkpoints["hf"], precision="fp32")
    with torch.no_grad():
        other.model.roberta.embeddings.word_embeddings.weight.add_(1.0)
    other.save(tmp_path / "v2")
    commit = hub.add("org/tiny", directory_files(tmp_path / "v2"), revision="v2")
    cache = tmp_path / "hf"
    main = roberta.load("org/tiny", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    v2 = roberta.load("org/tiny@v2", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    torch.testing.assert_close(features(v2), features(other), rtol=0, atol=0)
    assert not torch.equal(features(v2), features(main))
    by_commit = roberta.load(f"org/tiny@{commit}", cache_dir=cache, offline=True, precision="fp32")
    torch.testing.assert_close(features(by_commit), features(other), rtol=0, atol=0)
    torch.testing.assert_close(features(roberta.load("org/tiny@v2", cache_dir=cache, offline=True, precision="fp32")), features(other))
    assert files  # main still serves the first commit
    with pytest.raises(RobertaError, match="org/tiny has no revision 'nope'"):
        roberta.load("org/tiny@nope", cache_dir=cache, base_url=hub.url, precision="fp32")


def test_transformers_download_loads_offline_with_no_second_copy(hub, tiny_hub, tmp_path, monkeypatch, capsys):
    """transformers downloads from the same server into HF_HOME; this project then loads it offline."""
    pytest.importorskip("transformers")
    home = tmp_path / "hf-home"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    script = ("import transformers as t; t.AutoTokenizer.from_pretrained('org/tiny'); "
              "m = t.AutoModelForMaskedLM.from_pretrained('org/tiny'); print(m.config.model_type)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before = blobs(home / "hub")
    files_before = sorted(str(p) for p in home.rglob("*"))
    requests = len(hub.log)
    model = roberta.load("org/tiny", cache_dir=home / "hub", offline=True, precision="fp32")
    torch.testing.assert_close(features(model), features(tiny_hub), rtol=0, atol=0)
    assert len(hub.log) == requests and blobs(home / "hub") == before
    assert sorted(str(p) for p in home.rglob("*")) == files_before  # nothing copied, nothing added
    # the CLI, configured only through the environment transformers uses
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["encode", "-m", "org/tiny", "Hello world!"]) == 0
    assert capsys.readouterr().out.split() == ["0", "31414", "232", "328", "2"]
    assert len(hub.log) == requests


def test_sharded_checkpoint_with_its_index(hub, hub_checkpoints, tiny_hub, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.RobertaForMaskedLM.from_pretrained(hub_checkpoints["hf"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4MB")
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    files = directory_files(tmp_path / "sharded")
    files.update({n: (hub_checkpoints["hf"] / n).read_bytes() for n in ("vocab.json", "merges.txt")})
    hub.add("org/sharded", files)
    loaded = roberta.load("org/sharded", cache_dir=tmp_path / "hf", base_url=hub.url, progress=False, precision="fp32")
    torch.testing.assert_close(features(loaded), features(tiny_hub), rtol=0, atol=0)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 2 and all(n in blobs_names(tmp_path / "hf") for n in shards)


def blobs_names(cache: Path) -> list[str]:
    return [p.name for p in cache.glob("models--*/snapshots/*/*")]


def test_gated_repository_is_refused_with_what_to_do_then_opens_with_a_token(hub, tmp_path, monkeypatch):
    hub.gated.add("org/tiny")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RobertaError, match="gated repository.*HF_TOKEN") as info:
        roberta.load("org/tiny", cache_dir=tmp_path / "hf", base_url=hub.url, progress=False, precision="fp32")
    assert "\n" not in str(info.value)
    assert blobs(tmp_path / "hf") == []
    monkeypatch.setenv("HF_TOKEN", "hf_granted")  # the server grants any token; huggingface_hub sends it
    roberta.load("org/tiny", cache_dir=tmp_path / "hf", base_url=hub.url, progress=False, precision="fp32")
    assert len(blobs(tmp_path / "hf")) == 4


def test_unknown_repository_and_a_repository_without_weights(hub, hub_checkpoints, tmp_path):
    with pytest.raises(RobertaError, match="neither an existing path nor a repository on the Hub"):
        roberta.load("org/nothing", cache_dir=tmp_path / "hf", base_url=hub.url, precision="fp32")
    hub.add("org/card-only", {"README.md": b"# hello\n", "config.json": (hub_checkpoints["hf"] / "config.json").read_bytes()})
    with pytest.raises(RobertaError, match="no weights this project reads"):
        roberta.load("org/card-only", cache_dir=tmp_path / "hf", base_url=hub.url, precision="fp32")


def test_interrupted_hub_download_resumes_on_the_next_run_with_a_range_request(hub, hub_checkpoints, tiny_hub,
                                                                              tmp_path, capsys):
    weights = (hub_checkpoints["hf"] / "model.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    # huggingface_hub writes what it receives in 10 MiB pieces (DOWNLOAD_CHUNK_SIZE): cut past the first
    hub.cut[("org/tiny", "model.safetensors")] = cut = len(weights) - 1_000_000
    cache = tmp_path / "hf"
    argv = ["info", "-m", "org/tiny", "--cache-dir", str(cache), "--base-url", hub.url]
    assert main(argv) == 2  # the connection is cut, and the network stays down for the rest of this run
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "503" in err
    partial = next(cache.glob("models--org--tiny/blobs/*.incomplete"))
    kept = partial.stat().st_size
    assert partial.name == f"{sha}.incomplete" and 0 < kept <= cut and partial.read_bytes() == weights[:kept]

    hub.outage.clear()  # the next run, with the network back
    requests = len(hub.log)
    model = roberta.load("org/tiny", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    transfers = [ranged for method, path, ranged in hub.log[requests:] if method == "GET" and path == f"/cdn/{sha}"]
    assert transfers == [f"bytes={kept}-"]  # one request, for the rest of the file only
    blob = cache / "models--org--tiny" / "blobs" / sha
    assert blob.read_bytes() == weights and not partial.exists()
    torch.testing.assert_close(features(model), features(tiny_hub), rtol=0, atol=0)


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "vocab.json"])
def test_garbage_file_is_refused_removed_and_repaired_by_the_next_download(hub, hub_checkpoints, tiny_hub, tmp_path, file):
    real = (hub_checkpoints["hf"] / file).read_bytes()
    hub.wrong[("org/tiny", file)] = os.urandom(len(real))  # same length, under the real headers
    cache = tmp_path / "hf"
    with pytest.raises(RobertaError, match=f"{file} as downloaded is .*removed from the cache"):
        roberta.load("org/tiny", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    kept = {p.name: p for p in cache.glob("models--*/snapshots/*/*")}
    assert file not in kept and not any(p.read_bytes() != (hub_checkpoints["hf"] / n).read_bytes() for n, p in kept.items())
    del hub.wrong[("org/tiny", file)]
    model = roberta.load("org/tiny", cache_dir=cache, base_url=hub.url, progress=False, precision="fp32")
    torch.testing.assert_close(features(model), features(tiny_hub), rtol=0, atol=0)


def test_tokenizer_json_alone_is_enough(hub_checkpoints, tmp_path, tiny_hub):
    transformers = pytest.importorskip("transformers")
    target = tmp_path / "json-tok"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((hub_checkpoints["hf"] / name).read_bytes())
    fast = transformers.AutoTokenizer.from_pretrained(hub_checkpoints["hf"])
    assert fast("Hello world!")["input_ids"] == [0, 31414, 232, 328, 2]
    fast.backend_tokenizer.save(str(target / "tokenizer.json"))
    model = roberta.load(target, precision="fp32")
    text = "Tokenizers from tokenizer.json: the same ids, even for émoji 🙂."
    assert model.encode(text).tolist() == tiny_hub.encode(text).tolist()


# ---- fairseq archives -------------------------------------------------------------------------


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    """Point the cache at a temporary directory and the base URL at the local server."""
    monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBERTA_BASE_URL", server.url)
    monkeypatch.delenv("ROBERTA_OFFLINE", raising=False)
    return tmp_path / "cache"


def serve_fairseq(server, archive: bytes):
    server.files[ARCHIVE_PATH] = archive
    server.files["/fairseq/gpt2_bpe/encoder.json"] = b'{"!": 0}'
    server.files["/fairseq/gpt2_bpe/vocab.bpe"] = b"#version: 0.2\n"


def test_named_fairseq_model_is_downloaded_extracted_and_recorded(server, env):
    archive = tar_gz({"model.pt": b"\x80weights", "dict.txt": b"13 850314647\n"}, top="roberta.base")
    serve_fairseq(server, archive)
    path = download.download("roberta.base", progress=False)
    assert path == env / "roberta.base"
    assert sorted(p.name for p in path.iterdir()) == [
        "dict.txt", "downloads.json", "encoder.json", "model.pt", "vocab.bpe"]
    assert (path / "model.pt").read_bytes() == b"\x80weights"
    manifest = json.loads((path / "downloads.json").read_text())
    assert manifest["roberta.base.tar.gz"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert sorted(p.name for p in env.iterdir() if p.name != ".locks") == ["gpt2_bpe", "roberta.base"]
    requests = len(server.log)
    assert download.download("roberta.base", progress=False) == path
    assert len(server.log) == requests  # served from the cache


def test_cut_connection_is_retried_and_completes(server, tmp_path):
    blob = os.urandom(300_000)
    server.files["/blob.bin"] = blob
    server.cut["/blob.bin"] = 123_457
    download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == blob
    assert [path for path, _ in server.log] == ["/blob.bin", "/blob.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "blob.bin"]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    blob = os.urandom(300_000)
    server.files["/blob.bin"] = blob
    (tmp_path / "blob.bin.part").write_bytes(blob[:200_000])
    download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == blob
    assert server.log == [("/blob.bin", "bytes=200000-")]


def test_offline_mode_fails_at_once_saying_what_to_fetch(server, env, monkeypatch):
    monkeypatch.setenv("ROBERTA_OFFLINE", "1")
    with pytest.raises(RobertaError) as info:
        download.download("roberta.large.mnli")
    message = str(info.value)
    assert f"{server.url}/fairseq/models/roberta.large.mnli.tar.gz" in message
    assert str(env / "roberta.large.mnli") in message and "\n" not in message
    assert server.log == []
    with pytest.raises(RobertaError, match=f"download {server.url}/fairseq/gpt2_bpe/encoder.json and"):
        download.gpt2_bpe()
    assert server.log == []


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RobertaError, match="roberta.large.mnli"):
        download.download("roberta.huge")


def test_info_shows_the_repository_and_a_classifier_labels_reach_predict(hub, hub_checkpoints, tmp_path, capsys):
    """A fine-tuned transformers classifier on the Hub: its id2label comes through to predict and the CLI."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig.from_pretrained(
        hub_checkpoints["hf"], id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    classifier = transformers.RobertaForSequenceClassification(config).eval()
    base = transformers.RobertaModel.from_pretrained(hub_checkpoints["hf"], add_pooling_layer=False)
    classifier.roberta.load_state_dict(base.state_dict(), strict=False)
    classifier.save_pretrained(tmp_path / "sentiment")
    files = directory_files(tmp_path / "sentiment")
    files.update({n: (hub_checkpoints["hf"] / n).read_bytes() for n in ("vocab.json", "merges.txt")})
    commit = hub.add("org/sentiment", files)
    common = ["--cache-dir", str(tmp_path / "hf"), "--base-url", hub.url, "--json"]
    texts = ["What a wonderful film.", "Dreadful, I left early."]
    assert main(["predict", "--precision", "fp32", "-m", "org/sentiment", *common, *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hub_checkpoints["hf"])
    with torch.no_grad():
        want = classifier(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    for row, probabilities in zip(rows, want):
        assert row["labels"] == ["negative", "positive"]
        assert row["label"] == ["negative", "positive"][int(probabilities.argmax())] and row["index"] == int(probabilities.argmax())
        assert np.abs(np.array(row["probabilities"]) - probabilities.numpy()).max() <= 1e-5
    assert main(["info", "-m", "org/sentiment", *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["repository"] == "org/sentiment" and info["revision"] == commit
    assert info["files"] == {n: len(files[n]) for n in ("config.json", "merges.txt", "model.safetensors", "vocab.json")}
    assert info["labels"] == {"default": ["negative", "positive"]}
    assert main(["info", "-m", "org/sentiment", "--cache-dir", str(tmp_path / "hf"), "--offline"]) == 0
    text = capsys.readouterr().out
    assert f"repository  org/sentiment at revision {commit}" in text and "default (sequence classification, 2 outputs: negative, positive)" in text


def test_a_failing_download_is_one_line_after_a_bounded_number_of_tries(server, tmp_path):
    """A connection cut every time: huggingface_hub's retry warnings stay quiet, the tries are bounded,
    and the command says what happened in one line."""
    serve_fairseq(server, os.urandom(300_000))
    server.cut[ARCHIVE_PATH], server.cut_times[ARCHIVE_PATH] = 1000, 100
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROBERTA_CACHE": str(tmp_path / "cache"),
           "ROBERTA_BASE_URL": server.url, "ROBERTA_OFFLINE": ""}
    result = subprocess.run([sys.executable, "-m", "roberta", "download", "roberta.base"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot download {server.url}{ARCHIVE_PATH} ("), result.stderr
    assert lines[0].endswith("run again to resume")
    assert [path for path, _ in server.log].count(ARCHIVE_PATH) == download.RETRIES + 1

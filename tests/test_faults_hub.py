"""Downloads as a hostile network and a careless user meet them: each case asserts the exit status, the
one-line message and what is left in the cache (never a half-written or wrong file under a real name)."""
import hashlib
import io
import os
import tarfile
import threading
import time

import pytest

from hub_helpers import FileServer, HubServer, directory_files, tar_gz
from roberta import download
from roberta.cli import main
from roberta.errors import RobertaError

ARCHIVE_PATH = "/fairseq/models/roberta.base.tar.gz"
GOOD = tar_gz({"model.pt": b"\x80" + b"w" * 5000, "dict.txt": b"13 850314647\n"}, top="roberta.base")


@pytest.fixture
def server():
    with FileServer() as srv:
        srv.files["/fairseq/gpt2_bpe/encoder.json"] = b'{"!": 0}'
        srv.files["/fairseq/gpt2_bpe/vocab.bpe"] = b"#version: 0.2\n"
        yield srv


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBERTA_BASE_URL", server.url)
    for name in ("ROBERTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def run(capsys, *argv) -> tuple[int, str]:
    """Exit status and the error line (huggingface_hub's retry warnings may come before it; under pytest
    its logger may also report writing to an earlier test's closed capture, which a real run never shows)."""
    code = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) <= 1
    return code, lines[-1] if lines else ""


def cache_files(cache) -> list[str]:
    """What the cache holds under real names (locks are huggingface_hub's empty lock files)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)


@pytest.mark.parametrize("served, message", [
    (os.urandom(len(GOOD)), "not a readable .tar.gz archive"),                    # garbage of the right length
    (tar_gz({"README": b"an unrelated archive"}), "holds no fairseq model"),        # a valid but unrelated tar.gz
    (tar_gz({"model.pt": b"not a pickle", "dict.txt": b"x 1\n"}), "model.pt is neither a torch zip archive nor a pickle"),
    (GOOD[: len(GOOD) // 2] + bytes(len(GOOD) - len(GOOD) // 2), "not a readable .tar.gz archive"),
])
def test_bad_archive_from_a_mirror_is_never_cached_and_the_next_download_repairs(server, env, capsys, served, message):
    server.files[ARCHIVE_PATH] = served
    code, err = run(capsys, "download", "roberta.base")
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not download.is_cached("roberta.base")
    assert [f for f in cache_files(env) if not f.startswith("gpt2_bpe/")] == []
    server.files[ARCHIVE_PATH] = GOOD
    assert run(capsys, "download", "roberta.base")[0] == 0
    assert (env / "roberta.base" / "model.pt").read_bytes() == b"\x80" + b"w" * 5000


@pytest.mark.parametrize("member", ["../escape.txt", "/abs.txt", "link"])
def test_archive_members_cannot_escape_or_link(tmp_path, member):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 2
        tar.addfile(info, io.BytesIO(b"hi") if info.size else None)
    (tmp_path / "a.tar.gz").write_bytes(buffer.getvalue())
    (tmp_path / "into").mkdir()
    with pytest.raises(RobertaError, match="a.tar.gz"):
        download.extract_archive(tmp_path / "a.tar.gz", tmp_path / "into")
    assert not (tmp_path / "escape.txt").exists()


def test_a_trickling_server_fails_in_bounded_time(server, env, capsys, monkeypatch):
    """One byte every 0.2 s: the stall guard (ROBERTA_STALL_TIMEOUT, here 1 s) ends it; nothing is kept."""
    monkeypatch.setenv("ROBERTA_STALL_TIMEOUT", "1")
    server.files[ARCHIVE_PATH] = GOOD
    server.trickle[ARCHIVE_PATH] = 0.2
    start = time.monotonic()
    code, err = run(capsys, "download", "roberta.base")
    assert code == 2 and "stalled" in err and "ROBERTA_STALL_TIMEOUT" in err and "\n" not in err
    assert time.monotonic() - start < 30
    assert [f for f in cache_files(env) if not f.startswith("gpt2_bpe/")] == []


def test_a_server_slower_than_the_read_timeout_fails_in_bounded_time(server, env, capsys, monkeypatch):
    """A byte every 3 s against a 0.3 s read timeout (HF_HUB_DOWNLOAD_TIMEOUT): huggingface_hub retries
    a few times, then one line; the partial file stays under .part only, for the next run to resume."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.3)
    server.files[ARCHIVE_PATH] = GOOD
    server.trickle[ARCHIVE_PATH] = 3
    start = time.monotonic()
    code, err = run(capsys, "download", "roberta.base")
    assert code == 2 and "ReadTimeout" in err and "HF_HUB_DOWNLOAD_TIMEOUT" in err and "\n" not in err
    assert time.monotonic() - start < 30
    assert [f for f in cache_files(env) if not f.startswith("gpt2_bpe/")] in ([], ["roberta.base.tar.gz.part"])
    assert not download.is_cached("roberta.base")


def test_a_stalled_hub_file_fails_in_bounded_time_and_keeps_no_real_file(hub_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBERTA_STALL_TIMEOUT", "1")
    with HubServer() as hub:
        hub.add("org/tiny", directory_files(hub_checkpoints["hf"]))
        hub.trickle[("org/tiny", "model.safetensors")] = 0.2
        start = time.monotonic()
        code, err = run(capsys, "info", "-m", "org/tiny", "--cache-dir", str(tmp_path / "hf"), "--base-url", hub.url)
    assert code == 2 and "stalled" in err and "\n" not in err
    assert time.monotonic() - start < 30
    # what is kept under a real name is whole and verified (config.json came first); the weights only as
    # their `<etag>.incomplete`, a prefix that the next run resumes
    from hub_helpers import git_sha1
    weights = (hub_checkpoints["hf"] / "model.safetensors").read_bytes()
    kept = {p.name: p.read_bytes() for p in (tmp_path / "hf").glob("models--*/blobs/*")}
    partial = kept.pop(f"{hashlib.sha256(weights).hexdigest()}.incomplete", b"")
    assert list(kept) == [git_sha1((hub_checkpoints["hf"] / "config.json").read_bytes())]
    assert weights.startswith(partial)
    assert "model.safetensors" not in [p.name for p in (tmp_path / "hf").glob("models--*/snapshots/*/*")]


def test_concurrent_downloads_of_one_file_share_one_transfer(server, env):
    server.files[ARCHIVE_PATH] = GOOD
    server.trickle[ARCHIVE_PATH] = 0.0005  # slow enough that the two overlap
    results, errors = [], []

    def fetch():
        try:
            results.append(download.download("roberta.base", progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and results == [env / "roberta.base"] * 2
    assert [p for p, _ in server.log].count(ARCHIVE_PATH) == 1


@pytest.mark.parametrize("argv, setup, message", [
    (["download", "roberta.base", "--base-url", "notaurl"], None, "--base-url 'notaurl' is not a URL"),
    (["download", "roberta.base"], "cache-file", "is a file; point it at a directory"),
    (["download", "roberta.base"], "model-file", "is a file where the cache keeps roberta.base"),
    (["download", "roberta.base"], "bad-env-url", "ROBERTA_BASE_URL 'ftp:/x' is not a URL"),
    (["download", "roberta.huge"], None, "neither a Hub id"),
    (["download", "org/tiny", "--base-url", "http://127.0.0.1:9"], None, "cannot download org/tiny"),
    (["encode", "-m", "org/tiny", "--offline", "x"], None, "not in the Hugging Face cache"),
    (["info", "-m", "org/tiny", "--base-url", "http:/"], None, "is not a URL"),
    (["download", "roberta.base"], "stall-env", "ROBERTA_STALL_TIMEOUT='soon' is not a number of seconds"),
])
def test_bad_settings_are_one_line_errors_with_nothing_written(server, env, tmp_path, capsys, monkeypatch,
                                                               argv, setup, message):
    server.files[ARCHIVE_PATH] = GOOD
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    if setup == "cache-file":
        env.parent.mkdir(parents=True, exist_ok=True)
        env.write_text("not a directory")
    elif setup == "model-file":
        env.mkdir(parents=True)
        (env / "roberta.base").write_text("in the way")
    elif setup == "bad-env-url":
        monkeypatch.setenv("ROBERTA_BASE_URL", "ftp:/x")
    elif setup == "stall-env":
        monkeypatch.setenv("ROBERTA_STALL_TIMEOUT", "soon")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, err = run(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    after = sorted(str(p) for p in tmp_path.rglob("*") if ".locks" not in p.parts and not p.name.endswith(".lock"))
    assert [p for p in after if p not in before] == []

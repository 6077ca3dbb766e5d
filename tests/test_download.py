"""Downloads against a local HTTP server: success, resume, checksums, offline mode, bad archives."""
import hashlib
import io
import json
import os
import tarfile

import pytest

from hub_helpers import FileServer, tar_gz
from roberta import download
from roberta.errors import RobertaError

BLOB = os.urandom(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()
ARCHIVE_PATH = "/fairseq/models/roberta.base.tar.gz"
HF = "/FacebookAI/roberta-base/resolve/main/"


@pytest.fixture
def server():
    with FileServer() as srv:
        srv.files["/blob.bin"] = BLOB
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


def test_fetch_places_file_and_reports_its_digest(server, tmp_path):
    record = download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert record == {"url": server.url + "/blob.bin", "size": len(BLOB), "sha256": SHA}
    assert not (tmp_path / "blob.bin.part").exists()


def test_cut_connection_resumes_with_range(server, tmp_path):
    server.cut["/blob.bin"] = 123_457
    download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", sha256=SHA, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.log == [("/blob.bin", None), ("/blob.bin", "bytes=123457-")]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:200_000])
    download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", size=len(BLOB), progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.log == [("/blob.bin", "bytes=200000-")]


def test_connection_cut_every_time_keeps_the_partial_file_for_later(server, tmp_path):
    server.cut["/blob.bin"], server.cut_times["/blob.bin"] = 100_000, 99
    with pytest.raises(RobertaError, match="run the same command again to resume"):
        download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", attempts=2, progress=False)
    assert (tmp_path / "blob.bin.part").read_bytes() == BLOB[:100_000]
    assert not (tmp_path / "blob.bin").exists()
    server.cut_times["/blob.bin"] = 0
    download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_checksum_mismatch_is_rejected_and_existing_file_untouched(server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"old")
    with pytest.raises(RobertaError, match="checksum mismatch"):
        download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", sha256="0" * 64, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == b"old"
    assert not (tmp_path / "blob.bin.part").exists()


def test_size_mismatch_is_rejected(server, tmp_path):
    with pytest.raises(RobertaError, match="size mismatch"):
        download.fetch(server.url + "/blob.bin", tmp_path / "blob.bin", size=len(BLOB) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(RobertaError, match="HTTP 404"):
        download.fetch(server.url + "/missing", tmp_path / "missing", progress=False)


def test_named_fairseq_model_is_downloaded_extracted_and_recorded(server, env):
    archive = tar_gz({"model.pt": b"weights", "dict.txt": b"13 850314647\n"}, top="roberta.base")
    serve_fairseq(server, archive)
    path = download.download("roberta.base", progress=False)
    assert path == env / "roberta.base"
    assert sorted(p.name for p in path.iterdir()) == [
        "dict.txt", "downloads.json", "encoder.json", "model.pt", "vocab.bpe"]
    assert (path / "model.pt").read_bytes() == b"weights"
    assert (path / "encoder.json").read_bytes() == b'{"!": 0}'
    manifest = json.loads((path / "downloads.json").read_text())
    assert manifest["roberta.base.tar.gz"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert sorted(p.name for p in env.iterdir()) == ["gpt2_bpe", "roberta.base"]  # no archive, no temp dirs
    requests = len(server.log)
    assert download.download("roberta.base", progress=False) == path
    assert len(server.log) == requests  # served from the cache


def test_named_hf_model_checks_the_advertised_sha(server, env):
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        server.files[HF + name] = name.encode() * 100
    server.linked_sha.add(HF + "model.safetensors")
    server.wrong[HF + "model.safetensors"] = b"x" * 1500
    with pytest.raises(RobertaError, match="checksum mismatch"):
        download.download("FacebookAI/roberta-base", progress=False)
    target = env / "FacebookAI--roberta-base"
    assert not (target / "model.safetensors").exists() and not (target / "model.safetensors.part").exists()
    assert not download.is_cached("FacebookAI/roberta-base")
    del server.wrong[HF + "model.safetensors"]
    path = download.download("FacebookAI/roberta-base", progress=False)
    assert path == target and (path / "model.safetensors").read_bytes() == b"model.safetensors" * 100
    manifest = json.loads((path / "downloads.json").read_text())
    assert set(manifest) == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}


def test_sha_announced_before_a_redirect_is_checked(server, tmp_path):
    server.files["/cdn/blob"] = BLOB
    server.redirect["/resolve/blob"] = "/cdn/blob"
    server.wrong["/cdn/blob"] = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    with pytest.raises(RobertaError, match=f"expected sha256 {SHA}"):
        download.fetch(server.url + "/resolve/blob", tmp_path / "blob", progress=False)
    assert list(tmp_path.iterdir()) == []
    del server.wrong["/cdn/blob"]
    assert download.fetch(server.url + "/resolve/blob", tmp_path / "blob", progress=False)["sha256"] == SHA
    assert server.log[-2:] == [("/resolve/blob", None), ("/cdn/blob", None)]


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


def test_corrupted_archive_leaves_the_cache_clean(server, env):
    good = tar_gz({"model.pt": b"weights" * 1000, "dict.txt": b"x 1\n"}, top="roberta.base")
    serve_fairseq(server, good[:len(good) // 2] + bytes(len(good) - len(good) // 2))
    with pytest.raises(RobertaError, match="not a readable .tar.gz archive"):
        download.download("roberta.base", progress=False)
    assert not download.is_cached("roberta.base")
    assert [p.name for p in env.iterdir()] == []  # neither the archive nor a half-extracted directory


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


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RobertaError, match="roberta.large.mnli"):
        download.download("roberta.huge")

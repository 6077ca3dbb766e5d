"""Named models: where they live, the local cache, and safe downloads.

A name (`roberta.base`, `FacebookAI/roberta-base`, ...) resolves to a directory in the cache
(`ROBERTA_CACHE`, default `~/.cache/roberta`). When it is missing it is downloaded from its official
location, or from `ROBERTA_BASE_URL` (a mirror, or a test server), which replaces the host and keeps
the path. Every file goes to `<file>.part` first, so a cut connection resumes with an HTTP `Range`
request; it is then checked against its size and sha256 and only then moved into place with
`os.replace`, so the cache never holds half a file. `ROBERTA_OFFLINE=1` turns every download into an
immediate error that says what to fetch and where to put it.

Checksums: fairseq publishes none and the Hugging Face hub sends the sha256 of large files in the
`X-Linked-Etag` header, so an expected size/sha256 is optional per file. When one is known (from the
table or the header) a mismatch is rejected; in every case the sha256 we computed is recorded in
`downloads.json` beside the files, so a later check has something to compare against.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import HTTPRedirectHandler, Request, build_opener

from tqdm import tqdm

from .errors import RobertaError
from .fileio import atomic_write

FAIRSEQ_HOST = "https://dl.fbaipublicfiles.com"
HF_HOST = "https://huggingface.co"
MANIFEST = "downloads.json"


@dataclass(frozen=True)
class RemoteFile:
    host: str                  # official host; ROBERTA_BASE_URL replaces it
    path: str                  # path on the host, kept when the host is replaced
    size: int | None = None    # expected bytes, when published
    sha256: str | None = None  # expected digest, when published

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str | None = None) -> str:
        return (base_url or self.host).rstrip("/") + self.path


def _fairseq_archive(name: str) -> tuple[RemoteFile, ...]:
    return (RemoteFile(FAIRSEQ_HOST, f"/fairseq/models/{name}.tar.gz"),)


def _hf_files(repo: str) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(HF_HOST, f"/{repo}/resolve/main/{file}")
                 for file in ("config.json", "model.safetensors", "vocab.json", "merges.txt"))


# fairseq archives hold model.pt and dict.txt only; their tokenizer is the GPT-2 BPE below.
MODELS: dict[str, tuple[RemoteFile, ...]] = {
    "roberta.base": _fairseq_archive("roberta.base"),
    "roberta.large": _fairseq_archive("roberta.large"),
    "roberta.large.mnli": _fairseq_archive("roberta.large.mnli"),
    "FacebookAI/roberta-base": _hf_files("FacebookAI/roberta-base"),
    "FacebookAI/roberta-large": _hf_files("FacebookAI/roberta-large"),
}
GPT2_BPE = (RemoteFile(FAIRSEQ_HOST, "/fairseq/gpt2_bpe/encoder.json"),
            RemoteFile(FAIRSEQ_HOST, "/fairseq/gpt2_bpe/vocab.bpe"))


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("ROBERTA_CACHE") or Path.home() / ".cache" / "roberta").expanduser()


def base_url(url: str | None = None) -> str | None:
    return url or os.environ.get("ROBERTA_BASE_URL") or None


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("ROBERTA_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where a named model lives in the cache ('/' in Hugging Face ids becomes '--')."""
    return cache_dir(cache) / name.replace("/", "--")


def is_cached(name: str, cache: str | os.PathLike | None = None) -> bool:
    # An archive's directory appears in one rename, so its existence means complete; a Hugging Face
    # model is complete when each of its files (each placed atomically) is there.
    target = model_dir(name, cache)
    if _is_archive(MODELS[name]):
        return target.is_dir()
    return all((target / f.name).is_file() for f in MODELS[name])


def download(name: str, cache: str | os.PathLike | None = None, base: str | None = None,
             offline: bool | None = None, progress: bool = True) -> Path:
    """The local directory of a named model, downloaded into the cache when missing."""
    if name not in MODELS:
        raise RobertaError(f"unknown model name {name!r}: known names are {', '.join(MODELS)}, or pass a path")
    target = model_dir(name, cache)
    if is_cached(name, cache):
        return target
    files, base = MODELS[name], base_url(base)
    if is_offline(offline):
        urls = " and ".join(f.url(base) for f in files)
        what = "extract it so that it holds model.pt and dict.txt" if _is_archive(files) else "put the files"
        raise RobertaError(f"{name} is not in the cache and offline mode is on (ROBERTA_OFFLINE): "
                           f"download {urls} and {what} in {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if _is_archive(files):
        _download_archive(files[0], target, cache, base, progress)
    else:
        target.mkdir(exist_ok=True)
        for file in files:
            if not (target / file.name).is_file():
                record = fetch(file.url(base), target / file.name, file.size, file.sha256, progress)
                _record(target, file.name, record)
    return target


def gpt2_bpe(cache: str | os.PathLike | None = None, base: str | None = None,
             offline: bool | None = None, progress: bool = True) -> Path:
    """The directory holding the GPT-2 BPE files (encoder.json, vocab.bpe) that fairseq models use."""
    target = cache_dir(cache) / "gpt2_bpe"
    missing = [f for f in GPT2_BPE if not (target / f.name).is_file()]
    if missing and is_offline(offline):
        urls = " and ".join(f.url(base_url(base)) for f in missing)
        raise RobertaError(f"the GPT-2 BPE files are not in the cache and offline mode is on (ROBERTA_OFFLINE): "
                           f"download {urls} into {target}")
    for file in missing:
        target.mkdir(parents=True, exist_ok=True)
        _record(target, file.name, fetch(file.url(base_url(base)), target / file.name, file.size, file.sha256, progress))
    return target


def _is_archive(files: tuple[RemoteFile, ...]) -> bool:
    return len(files) == 1 and files[0].name.endswith(".tar.gz")


def _download_archive(file: RemoteFile, target: Path, cache, base: str | None, progress: bool) -> None:
    archive = target.with_name(file.name)
    record = fetch(file.url(base), archive, file.size, file.sha256, progress)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        try:
            root = extract_archive(archive, staging)
        except RobertaError:
            archive.unlink()  # a corrupt archive would fail the same way next time: fetch it afresh
            raise
        # Make the cached model self-contained: the tokenizer files sit beside model.pt and dict.txt.
        for bpe_file in GPT2_BPE:
            if not (root / bpe_file.name).exists():
                shutil.copyfile(gpt2_bpe(cache, base, False, progress) / bpe_file.name, root / bpe_file.name)
        _record(root, file.name, record)
        try:
            root.rename(target)
        except OSError:
            if not target.is_dir():  # another process may have placed the same model meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink(missing_ok=True)


def extract_archive(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Extract a .tar.gz into `into` safely; returns the model root (the single top directory if any).

    Members that are links, or whose paths leave `into`, are refused: an archive from the internet
    must not write anywhere else.
    """
    archive, into = Path(archive), Path(into)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                if member.issym() or member.islnk():
                    raise RobertaError(f"{archive} contains a link ({member.name}); refusing to extract it")
                if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                    raise RobertaError(f"{archive} has a member outside its directory ({member.name}); "
                                       f"refusing to extract it")
            tar.extractall(into, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise RobertaError(f"{archive} is not a readable .tar.gz archive ({exc}); download it again") from None
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


class _LinkedHeaders(HTTPRedirectHandler):
    """Keeps the headers of redirects: the Hugging Face hub sends X-Linked-Etag/-Size before the CDN hop."""

    def __init__(self):
        self.headers: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.update({k.lower(): v for k, v in headers.items() if k.lower().startswith("x-linked-")})
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Interrupted(Exception):
    pass


def fetch(url: str, dest: str | os.PathLike, size: int | None = None, sha256: str | None = None,
          progress: bool = True, attempts: int = 3) -> dict:
    """Download `url` to `dest` atomically, resuming `<dest>.part`; returns {url, size, sha256}.

    The expected size/sha256 come from the arguments, else from the server (Content-Length, and the
    sha256 in X-Linked-Etag when it sends one). On a mismatch the partial file is deleted and `dest`
    is left as it was.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(attempts):
        try:
            total, advertised_sha = _transfer(url, part, progress)
            break
        except (_Interrupted, OSError) as exc:  # a cut connection: resume from what we have
            error = exc
    else:
        raise RobertaError(f"downloading {url} failed {attempts} times ({error}); "
                           f"run the same command again to resume from {part}")
    got = part.stat().st_size
    digest = _sha256(part)
    expected_sha = (sha256 or advertised_sha or "").lower()
    problem = None
    if size is not None and got != size:
        problem = f"size mismatch: expected {size} bytes, got {got}"
    elif total is not None and got != total:
        problem = f"size mismatch: the server announced {total} bytes, got {got}"
    elif expected_sha and digest != expected_sha:
        problem = f"checksum mismatch: expected sha256 {expected_sha}, got {digest}"
    if problem:
        part.unlink()
        raise RobertaError(f"{url}: {problem}; the download was discarded and the cache left as it was, "
                           f"try again (or check ROBERTA_BASE_URL if you set it)")
    os.replace(part, dest)
    return {"url": url, "size": got, "sha256": digest}


def _transfer(url: str, part: Path, progress: bool) -> tuple[int | None, str | None]:
    """One HTTP request appending to `part`; returns (total size, advertised sha256)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "roberta-python"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _LinkedHeaders()
    try:
        response = build_opener(redirects).open(Request(url, headers=headers), timeout=60)
    except HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is no prefix of this one: start over
            part.unlink()
            return _transfer(url, part, progress)
        raise RobertaError(f"{url} answered HTTP {exc.code} {exc.reason}; "
                           f"check the name, and ROBERTA_BASE_URL if you set it") from None
    except URLError as exc:
        raise RobertaError(f"cannot reach {url} ({exc.reason}); check the network, point ROBERTA_BASE_URL "
                           f"at a mirror, or fetch the file by hand into the cache") from None
    with response:
        linked = {**redirects.headers, **{k.lower(): v for k, v in response.headers.items()}}
        match = re.fullmatch(r'(?:W/)?"?([0-9a-fA-F]{64})"?', linked.get("x-linked-etag", "").strip())
        advertised_sha = match.group(1) if match else None
        length = response.headers.get("Content-Length")
        if response.status == 206:
            span = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not span or int(span.group(1)) != offset:
                raise _Interrupted(f"the server resumed at the wrong offset ({response.headers.get('Content-Range')})")
            total = int(span.group(2)) if span.group(2) != "*" else None
        else:
            offset = 0  # the server ignored the Range header and sends the whole file
            total = int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[:-len(".part")], disable=not progress, leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")
    return total, advertised_sha


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _record(directory: Path, filename: str, record: dict) -> None:
    """Add what we downloaded (url, size, sha256) to the directory's manifest, atomically."""
    manifest = directory / MANIFEST
    entries = json.loads(manifest.read_text()) if manifest.exists() else {}
    entries[filename] = record
    atomic_write(manifest, json.dumps(entries, indent=2) + "\n")

"""Where models come from: Hugging Face Hub repositories and fairseq's release archives.

Hub repositories (`org/name`, `org/name@revision`) go through `huggingface_hub`, so they share the
cache, settings and credentials every user of the ecosystem has configured: the cache is the one
transformers uses (`HF_HOME`, `HF_HUB_CACHE`), `HF_ENDPOINT` (or `--base-url`) names a mirror,
`HF_HUB_OFFLINE=1` (or `ROBERTA_OFFLINE=1`) stays off the network, `HF_TOKEN` or `hf auth login`
opens gated repositories. A model transformers already downloaded loads from there with no second
copy. `huggingface_hub` does the resolution, revisions, etags, locks and the blob/snapshot layout;
what it leaves out, done here for both kinds of download:

- content checks: every file is parsed after download (JSON, the safetensors header against the
  file's size, the zip or pickle framing of `.bin`, ZipNN's header, a tar.gz that holds a fairseq
  model) and, when the server named its hash (the etag of a Hub file is its sha256 or git sha1),
  hashed; a file that fails is deleted from the cache, so the next download fetches it afresh;
- a stall guard: a transfer that receives under 64 KiB in `ROBERTA_STALL_TIMEOUT` seconds (default
  60) is abandoned with a one-line error (the per-read timeout, `HF_HUB_DOWNLOAD_TIMEOUT`, only
  fires when no byte at all arrives);
- resumption across runs: a Hub file's blob is transferred here, under huggingface_hub's lock for
  it, into `blobs/<etag>.incomplete`, kept when a run is cut and resumed by the next with a Range
  request (huggingface_hub 2.x itself resumes only within one call, see `_hub_file`);
- one-line errors (`RobertaError`) for every failure a user can meet.

fairseq's archives (`roberta.base`, `roberta.large`, `roberta.large.mnli`) are not on the Hub: they
are fetched with huggingface_hub's HTTP download (retries, resumption) under its file lock into
`ROBERTA_CACHE` (default `~/.cache/roberta`), from `ROBERTA_BASE_URL` (or `--base-url`) when set, which
replaces the host and keeps the path. An archive is extracted beside its directory and renamed into
place, so the cache holds a whole model or none.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from .checkpoint import WEIGHT_FILES, read_index
from .errors import RobertaError
from .fileio import atomic_write, open_for_append, parse_json, read_json, remove_owned

FAIRSEQ_HOST = "https://dl.fbaipublicfiles.com"
MANIFEST = "downloads.json"
# fairseq archives hold model.pt and dict.txt only; their tokenizer is the GPT-2 BPE below.
MODELS = {name: f"/fairseq/models/{name}.tar.gz" for name in ("roberta.base", "roberta.large", "roberta.large.mnli")}
GPT2_BPE = {"encoder.json": "/fairseq/gpt2_bpe/encoder.json", "vocab.bpe": "/fairseq/gpt2_bpe/vocab.bpe"}
# A Hub id: `org/name` with an optional `@revision` (a branch, tag or commit).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?")
STALL_BYTES = 64 * 1024


# ---- settings -----------------------------------------------------------------------------------


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache for fairseq archives: `path`, else $ROBERTA_CACHE, else ~/.cache/roberta."""
    return _directory(path or os.environ.get("ROBERTA_CACHE") or Path.home() / ".cache" / "roberta",
                      "the model cache (--cache-dir or ROBERTA_CACHE)")


def hub_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache: `path` when given, else huggingface_hub's ($HF_HUB_CACHE, $HF_HOME/hub)."""
    if path is None:
        path = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface") / "hub"
    return _directory(path, "the Hugging Face cache (--cache-dir, HF_HUB_CACHE or HF_HOME)")


def _directory(path, what: str) -> Path:
    path = Path(path).expanduser()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RobertaError(f"{what} is {path}, but {parent} is a file; point it at a directory")
            break
    return path


def base_url(url: str | None = None, variable: str = "ROBERTA_BASE_URL") -> str | None:
    """A mirror's URL (checked: http or https with a host), from `url` or the environment variable."""
    url = url or os.environ.get(variable) or None
    if url is not None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            source = "--base-url" if url != os.environ.get(variable) else variable
            raise RobertaError(f"{source} {url!r} is not a URL; give one like https://mirror.example.org")
    return url.rstrip("/") if url else None


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("ROBERTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable, "")
    try:
        seconds = float(value) if value.strip() else default
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise RobertaError(f"{variable}={value!r} is not a number of seconds; set it to e.g. {default:g}")
    return seconds


# A cut transfer is resumed this many times within one run (huggingface_hub's default is 5, a second
# apart, each logged); the next run resumes what is left.
RETRIES = 2


@contextlib.contextmanager
def _quiet_retries():
    """huggingface_hub logs every retry ("Trying to resume download...", "Max retries exceeded"): a
    failure is reported here once, as one line, so its warnings are held back while it works."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- the stall guard: installed into huggingface_hub's HTTP client ------------------------------


def _install_stall_guard() -> None:
    """huggingface_hub's client, its transport wrapped so that a trickling transfer ends."""
    import httpx2
    from huggingface_hub.utils import _http

    _seconds("ROBERTA_STALL_TIMEOUT", 60)  # a bad setting is an error before any request
    if getattr(_http.get_session(), "_roberta_guarded", False):
        return

    class Guarded(httpx2.SyncByteStream):
        def __init__(self, inner, url):
            self.inner, self.url = inner, url

        def __iter__(self):
            window = _seconds("ROBERTA_STALL_TIMEOUT", 60)
            start, received = time.monotonic(), 0
            for chunk in self.inner:
                received += len(chunk)
                if time.monotonic() - start >= window:
                    if received < STALL_BYTES:
                        raise RobertaError(f"the download from {self.url} stalled: {received} bytes in the last "
                                           f"{window:g} s (ROBERTA_STALL_TIMEOUT); what arrived is kept and the "
                                           f"next run resumes it; try again later or use a mirror (HF_ENDPOINT, "
                                           f"--base-url)")
                    start, received = time.monotonic(), 0
                yield chunk

        def close(self):
            self.inner.close()

    class Transport(httpx2.BaseTransport):
        def __init__(self):
            self.inner = httpx2.HTTPTransport()

        def handle_request(self, request):
            response = self.inner.handle_request(request)
            return httpx2.Response(response.status_code, headers=response.headers,
                                   stream=Guarded(response.stream, request.url), extensions=response.extensions)

        def close(self):
            self.inner.close()

    def client():
        session = httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook]}, follow_redirects=True,
                                timeout=None, transport=Transport())
        session._roberta_guarded = True
        return session

    _http.set_client_factory(client)


# ---- Hub repositories ---------------------------------------------------------------------------


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repository, revision) of `org/name[@revision]`, or None when `name` is not written so."""
    match = HUB_ID.fullmatch(str(name))
    return (match["repo"], match["revision"]) if match else None


TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
EXTRA_FILES = ("tokenizer_config.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json")


def select_files(names: list[str]) -> list[str]:
    """The files of a repository listing that a RoBERTa needs: config, one set of weights, a tokenizer,
    and a sentence-transformers directory's own configuration (modules.json names its modules; older
    ones keep the transformer in a `0_Transformer/` folder)."""
    present = set(names)
    folder = next((f for f in ["", *sorted({n.split("/")[0] + "/" for n in present if re.fullmatch(
        r"\d+_Transformer/config\.json", n)})] if f + "config.json" in present and any(
        f + w in present for w in WEIGHT_FILES)), "")
    inner = {n[len(folder):] for n in present if n.startswith(folder)}
    chosen = ["config.json"] if "config.json" in inner else []
    chosen += [next(f for f in WEIGHT_FILES if f in inner)] if any(f in inner for f in WEIGHT_FILES) else []
    for group in TOKENIZER_FILES:
        if all(f in inner for f in group):
            chosen += group
            break
    chosen += [f for f in EXTRA_FILES if f in inner]
    chosen = [folder + f for f in chosen]
    chosen += [f for f in ("modules.json",) if folder and f in present]
    chosen += sorted(f for f in present if re.fullmatch(r"\d+_(?!Transformer)\w+/config\.json", f))  # 1_Pooling/
    return chosen


def hub_snapshot(name: str, cache: str | os.PathLike | None = None, endpoint: str | None = None,
                 offline: bool | None = None, progress: bool = True) -> Path:
    """The local directory of a Hub repository (`org/name[@revision]`): its files in the cache's snapshot."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    repo, revision = parse_hub_id(name)
    _check_hub_id(name, repo, revision)
    cache = hub_cache_dir(cache)
    endpoint = base_url(endpoint, "HF_ENDPOINT")
    bars = None if progress else _silent_tqdm()
    if is_offline(offline):
        return _cached_snapshot(name, repo, revision, cache)
    _install_stall_guard()
    try:
        with _quiet_retries():
            info = HfApi(endpoint=endpoint).model_info(repo, revision=revision,
                                                       timeout=_seconds("HF_HUB_ETAG_TIMEOUT", 10))
        files = select_files([s.rfilename for s in info.siblings or []])
        _check_repository(name, files)
        commit = info.sha or revision
        directory = None
        for file in files:
            path = _hub_file(repo, file, commit, cache, endpoint, bars)
            verify(path, cache, repo=name)
            directory = directory or path.parents[len(Path(file).parts) - 1]  # the snapshot's root
            if file.endswith(".index.json"):  # the shards the index names, beside it
                folder = file.rpartition("/")[0]
                for shard in sorted(set(read_index(path).values())):
                    verify(_hub_file(repo, f"{folder}/{shard}" if folder else shard, commit, cache, endpoint, bars),
                           cache, repo=name)
        if revision is not None and revision != commit:  # so that `org/name@revision` also loads offline
            _remember_revision(cache, repo, revision, commit)
        elif revision is None and commit:
            _remember_revision(cache, repo, "main", commit)
        return directory
    except RobertaError:
        raise
    except hf_errors.GatedRepoError:
        raise RobertaError(f"{name} is a gated repository: accept its conditions on its Hub page, then log in "
                           f"(`hf auth login`) or set HF_TOKEN to a token that has access") from None
    except hf_errors.RepositoryNotFoundError:
        raise RobertaError(f"{name} is neither an existing path nor a repository on the Hub (or it is private: "
                           f"set HF_TOKEN); check the spelling") from None
    except hf_errors.RevisionNotFoundError:
        raise RobertaError(f"{repo} has no revision {revision!r}; give a branch, tag or commit it has") from None
    except hf_errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise RobertaError(f"the Hub answered HTTP {status} for {name}; try again later, or check HF_ENDPOINT "
                           f"and HF_TOKEN") from None
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError, OSError, ValueError) as exc:
        return _unreachable(name, repo, revision, cache, exc)
    except Exception as exc:  # httpx's transport errors: no connection, a timeout
        if type(exc).__module__.startswith("httpx"):
            return _unreachable(name, repo, revision, cache, exc)
        raise


def _check_hub_id(name: str, repo: str, revision: str | None) -> None:
    """huggingface_hub's own rules for a repository id (no `--` or `..`, no `-` or `.` at either end of
    a part, at most 96 characters), and a revision that stays one name under the cache's refs/."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise RobertaError(f"{name!r} is not a valid Hub id: a repository name uses letters, digits, '-', '_' and "
                           f"'.', neither starts nor ends with '-' or '.', has no '--' or '..', and is at most 96 "
                           f"characters") from None
    if revision is not None and (revision.startswith("/") or ".." in revision.split("/") or "//" in revision):
        raise RobertaError(f"{name!r}: revision {revision!r} is not a branch, tag or commit name")


def _hub_file(repo: str, file: str, commit: str, cache: Path, endpoint: str | None, bars) -> Path:
    """One file of a Hub snapshot, through `hf_hub_download`, its blob first transferred here so that an
    interrupted download resumes on the next run.

    huggingface_hub 2.x writes each transfer to a process-unique temporary file and deletes it when
    the transfer fails (its PR #4228, against file systems whose locks do not hold), so it resumes only
    within one call. Here the blob is fetched under huggingface_hub's own lock for it (the one
    transformers takes too) into `blobs/<etag>.incomplete`, which is kept when a run is cut and resumed
    with a Range request by the next; `hf_hub_download` then finds the blob and only links it into the
    snapshot. Files stored with Xet, when hf_xet is installed, are left to huggingface_hub (Xet keeps
    its own cache of the chunks already received).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils._runtime import is_xet_available

    folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
    if not (folder / "snapshots" / commit / file).exists():
        url = hf_hub_url(repo, file, revision=commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url, timeout=_seconds("HF_HUB_ETAG_TIMEOUT", 10), endpoint=endpoint)
        if meta.etag and meta.size is not None and not (meta.xet_file_data is not None and is_xet_available()):
            _resume_blob(folder, meta, url, file, bars)
    with _quiet_retries():
        return Path(hf_hub_download(repo, file, revision=commit, cache_dir=cache, endpoint=endpoint, tqdm_class=bars))


def _resume_blob(folder: Path, meta, url: str, file: str, bars) -> None:
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blob = folder / "blobs" / meta.etag
    lock = folder.parent / ".locks" / folder.name / f"{meta.etag}.lock"  # huggingface_hub's lock for this blob
    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:  # a CDN gets no credentials, as in huggingface_hub
        headers.pop("authorization", None)
    with WeakFileLock(str(lock)):
        if blob.exists():
            return
        with open_for_append(partial) as out:
            if out.tell() > meta.size:  # not a prefix of this file: start again
                out.truncate(0)
            try:
                with _quiet_retries():
                    http_get(meta.location, out, resume_size=out.tell(), headers=headers, expected_size=meta.size,
                             displayed_filename=file, tqdm_class=bars, _nb_retries=RETRIES)
            except OSError as exc:
                if "Consistency check failed" in str(exc):  # the server sent another length: keep nothing
                    out.close()
                    partial.unlink(missing_ok=True)
                raise
        os.replace(partial, blob)


def _unreachable(name, repo, revision, cache, exc) -> Path:
    """Network trouble: the cached snapshot when there is one, else one line saying what happened."""
    try:
        return _cached_snapshot(name, repo, revision, cache)
    except RobertaError:
        pass
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise RobertaError(f"cannot download {name} ({type(exc).__name__}: {reason}); check the network, "
                       f"HF_ENDPOINT and HF_HUB_DOWNLOAD_TIMEOUT, or set HF_HUB_OFFLINE=1 to use the cache") from None


def _cached_snapshot(name, repo, revision, cache: Path) -> Path:
    """Offline: the snapshot of `revision` (default main) already in the cache, checked for completeness."""
    from huggingface_hub import try_to_load_from_cache

    found = next((path for file in ("config.json", "modules.json") if isinstance(path := try_to_load_from_cache(
        repo, file, cache_dir=cache, revision=revision or "main"), str)), None)
    if found is None:
        raise RobertaError(f"{name} is not in the Hugging Face cache ({cache}) and offline mode is on "
                           f"(HF_HUB_OFFLINE or ROBERTA_OFFLINE); download it once with the network on")
    directory = Path(found).parent
    files = select_files([str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()])
    _check_repository(name, files, where=f"the cached copy in {directory}")
    for file in files:
        verify(directory / file, cache, repo=name)
    return directory


def _check_repository(name: str, files: list[str], where: str = "the repository") -> None:
    files = [f.rpartition("/")[2] for f in files if re.fullmatch(r"(\d+_Transformer/)?[^/]+", f)]
    if "config.json" not in files:
        raise RobertaError(f"{name}: {where} has no config.json, so it is not a transformers-style checkpoint")
    if not any(f in WEIGHT_FILES for f in files):
        raise RobertaError(f"{name}: {where} has no weights this project reads ({', '.join(WEIGHT_FILES[:4])}, "
                           f"pytorch_model.bin)")


def _remember_revision(cache: Path, repo: str, revision: str, commit: str) -> None:
    from huggingface_hub.file_download import repo_folder_name

    ref = cache / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / revision
    if not (ref.is_file() and ref.read_text() == commit):
        ref.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ref, commit)


# ---- content checks -----------------------------------------------------------------------------


def verify(path: Path, cache: Path, repo: str | None = None) -> None:
    """Parse a downloaded file by its name, and hash it against its cache etag when that is a hash.

    A file that fails is removed (the snapshot's link and its blob) so that the next download fetches
    it afresh; only what lies inside `cache` is removed, never what a link in it points to elsewhere.
    """
    problem = _content_problem(path)
    blob = Path(os.path.realpath(path))
    owned_blob = blob.parent.name == "blobs" and os.path.commonpath([blob, os.path.realpath(cache)]) == \
        os.path.realpath(cache)
    if problem is None and repo is not None and owned_blob:  # a cache blob's name is its etag
        problem = _hash_problem(blob)
    if problem is None:
        return
    source = f"{repo}: " if repo else ""
    removed = remove_owned(path, cache)  # the snapshot's link (or the file itself), not its target
    removed = owned_blob and remove_owned(blob, cache) or removed
    if not removed:
        raise RobertaError(f"{source}{path.name} in the cache is {problem}; it lies outside the cache ({blob}), "
                           f"so it was left in place: remove {path} (or the link above it) and run again")
    raise RobertaError(f"{source}{path.name} as downloaded is {problem}; it was removed from the cache, so "
                       f"the next run downloads it again (if it recurs, the server or mirror is sending bad files)")


_CHECKED: dict[tuple[str, int, int], None] = {}  # blobs hashed in this process: (path, size, mtime)


def _hash_problem(blob: Path) -> str | None:
    """The etag of a Hub file is the sha256 of an LFS file or the git blob sha1 of a small one."""
    stat = blob.stat()
    key = (str(blob), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob.name):
        return None
    digest = hashlib.sha256() if len(blob.name) == 64 else hashlib.sha1(b"blob %d\0" % stat.st_size)
    with open(blob, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != blob.name:
        return f"not the file the server announced (its hash is {digest.hexdigest()}, the etag says {blob.name})"
    _CHECKED[key] = None
    return None


def _content_problem(path: Path) -> str | None:
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if name.endswith(".json"):
                parse_json(head + f.read())
            elif name.endswith((".txt", ".bpe", ".md")):
                (head + f.read()).decode("utf-8")
            elif name.endswith(".safetensors") and not name.endswith(".znn.safetensors"):
                return _safetensors_problem(f, head, size)
            elif name.endswith(".znn.safetensors"):
                return _safetensors_problem(f, head, size, exact=False)
            elif name.endswith(".znn"):
                if head[:2] != b"ZN":  # ZipNN's header starts with its magic
                    return "not a ZipNN file (bad magic)"
            elif name.endswith((".bin", ".pt")):
                if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
                    return "neither a torch zip archive nor a pickle"
    except RobertaError as exc:  # the JSON reader's problem
        return str(exc)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid {'JSON' if name.endswith('.json') else 'UTF-8 text'} ({str(exc).splitlines()[0][:80]})"
    except OSError as exc:
        return f"unreadable ({exc})"
    return None


def _safetensors_problem(f, head: bytes, size: int, exact: bool = True) -> str | None:
    if len(head) < 8:
        return "not a safetensors file (too short)"
    n = int.from_bytes(head, "little")
    if n > min(size - 8, 100 << 20):
        return "not a safetensors file (its header length is past the end of the file)"
    try:
        header = parse_json(f.read(n), kind=dict)
    except RobertaError as exc:
        return f"not a safetensors file (its header is {exc})"
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        return "not a safetensors file (a tensor's data_offsets are missing or not numbers)"
    data = size - 8 - n
    if exact and max(ends, default=0) != data or not exact and max(ends, default=0) > data:
        return f"a truncated or padded safetensors file (tensors end at byte {max(ends, default=0)} of {data})"
    return None


# ---- fairseq archives ---------------------------------------------------------------------------


def model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where a fairseq archive's model lives in the cache, once downloaded and extracted."""
    return cache_dir(cache) / name


def is_cached(name: str, cache: str | os.PathLike | None = None) -> bool:
    # An archive's directory appears in one rename, so its existence means complete.
    return model_dir(name, cache).is_dir()


def download(name: str, cache: str | os.PathLike | None = None, base: str | None = None,
             offline: bool | None = None, progress: bool = True) -> Path:
    """The local directory of a fairseq release (`roberta.base`, ...), downloaded when missing."""
    if name not in MODELS:
        raise RobertaError(f"unknown model name {name!r}: known names are {', '.join(MODELS)}, a Hub id "
                           f"(org/name[@revision]), or a path")
    target = model_dir(name, cache)
    if target.exists() and not target.is_dir():
        raise RobertaError(f"{target} is a file where the cache keeps {name}; remove it and run again")
    if target.is_dir():
        return target
    base = base_url(base)
    _seconds("ROBERTA_STALL_TIMEOUT", 60)  # settings are checked before anything is written
    url = (base or FAIRSEQ_HOST) + MODELS[name]
    if is_offline(offline):
        raise RobertaError(f"{name} is not in the cache and offline mode is on (ROBERTA_OFFLINE): download {url} "
                           f"and extract it so that {target} holds model.pt and dict.txt")
    from huggingface_hub.utils import WeakFileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(_lock_path(target)):
        if target.is_dir():  # another process placed it while we waited for the lock
            return target
        archive = fetch(url, target.with_name(target.name + ".tar.gz"), progress)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
        try:
            try:
                root = extract_archive(archive, staging)
                if not all((root / f).is_file() for f in ("model.pt", "dict.txt")):
                    raise RobertaError(f"{url} is a tar.gz archive but holds no fairseq model (model.pt + dict.txt)")
                for file in ("model.pt", "dict.txt"):
                    _must_parse(root / file, url, staging)
            except RobertaError:
                archive.unlink()  # a wrong archive would fail the same way next time: fetch it afresh
                raise
            # Make the cached model self-contained: the tokenizer files sit beside model.pt and dict.txt.
            bpe = gpt2_bpe(cache, base, False, progress)
            for file in GPT2_BPE:
                if not (root / file).exists():
                    shutil.copyfile(bpe / file, root / file)
            _record(root, archive.name, {"url": url, "size": archive.stat().st_size, "sha256": _sha256(archive)})
            root.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return target


def gpt2_bpe(cache: str | os.PathLike | None = None, base: str | None = None,
             offline: bool | None = None, progress: bool = True) -> Path:
    """The directory holding the GPT-2 BPE files (encoder.json, vocab.bpe) that fairseq models use."""
    target = cache_dir(cache) / "gpt2_bpe"
    base = base_url(base)
    missing = [f for f in GPT2_BPE if not (target / f).is_file()]
    if missing and is_offline(offline):
        urls = " and ".join((base or FAIRSEQ_HOST) + GPT2_BPE[f] for f in missing)
        raise RobertaError(f"the GPT-2 BPE files are not in the cache and offline mode is on (ROBERTA_OFFLINE): "
                           f"download {urls} into {target}")
    for file in missing:
        target.mkdir(parents=True, exist_ok=True)
        url = (base or FAIRSEQ_HOST) + GPT2_BPE[file]
        path = fetch(url, target / file, progress)
        _must_parse(path, url, cache_dir(cache))
    return target


def _must_parse(path: Path, url: str, owner: Path) -> None:
    problem = _content_problem(path) or (None if path.name != "vocab.bpe" or path.read_text(
        encoding="utf-8").startswith("#version") else "not a BPE merges file")
    if problem:
        remove_owned(path, owner)
        raise RobertaError(f"{url}: {path.name} is {problem}; it was not kept, try again (or check ROBERTA_BASE_URL)")


def _lock_path(target: Path) -> Path:
    locks = target.parent / ".locks"
    locks.mkdir(exist_ok=True)
    return locks / f"{target.name}.lock"


def fetch(url: str, dest: str | os.PathLike, progress: bool = True) -> Path:
    """Download `url` to `dest` through huggingface_hub's `http_get`, under a lock, resuming `<dest>.part`.

    The partial file is moved into place only when complete (as long as the server announced); a
    second process downloading the same file waits for the first and then finds it in place.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock

    dest = Path(dest)
    if dest.exists() and not dest.is_file():
        raise RobertaError(f"{dest} exists and is not a file; remove it and run again")
    _install_stall_guard()
    part = dest.with_name(dest.name + ".part")
    with WeakFileLock(_lock_path(dest)):
        if dest.is_file():
            return dest
        try:
            with open_for_append(part) as out:
                with _quiet_retries():
                    http_get(url, out, resume_size=out.tell(), displayed_filename=dest.name,
                             headers={"User-Agent": "roberta-python"},
                             tqdm_class=None if progress else _silent_tqdm(), _nb_retries=RETRIES)
        except HfHubHTTPError as exc:
            part.unlink(missing_ok=True)
            status = exc.response.status_code if exc.response is not None else "?"
            raise RobertaError(f"{url} answered HTTP {status}; check the name, and ROBERTA_BASE_URL if you set it") from None
        except RobertaError:
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:  # a size mismatch after retries; the partial file is kept for the next run
            if part.exists() and "Consistency check failed" in str(exc):
                part.unlink()
            raise RobertaError(f"downloading {url} failed ({str(exc).splitlines()[0]}); run the same command "
                               f"again to retry") from None
        except Exception as exc:  # httpx: no connection, read timeouts after huggingface_hub's retries
            if not type(exc).__module__.startswith("httpx"):
                raise
            raise RobertaError(f"cannot download {url} ({type(exc).__name__}: {exc}); check the network and "
                               f"ROBERTA_BASE_URL (timeout per read: HF_HUB_DOWNLOAD_TIMEOUT="
                               f"{constants.HF_HUB_DOWNLOAD_TIMEOUT} s); run again to resume") from None
        os.replace(part, dest)
    return dest


def _silent_tqdm():
    """A progress bar class that shows nothing (progress=False), for huggingface_hub's `tqdm_class`."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def extract_archive(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Extract a .tar.gz into `into` safely; returns the model root (the single top directory if any).

    Members that are links, or whose paths leave `into`, are refused: an archive from the internet
    must not write anywhere else.
    """
    archive, into = Path(archive), Path(into)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if member.issym() or member.islnk():
                    raise RobertaError(f"{archive} contains a link ({member.name}); refusing to extract it")
                if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                    raise RobertaError(f"{archive} has a member outside its directory ({member.name}); "
                                       f"refusing to extract it")
            tar.extractall(into, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RobertaError(f"{archive} is not a readable .tar.gz archive ({reason}); download it again") from None
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _record(directory: Path, filename: str, record: dict) -> None:
    """Add what we downloaded (url, size, sha256) to the directory's manifest, atomically."""
    manifest = directory / MANIFEST
    entries = read_json(manifest) if manifest.exists() else {}
    entries[filename] = record
    atomic_write(manifest, json.dumps(entries, indent=2) + "\n")

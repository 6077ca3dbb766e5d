"""HTTP servers on 127.0.0.1 for download tests: a plain file server (fairseq's archive host) and one
that answers like the Hugging Face Hub's file and model-info endpoints. Both are bounded: they
refuse requests past `max_requests` and stop serving after `lifetime` seconds."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    """Serves `files` ({url path: bytes}) and logs every request as (path, Range header or None).

    Knobs, per path: `trickle[path] = seconds` sends the body one byte per that many seconds;
    `cut[path] = n` closes the connection after byte n of the file, for the next
    `cut_times[path]` requests (default once); `wrong[path] = bytes` serves those bytes instead while
    still announcing the sha256 of the real ones; `linked_sha` announces sha256s in X-Linked-Etag,
    as the Hugging Face hub does for large files; `redirect[path] = target` answers 302 to `target`
    and announces the sha256 of `target`'s real bytes in X-Linked-Etag, as the hub does before its CDN.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.cut_times: dict[str, int] = {}
        self.wrong: dict[str, bytes] = {}
        self.linked_sha: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.trickle: dict[str, float] = {}
        self.log: list[tuple[str, str | None]] = []
        self.max_requests, self.lifetime, self.started = 500, 120.0, time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                range_header = self.headers.get("Range")
                server.log.append((self.path, range_header))
                if len(server.log) > server.max_requests or time.monotonic() - server.started > server.lifetime:
                    self.send_error(503, "test server budget spent")
                    return
                if self.path in server.redirect:
                    target = server.redirect[self.path]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(server.files[target]).hexdigest()}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                real = server.files[self.path]
                data = server.wrong.get(self.path, real)
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1)) if range_header else 0
                if start >= len(data) and range_header:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if range_header else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if range_header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if self.path in server.linked_sha:
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(real).hexdigest()}"')
                self.end_headers()
                end = len(data)
                if self.path in server.cut and server.cut_times.get(self.path, 1) > 0:
                    server.cut_times[self.path] = server.cut_times.get(self.path, 1) - 1
                    end = max(start, server.cut[self.path])
                if self.path in server.trickle:
                    _trickle(self, data[start:end], server.trickle[self.path], server)
                else:
                    self.wfile.write(data[start:end])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _trickle(handler, data: bytes, every: float, server) -> None:
    """Send one byte per `every` seconds until the client leaves or the server's lifetime is over."""
    for i in range(len(data)):
        if time.monotonic() - server.started > server.lifetime:
            return
        try:
            handler.wfile.write(data[i:i + 1])
            handler.wfile.flush()
        except OSError:
            return
        time.sleep(every)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Answers like the Hub: `/{repo}/resolve/{revision}/{file}` (HEAD and GET, with X-Repo-Commit,
    ETag, X-Linked-Etag/-Size and a redirect to `/cdn/{sha256}` for large files, as the Hub does for
    LFS files before its CDN) and `/api/models/{repo}[/revision/{revision}]` (the file listing).

    `add(repo, files, revision="main")` publishes a commit (returned) with `files` ({name: bytes}) and
    points `revision` at it. Knobs: `gated` (repositories answered 401 GatedRepo without a token),
    `wrong[(repo, file)] = bytes` (sent instead of the real bytes, under the real headers),
    `trickle[(repo, file)] = seconds` (one byte per that many seconds), `cut[(repo, file)] = n` (the
    next transfer of the file closes after byte n, and the file's server then answers 503 while the key
    is in `outage`, as a network that stays down for the rest of a run). `log` holds (method, path,
    Range header or None).
    """

    LFS_FROM = 1000  # bytes: larger files are served as LFS files (sha256 etag, redirect)

    def __init__(self):
        self.commits: dict[tuple[str, str], dict[str, bytes]] = {}
        self.refs: dict[tuple[str, str], str] = {}
        self.gated: set[str] = set()
        self.wrong: dict[tuple[str, str], bytes] = {}
        self.trickle: dict[tuple[str, str], float] = {}
        self.cut: dict[tuple[str, str], int] = {}
        self.outage: set[tuple[str, str]] = set()
        self.log: list[tuple[str, str, str | None]] = []
        self.max_requests, self.lifetime, self.started = 500, 120.0, time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def reply(self, status, headers=(), body=b"", send=True):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send and body:
                    self.wfile.write(body)

            def answer(self, body: bool):
                server.log.append((self.command, self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                if len(server.log) > server.max_requests or time.monotonic() - server.started > server.lifetime:
                    return self.reply(503, body=b"test server budget spent", send=body)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path):
                    return self.tree(m[1], m[2], m[3].strip("/"), body)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self.model_info(m[1], m[2] or "main", body)
                if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
                    for (repo, commit), files in server.commits.items():
                        for name, data in files.items():
                            if hashlib.sha256(data).hexdigest() == m[1]:
                                return self.file(repo, name, data, None, body)
                    return self.reply(404, send=body)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self.reply(404, [("X-Error-Code", "RepoNotFound")], send=body)
                repo, revision, name = m[1], m[2], m[3]
                if repo in server.gated and not self.headers.get("Authorization"):
                    return self.reply(401, [("X-Error-Code", "GatedRepo"),
                                            ("X-Error-Message", "Access to this model is restricted")], send=body)
                commit = server.resolve(repo, revision)
                if commit is None:
                    code = "RevisionNotFound" if any(r == repo for r, _ in server.refs) else "RepoNotFound"
                    return self.reply(404, [("X-Error-Code", code)], send=body)
                files = server.commits[(repo, commit)]
                if name not in files:
                    return self.reply(404, [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)], send=body)
                data = files[name]
                if len(data) >= server.LFS_FROM:
                    sha = hashlib.sha256(data).hexdigest()
                    return self.reply(302, [("Location", f"{server.cdn_url}/cdn/{sha}"), ("X-Repo-Commit", commit),
                                            ("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(len(data))),
                                            ("ETag", f'"{git_sha1(data)}"')], send=body)
                return self.file(repo, name, data, commit, body, etag=git_sha1(data))

            def file(self, repo, name, data, commit, body, etag=None):
                if (repo, name) in server.outage:
                    return self.reply(503, body=b"down", send=body)
                sent = server.wrong.get((repo, name), data)
                start = 0
                if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(m[1])
                headers = [("ETag", f'"{etag or hashlib.sha256(data).hexdigest()}"'), ("Accept-Ranges", "bytes")]
                headers += [("X-Repo-Commit", commit)] if commit else []  # a CDN does not know commits
                status = 206 if start else 200
                if start:
                    headers.append(("Content-Range", f"bytes {start}-{len(sent) - 1}/{len(sent)}"))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(sent) - start))
                self.end_headers()
                if not body:
                    return
                if (repo, name) in server.trickle:
                    _trickle(self, sent[start:], server.trickle[(repo, name)], server)
                    self.close_connection = True
                elif (repo, name) in server.cut:
                    self.wfile.write(sent[start:max(start, server.cut.pop((repo, name)))])
                    self.wfile.flush()
                    server.outage.add((repo, name))
                    self.close_connection = True
                else:
                    self.wfile.write(sent[start:])

            def tree(self, repo, revision, folder, body):
                commit = server.resolve(repo, revision)
                files = server.commits.get((repo, commit), {})
                prefix = folder + "/" if folder else ""
                entries = [{"type": "file", "path": n, "size": len(d), "oid": git_sha1(d)}
                           for n, d in sorted(files.items()) if n.startswith(prefix)]
                if not entries:
                    return self.reply(404, [("X-Error-Code", "EntryNotFound")], send=body)
                self.reply(200, [("Content-Type", "application/json")], json.dumps(entries).encode(), send=body)

            def model_info(self, repo, revision, body):
                commit = server.resolve(repo, revision)
                if commit is None:
                    code = "RevisionNotFound" if any(r == repo for r, _ in server.refs) else "RepoNotFound"
                    return self.reply(404, [("X-Error-Code", code)], send=body)
                files = server.commits[(repo, commit)]
                info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                        "gated": "auto" if repo in server.gated else False,
                        "siblings": [{"rfilename": n, "size": len(d)} for n, d in sorted(files.items())]}
                self.reply(200, [("Content-Type", "application/json")], json.dumps(info).encode(), send=body)

        # Two listeners, as the Hub and its CDN are two hosts: large files redirect to the second.
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for httpd in self.servers:
            httpd.daemon_threads = True
        self.url, self.cdn_url = (f"http://127.0.0.1:{httpd.server_address[1]}" for httpd in self.servers)
        self.threads = [threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True) for httpd in self.servers]

    def add(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        commit = hashlib.sha1(repr((repo, revision, sorted((n, git_sha1(d)) for n, d in files.items()))).encode()).hexdigest()
        self.commits[(repo, commit)] = dict(files)
        self.refs[(repo, revision)] = commit
        return commit

    def resolve(self, repo: str, revision: str) -> str | None:
        if (repo, revision) in self.refs:
            return self.refs[(repo, revision)]
        return revision if (repo, revision) in self.commits else None

    def __enter__(self) -> "HubServer":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        for httpd in self.servers:
            httpd.shutdown()
            httpd.server_close()


def directory_files(directory: Path) -> dict[str, bytes]:
    """{relative name: bytes} of every file under `directory` (what a Hub repository would hold)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tar_gz(files: dict[str, bytes | Path], top: str | None = None) -> bytes:
    """A .tar.gz holding `files` ({name: bytes or a path to read}), under directory `top` if given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_checkpoints(root: Path, bpe_dir: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny RoBERTa with the real 50265-token vocabulary and an 'mnli' head, in every layout load reads.

    fairseq: model.pt + dict.txt only, as the releases ship it (the BPE files come from the GPT-2 BPE
    download); fairseq_bpe: with encoder.json + vocab.bpe; archive: fairseq as a release .tar.gz;
    hf: config.json + model.safetensors + vocab.json + merges.txt.
    """
    import torch

    from roberta.checkpoint import save_fairseq, save_model
    from roberta.model import RobertaConfig, RobertaForMaskedLM
    from roberta.tokenizer import RobertaTokenizer

    torch.manual_seed(seed)
    model = RobertaForMaskedLM(RobertaConfig.tiny(vocab_size=50265, max_position_embeddings=66))
    with torch.no_grad():  # a non-zero LM bias and head biases, so that nothing passes by accident
        model.lm_head.bias.normal_()
        # RoBERTa has no token types: fairseq has no such table and published models hold zeros here
        model.roberta.embeddings.token_type_embeddings.weight.zero_()
    head = model.register_classification_head("mnli", 3)
    with torch.no_grad():
        head.out_proj.bias.normal_()
    model.eval()
    tokenizer = RobertaTokenizer.from_pretrained(bpe_dir)
    paths = {name: root / name for name in ("fairseq", "fairseq_bpe", "hf")}
    save_fairseq(model, paths["fairseq_bpe"], tokenizer=tokenizer)
    save_model(model, paths["hf"], tokenizer=tokenizer)
    paths["fairseq"].mkdir()
    (paths["fairseq"] / "model.pt").write_bytes((paths["fairseq_bpe"] / "model.pt").read_bytes())
    (paths["fairseq"] / "dict.txt").write_bytes((bpe_dir / "dict.txt").read_bytes())  # the release's own
    paths["archive"] = root / "roberta.tiny.tar.gz"
    paths["archive"].write_bytes(tar_gz({n: paths["fairseq"] / n for n in ("model.pt", "dict.txt")}, top="roberta.tiny"))
    return paths


def serve_models(server: FileServer, paths: dict[str, Path], bpe_dir: Path) -> None:
    """Serve the tiny model under every fairseq release name, with the GPT-2 BPE files."""
    archive = paths["archive"].read_bytes()
    for name in ("roberta.base", "roberta.large", "roberta.large.mnli"):
        server.files[f"/fairseq/models/{name}.tar.gz"] = archive
    for name in ("encoder.json", "vocab.bpe"):
        server.files[f"/fairseq/gpt2_bpe/{name}"] = (bpe_dir / name).read_bytes()

"""A small HTTP file server on 127.0.0.1 for download tests: Range requests, cut connections, bad bytes."""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    """Serves `files` ({url path: bytes}) and logs every request as (path, Range header or None).

    Knobs, per path: `cut[path] = n` closes the connection after byte n of the file, for the next
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
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                range_header = self.headers.get("Range")
                server.log.append((self.path, range_header))
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
    """Serve the tiny model under every official name: fairseq archives, GPT-2 BPE, Hugging Face files."""
    archive = paths["archive"].read_bytes()
    for name in ("roberta.base", "roberta.large", "roberta.large.mnli"):
        server.files[f"/fairseq/models/{name}.tar.gz"] = archive
    for name in ("encoder.json", "vocab.bpe"):
        server.files[f"/fairseq/gpt2_bpe/{name}"] = (bpe_dir / name).read_bytes()
    for repo in ("FacebookAI/roberta-base", "FacebookAI/roberta-large"):
        for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
            server.files[f"/{repo}/resolve/main/{name}"] = (paths["hf"] / name).read_bytes()

"""`make demo`: the whole pipeline in a few minutes on a laptop CPU, with nothing downloaded.

1. a corpus from text every Python installation carries: the docstrings of the standard library
   (read with `ast`, no module is imported) and the reference manual pages `help()` shows
   (`pydoc_data.topics`);
2. a byte-level BPE trained on it, and the corpus in token shards (`roberta preprocess`);
3. a tiny RoBERTa pretrained on it (`roberta pretrain`), fill-mask predictions before and after;
4. a small task fine-tuned on the pretrained encoder and on a randomly initialised one: is a
   docstring sentence in its real word order or shuffled? Both accuracies are printed; a couple of
   minutes of pretraining teach a tiny model word frequencies more than syntax, so do not expect
   the pretrained one to win by much (or at all) at this scale;
5. the fine-tuned model served over HTTP (`roberta serve`), asked a few questions with a real HTTP
   client (urllib), and stopped with SIGTERM.
"""
from __future__ import annotations

import ast
import collections
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

import torch

from .data import preprocess
from .errors import RobertaError
from .finetune import finetune
from .model import RobertaConfig, RobertaForMaskedLM
from .pretrain import PretrainConfig, pretrain
from .tokenizer import RobertaTokenizer

DEMO_OUTPUTS = {"corpus", "data", "pretrain", "word-order", "untrained", "finetune"}
FILL_MASK = [
    "Return a new <mask> containing the items of the iterable.",
    "This module provides <mask> for working with regular expressions.",
    "If the file does not <mask>, an exception is raised.",
    "The default <mask> is None.",
]


def stdlib_documents() -> list[str]:
    """English prose found in every Python installation, one document per docstring or help topic."""
    docs = []
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in _statements(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    try:
        from pydoc_data.topics import topics
        docs.extend(topics[k] for k in sorted(topics))
    except ImportError:  # some distributions split it out; the docstrings suffice
        pass
    return docs


def _statements(tree: ast.Module):
    """The module and every statement in it, in `ast.walk`'s breadth-first order, without descending
    into expressions (where no docstring can be): a tenth of the nodes."""
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        queue.extend(child for child in ast.iter_child_nodes(node)
                     if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)))
        yield node


def write_corpus(docs: list[str], path: Path) -> None:
    """One document per blank-line-separated block: paragraphs inside a docstring are joined."""
    blocks = []
    for doc in docs:
        lines = [line.strip() for line in doc.splitlines()]
        lines = [line for line in lines if line and not line.startswith((">>>", "..."))]  # drop code examples
        if lines:
            blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


@torch.no_grad()
def fill_mask(model, tok: RobertaTokenizer, text: str, k: int = 5) -> list[str]:
    ids = torch.tensor([tok.encode(text, parse_special_tokens=True)])
    position = (ids[0] == tok.mask_token_id).nonzero()[0, 0]
    logits = model.eval()(ids).logits[0, position]
    return [tok.decode([i]).strip() or repr(tok.decode([i])) for i in logits.topk(k).indices.tolist()]


def word_order_task(docs: list[str], directory: Path, n: int = 3000, seed: int = 0) -> Path:
    """train.jsonl / dev.jsonl: a docstring sentence of 6-30 words, in order or with its words shuffled."""
    rng = random.Random(seed)
    sentences = sorted({s.strip() for d in docs for s in d.replace("\n", " ").split(". ")
                        if 6 <= len(s.split()) <= 30 and s.isascii()})
    rng.shuffle(sentences)
    rows = []
    for i, s in enumerate(sentences[:n]):
        words = s.split()
        if i % 2:
            while words == s.split():
                rng.shuffle(words)
        rows.append(json.dumps({"text": " ".join(words), "label": "shuffled" if i % 2 else "ordered"}))
    directory.mkdir(parents=True)
    cut = len(rows) * 4 // 5
    (directory / "train.jsonl").write_text("\n".join(rows[:cut]) + "\n")
    (directory / "dev.jsonl").write_text("\n".join(rows[cut:]) + "\n")
    return directory


def run_demo(out: str | Path = "demo-out", steps: int = 3000, vocab_size: int = 4096, model: str = "tiny",
             threads: int = 1) -> None:
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not {p.name for p in out.iterdir()} <= DEMO_OUTPUTS:
            raise RobertaError(f"{out} holds files the demo did not write: remove it or pass another --out")
        shutil.rmtree(out)  # an earlier demo's output: `make demo` runs again from a clean slate
    out.mkdir(parents=True, exist_ok=True)

    print("1/5 building a corpus from the Python standard library's documentation")
    docs = stdlib_documents()
    corpus = out / "corpus" / "stdlib-docs.txt"
    corpus.parent.mkdir()
    write_corpus(docs, corpus)
    if corpus.stat().st_size < 100_000:
        raise RobertaError(f"only {corpus.stat().st_size} bytes of documentation found under "
                           f"{sysconfig.get_paths()['stdlib']}: this Python ships without its sources")
    print(f"    {len(docs):,} docstrings and help topics, {corpus.stat().st_size / 1e6:.1f} MB")

    print(f"2/5 training a {vocab_size}-token byte-level BPE and writing token shards")
    data = out / "data"
    preprocess([corpus], data, vocab_size=vocab_size, valid_fraction=0.02, progress=False)
    tok = RobertaTokenizer.from_pretrained(data / "tokenizer")

    print(f"3/5 pretraining a {model} RoBERTa for {steps} steps")
    # one thread by default: the tiny model's matrices are too small to gain from splitting them
    cfg = PretrainConfig.preset("tiny", model=model, data=str(data), max_len=64, batch_size=32,
                                micro_batch_size=32, lr=3e-3, warmup_updates=steps // 20, total_updates=steps,
                                dropout=0.0, val_every=max(1, steps // 5), save_every=max(1, steps // 3), log_every=20,
                                val_samples=256, threads=threads)
    torch.manual_seed(cfg.seed)
    preset = getattr(RobertaConfig, model)
    untrained = RobertaForMaskedLM(preset(vocab_size=len(tok), max_position_embeddings=cfg.max_len + 2))
    run = out / "pretrain"
    model_dir = pretrain(cfg, run)
    trained = RobertaForMaskedLM.from_pretrained(model_dir)
    for text in FILL_MASK:
        print(f"    {text}\n      before: {', '.join(fill_mask(untrained, tok, text))}\n"
              f"      after:  {', '.join(fill_mask(trained, tok, text))}")

    print("4/5 fine-tuning: is a docstring sentence in its real word order, or shuffled?")
    task = word_order_task(docs, out / "word-order")
    scratch = out / "untrained"
    untrained.save_pretrained(scratch)
    tok.save_pretrained(scratch)
    accuracy = {}
    for name, init in (("pretrained", model_dir), ("from scratch", scratch)):
        print(f"    run {len(accuracy) + 1}/2: the {'pretrained encoder' if init == model_dir else 'randomly initialised encoder'}"
              f" ({init}) -> {out / 'finetune' / name.replace(' ', '-')}")
        result = finetune("custom", task, init, out / "finetune" / name.replace(" ", "-"), lr=1e-3,
                          max_epochs=3, weight_decay=0.01, dropout=0.0, head_name="word_order")
        accuracy[name] = result["dev"]["accuracy"]
    print(f"    dev accuracy on 600 sentences: pretrained {accuracy['pretrained']:.1%}, "
          f"from scratch {accuracy['from scratch']:.1%} (chance 50%)")

    print("5/5 serving the fine-tuned model over HTTP (roberta serve), asked with a real HTTP client")
    served = out / "finetune" / "pretrained" / "model"  # the best checkpoint of that run
    ordered = next(json.loads(line)["text"] for line in (task / "dev.jsonl").open() if '"ordered"' in line)
    serve_and_ask(served, [ordered, " ".join(reversed(ordered.split()))])

    print(f"done in {time.perf_counter() - start:.0f} s\n  checkpoint: {model_dir}\n"
          f"  fine-tuned: {served}\n  metrics:    {run / 'metrics.jsonl'}\n  plot:       {run / 'curves.png'}\n"
          f"  serve it:   roberta serve -m {served}")


def serve_and_ask(model_dir: Path, texts: list[str]) -> None:
    """`roberta serve` on `model_dir` in a subprocess: a few requests with urllib, then SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "roberta", "serve", "-m", str(model_dir), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:  # the first line names the address once the port is bound
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
        if url is None:
            raise RobertaError(f"roberta serve exited with status {proc.wait()} before serving")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its log pipe drained
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RobertaError("roberta serve did not become healthy") from None
                time.sleep(0.1)

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)

        print(f"    {url}")
        predicted = post("/predict", {"inputs": [[text] for text in texts]})  # per input, its classes best first
        for text, classes in zip(texts, predicted):
            print(f"    POST /predict   {classes[0]['label']:<9} {classes[0]['score']:.2f}  {text[:70]}")
        vectors = post("/embed", {"inputs": texts})
        cosine = sum(a * b for a, b in zip(*vectors))  # unit vectors
        print(f"    POST /embed     {len(vectors)} vectors of {len(vectors[0])}, cosine {cosine:.3f}")
        tokens = [token["text"] for token in post("/tokenize", {"inputs": texts[0]})[0]]
        print(f"    POST /tokenize  {len(tokens)} tokens: {' '.join(tokens[:8])} ...")
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            batches = re.search(r"^roberta_batch_inputs_count (\S+)$", response.read().decode(), re.M).group(1)
        print(f"    GET  /metrics   {float(batches):.0f} batches run")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"    stopped with SIGTERM: exit status {code}")

"""Pretraining data: token shards on disk, full-sentence packing, and dynamic masking.

`preprocess` turns plain text into memory-mapped token shards once. At training time `PackedDataset`
cuts the shards into blocks of at most `max_len` tokens (the paper's FULL-SENTENCES or DOC-SENTENCES
inputs), and `mask_tokens` draws a fresh mask every time a block is seen (dynamic masking, section 4.1).

On disk (one directory per corpus):
    meta.json             vocabulary size, special ids, token dtype, shards and their sizes
    tokenizer/            the vocabulary, in both the Hugging Face and the fairseq layout
    train-00000.bin       token ids (uint16 while the vocabulary fits, else uint32), every sentence
                          followed by </s>, documents one after another
    train-00000.idx       npz: `sent_ends` (token offset where each sentence ends) and `doc_ends`
                          (sentence count where each document ends); the same for `valid-*`.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import RobertaError
from .fileio import read_json, replace_dir

FORMAT_VERSION = 1
SNIFF_BYTES = 1 << 16


# ----------------------------------------------------------------------------------------------------
# Corpus preparation


def read_documents(paths: list[Path], doc_per_file: bool) -> Iterator[list[str]]:
    """Yield documents as lists of non-empty lines (the sentences), streaming: memory holds one document.

    A document is one blank-line-separated block, or one whole file with `doc_per_file`.
    """
    for path in paths:
        doc: list[str] = []
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                for line in f:
                    if "\x00" in line:
                        raise RobertaError(f"{path} holds NUL bytes, so it is not text: pass plain-text files")
                    line = line.strip()
                    if line:
                        doc.append(line)
                    elif doc and not doc_per_file:
                        yield doc
                        doc = []
            except UnicodeDecodeError as exc:
                raise RobertaError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start} of a block): "
                                   "pass plain-text files") from None
        if doc:
            yield doc


def check_text_files(paths: list[Path]) -> None:
    """Fail fast, before any vocabulary training, on missing, binary or empty inputs."""
    if not paths:
        raise RobertaError("no input files given: pass one or more plain-text files or directories")
    any_text = False
    for path in paths:
        if not path.is_file():
            raise RobertaError(f"{path} is not a file: pass plain-text files or directories holding them")
        head = path.read_bytes()[:SNIFF_BYTES] if path.stat().st_size <= SNIFF_BYTES else _head(path)
        if b"\x00" in head:
            raise RobertaError(f"{path} holds NUL bytes, so it is not text: pass plain-text files")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # a multi-byte character cut by the sniff window is fine
                raise RobertaError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): "
                                   "pass plain-text files") from None
            text = head[:exc.start].decode("utf-8")
        any_text = any_text or bool(text.strip()) or path.stat().st_size > SNIFF_BYTES
    if not any_text:
        raise RobertaError("the corpus is empty (every input file is blank): pass files that hold text")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to the regular files under them, in sorted order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            paths.append(item)
    return paths


_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from .tokenizer import RobertaTokenizer

    _worker_tokenizer = RobertaTokenizer.from_pretrained(tokenizer_dir)


def _encode_docs(docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a chunk of documents: flat ids (each sentence + </s>), sentence lengths, sentences per doc."""
    tok = _worker_tokenizer
    lines = [line for doc in docs for line in doc]
    ids: list[int] = []
    sent_lens = np.empty(len(lines), dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(lines)):
        # encode_batch adds <s> ... </s>; a stored sentence keeps only its trailing </s> (as fairseq does)
        if enc and enc[0] == tok.bos_token_id:
            enc = enc[1:]
        if not enc or enc[-1] != tok.eos_token_id:
            enc = list(enc) + [tok.eos_token_id]
        ids.extend(enc)
        sent_lens[i] = len(enc)
    return np.asarray(ids, dtype=np.int64), sent_lens, np.array([len(d) for d in docs], dtype=np.int64)


def _chunks(docs: Iterator[list[str]], chunk_chars: int) -> Iterator[list[list[str]]]:
    chunk: list[list[str]] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += sum(len(line) for line in doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class ShardWriter:
    """Appends documents of one split to `<split>-NNNNN.bin`, starting a new shard past `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.file = open(self.out / f"{name}.bin", "wb")
        self.name, self.tokens, self.sent_ends, self.doc_ends = name, 0, [], []

    def add(self, ids: np.ndarray, sent_lens: np.ndarray) -> None:
        if self.file is None:
            self._open()
        self.file.write(ids.astype(self.dtype).tobytes())
        self.sent_ends.extend((self.tokens + np.cumsum(sent_lens)).tolist())
        self.doc_ends.append(len(self.sent_ends))
        self.tokens += len(ids)
        if self.tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        self.file.close()
        self.file = None
        with open(self.out / f"{self.name}.idx", "wb") as f:
            np.savez(f, sent_ends=np.asarray(self.sent_ends, dtype=np.int64),
                     doc_ends=np.asarray(self.doc_ends, dtype=np.int64))
        self.shards.append({"name": self.name, "tokens": self.tokens, "sentences": len(self.sent_ends),
                            "documents": len(self.doc_ends)})

    def finish(self) -> list[dict]:
        if self.file is not None:
            self._close()
        return self.shards


def preprocess(inputs: list[str | Path], out: str | Path, *, vocab: str | Path | None = None,
               vocab_size: int = 8192, doc_per_file: bool = False, valid_fraction: float = 0.01,
               workers: int | None = None, shard_tokens: int = 1 << 27, chunk_chars: int = 1 << 18,
               progress: bool = True) -> dict:
    """Tokenize plain-text files into memory-mappable shards under `out`; returns the meta dict.

    `vocab` is an existing tokenizer directory; without it a byte-level BPE of `vocab_size` is trained
    on the inputs. Every `round(1/valid_fraction)`-th document (starting with the first) goes to the
    validation split; with `doc_per_file` and fewer files than that, every such line instead (as a
    document of its own), so that about `valid_fraction` of the text is held out either way. Tokenizing runs on `workers` processes (default: all cores) over chunks of about
    `chunk_chars` characters, with a bounded number in flight, so corpora larger than memory stream.
    The directory appears only once complete (built beside it, then renamed).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RobertaError(f"{out} already exists and is not empty: choose another output directory")
    paths = expand_inputs(inputs)
    for source in inputs:  # shards inside a corpus directory would be read as its text by the next run
        if Path(source).is_dir() and Path(os.path.realpath(source)) in Path(os.path.realpath(out)).parents:
            raise RobertaError(f"the output {out} is inside the input directory {source}: write it elsewhere")
    check_text_files(paths)
    if not 0 <= valid_fraction < 1:
        raise RobertaError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    workers = workers or os.cpu_count() or 1
    from tqdm import tqdm

    from .tokenizer import RobertaTokenizer

    # built beside `out` and renamed into place; what a killed run left there is removed by the next one
    with replace_dir(out) as tmp:
        if vocab is None:
            tok = RobertaTokenizer.train([str(p) for p in paths], vocab_size=vocab_size)
        else:
            tok = RobertaTokenizer.from_pretrained(vocab)
        tok.save_pretrained(tmp / "tokenizer")
        n_vocab = len(tok)
        dtype = np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "valid")}
        every = round(1 / valid_fraction) if valid_fraction > 0 else 0
        # With a document per file and fewer files than 1 / valid_fraction, whole documents cannot
        # make up valid_fraction (three files and 0.01 would hold out a third): lines are held out then.
        by_lines = bool(doc_per_file and every and len(paths) < every)
        n_docs = n_lines = 0
        bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tmp / "tokenizer"),)) as pool:
            pending: deque = deque()

            def drain_one() -> None:
                nonlocal n_docs, n_lines
                ids, sent_lens, doc_sents = pending.popleft().get()
                starts = np.concatenate([[0], np.cumsum(doc_sents)])
                tok_starts = np.concatenate([[0], np.cumsum(sent_lens)])
                for d in range(len(doc_sents)):
                    a, b = starts[d], starts[d + 1]
                    doc_ids, doc_lens = ids[tok_starts[a]:tok_starts[b]], sent_lens[a:b]
                    n_docs += 1
                    if by_lines:  # every `every`-th line becomes a validation document of its own
                        held = (n_lines + np.arange(b - a)) % every == 0
                        n_lines += b - a
                        for s in np.flatnonzero(held):
                            writers["valid"].add(ids[tok_starts[a + s]:tok_starts[a + s + 1]], doc_lens[s:s + 1])
                        if not held.all():
                            writers["train"].add(doc_ids[~np.repeat(held, doc_lens)], doc_lens[~held])
                        continue
                    split = "valid" if every and (n_docs - 1) % every == 0 else "train"
                    writers[split].add(doc_ids, doc_lens)
                bar.update(len(doc_sents))

            for chunk in _chunks(read_documents(paths, doc_per_file), chunk_chars):
                pending.append(pool.apply_async(_encode_docs, (chunk,)))
                if len(pending) >= 2 * workers:  # bounded: reading never runs far ahead of tokenizing
                    drain_one()
            while pending:
                drain_one()
        bar.close()
        shards = {s: w.finish() for s, w in writers.items()}
        if not shards["train"]:
            raise RobertaError(f"the corpus is empty or has only {n_docs} document(s), all held out: "
                               "pass more text or a smaller valid_fraction")
        meta = {
            "format": FORMAT_VERSION, "vocab_size": n_vocab, "dtype": dtype.name,
            "bos": tok.bos_token_id, "pad": tok.pad_token_id, "eos": tok.eos_token_id,
            "unk": tok.unk_token_id, "mask": tok.mask_token_id,
            "doc_per_file": doc_per_file, "valid_fraction": valid_fraction,
            "valid_unit": "line" if by_lines else "document",
            "sources": [str(p) for p in paths], "shards": shards,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------------------------------
# Packing


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise RobertaError(f"{data_dir} is not a preprocessed corpus (no meta.json): run `roberta preprocess` first")
    meta = read_json(path)
    if meta.get("format") != FORMAT_VERSION:
        raise RobertaError(f"{path} has format {meta.get('format')}, this version reads {FORMAT_VERSION}: "
                           "preprocess the corpus again")
    return meta


def pack_blocks(sent_ends: np.ndarray, doc_ends: np.ndarray, capacity: int, cross_documents: bool) -> np.ndarray:
    """Greedily pack whole sentences into blocks of at most `capacity` tokens; returns [N, 2] token ranges.

    Blocks are contiguous ranges of the token stream, so every token lands in exactly one block. With
    `cross_documents` (FULL-SENTENCES) a block continues into the next document and one extra </s>
    marks the boundary (it counts toward the capacity); without it (DOC-SENTENCES) a block ends with
    its document. A sentence longer than `capacity` is cut into pieces of `capacity` tokens.
    """
    blocks: list[tuple[int, int]] = []
    start = length = 0
    end = 0
    sent = 0
    for doc_end in doc_ends:
        if length and not cross_documents:
            blocks.append((start, end))
            length = 0
        first = True
        while sent < doc_end:
            s = int(sent_ends[sent - 1]) if sent else 0
            e = int(sent_ends[sent])
            sep = 1 if first and length else 0
            if length + sep + (e - s) > capacity and length:
                blocks.append((start, end))
                length = sep = 0
            while e - s > capacity:  # only reached with an empty block
                blocks.append((s, s + capacity))
                s += capacity
            if not length:
                start = s
            length += sep + e - s
            end = e
            first = False
            sent += 1
    if length:
        blocks.append((start, end))
    return np.asarray(blocks, dtype=np.int64).reshape(-1, 2)


class PackedDataset:
    """One split of a preprocessed corpus as blocks of at most `max_len` tokens, `<s>` first.

    mode "full-sentences" packs across documents (</s> between them), "doc-sentences" does not.
    `dataset[i]` is an int64 array; the shards stay memory-mapped, so a rank touches only its blocks.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", max_len: int = 512,
                 mode: str = "full-sentences"):
        if mode not in ("full-sentences", "doc-sentences"):
            raise RobertaError(f"unknown packing mode {mode!r}: use full-sentences or doc-sentences")
        if max_len < 8:
            raise RobertaError(f"max_len {max_len} is too short: use at least 8")
        self.data_dir, self.meta = Path(data_dir), read_meta(data_dir)
        self.bos, self.eos = self.meta["bos"], self.meta["eos"]
        self.tokens, self.doc_token_ends, blocks = [], [], []
        for shard_id, shard in enumerate(self.meta["shards"][split]):
            base = self.data_dir / shard["name"]
            try:
                tokens = np.memmap(f"{base}.bin", dtype=self.meta["dtype"], mode="r")
                with np.load(f"{base}.idx", allow_pickle=False) as idx:
                    sent_ends, doc_ends = idx["sent_ends"], idx["doc_ends"]
            except (OSError, ValueError, KeyError) as exc:
                raise RobertaError(f"shard {base} is unreadable ({exc}): preprocess the corpus again") from None
            if len(tokens) != shard["tokens"] or (len(sent_ends) and sent_ends[-1] != len(tokens)):
                raise RobertaError(f"shard {base}.bin has {len(tokens)} tokens, its index says {shard['tokens']}: "
                                   "preprocess the corpus again")
            self.tokens.append(tokens)
            self.doc_token_ends.append(sent_ends[doc_ends - 1])
            b = pack_blocks(sent_ends, doc_ends, max_len - 1, mode == "full-sentences")  # -1: room for <s>
            blocks.append(np.column_stack([np.full(len(b), shard_id), b]))
        self.blocks = np.concatenate(blocks) if blocks else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> np.ndarray:
        shard, start, end = self.blocks[i]
        tokens = np.asarray(self.tokens[shard][start:end], dtype=np.int64)
        doc_ends = self.doc_token_ends[shard]
        inner = doc_ends[np.searchsorted(doc_ends, start, side="right"):np.searchsorted(doc_ends, end, side="left")]
        tokens = np.insert(tokens, inner - start, self.eos)  # the extra </s> between documents
        return np.concatenate([[self.bos], tokens])


# ----------------------------------------------------------------------------------------------------
# Dynamic masking


@dataclass(frozen=True)
class Masking:
    """What the model must predict: BERT's 15% with 80% <mask>, 10% random, 10% unchanged.

    The random replacement never picks a special token; with `whole_word` every piece of a chosen
    word is masked together (words start at pieces beginning with a space, 'Ġ' in byte-level BPE).
    """
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    pad_id: int = 1
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    word_starts: np.ndarray | None = None  # bool per vocabulary id, only for whole-word masking

    def __post_init__(self):
        is_special = np.zeros(self.vocab_size, dtype=bool)
        is_special[list(self.special_ids)] = True
        object.__setattr__(self, "is_special", is_special)
        object.__setattr__(self, "replacements", np.flatnonzero(~is_special))


def masking_for(data_dir: str | Path, whole_word: bool = False, mask_prob: float = 0.15) -> Masking:
    meta = read_meta(data_dir)
    word_starts = None
    if whole_word:
        vocab = read_json(Path(data_dir) / "tokenizer" / "vocab.json")
        word_starts = np.zeros(meta["vocab_size"], dtype=bool)
        word_starts[[i for t, i in vocab.items() if t.startswith("\u0120") and i < meta["vocab_size"]]] = True
    specials = tuple(meta[k] for k in ("bos", "pad", "eos", "unk", "mask"))
    return Masking(meta["mask"], specials, meta["vocab_size"], meta["pad"], mask_prob=mask_prob,
                   word_starts=word_starts)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same triple always gives the same mask."""
    return np.random.default_rng([seed, epoch, index])


def mask_tokens(tokens: np.ndarray, m: Masking, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (inputs, labels) for one sequence; labels are -100 where nothing is to be predicted.

    Special tokens (<s>, </s>, <pad>, ...) are never chosen. The number of chosen tokens (or words) is
    mask_prob * n rounded up or down at random, as fairseq does, so the rate is exact on average.
    """
    candidates = np.flatnonzero(~m.is_special[tokens])
    if m.word_starts is not None:  # a unit is a word: a candidate starting a word, or following a special
        starts = m.word_starts[tokens[candidates]] | m.is_special[tokens[candidates - 1]] | (candidates == 0)
        starts[:1] = True
        unit_of = np.cumsum(starts) - 1
        n_units = int(starts.sum())
    else:
        unit_of = np.arange(len(candidates))
        n_units = len(candidates)
    n_chosen = int(m.mask_prob * n_units + rng.random())
    chosen_units = np.zeros(n_units, dtype=bool)
    chosen_units[rng.choice(n_units, n_chosen, replace=False)] = True
    action = rng.random(n_units)  # per unit: < 0.8 <mask>, < 0.9 random token, else unchanged
    chosen = candidates[chosen_units[unit_of]]
    unit_action = action[unit_of][chosen_units[unit_of]]

    inputs = tokens.copy()
    labels = np.full_like(tokens, -100)
    labels[chosen] = tokens[chosen]
    inputs[chosen[unit_action < m.mask_token_prob]] = m.mask_id
    random_pos = chosen[(unit_action >= m.mask_token_prob) & (unit_action < m.mask_token_prob + m.random_token_prob)]
    inputs[random_pos] = m.replacements[rng.integers(0, len(m.replacements), len(random_pos))]
    return inputs, labels


def collate(pairs: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (inputs, labels) pairs to the longest into a batch; padding is never a label."""
    width = max(len(x) for x, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        input_ids[row, :len(x)] = torch.from_numpy(x)
        labels[row, :len(y)] = torch.from_numpy(y)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def step_samples(step: int, batch_size: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, sample index) pairs of the global batch of optimizer step `step` (0-based).

    Each epoch visits every block once in its own shuffled order; a batch may straddle two epochs.
    The data position is thus a pure function of the step, so resuming needs nothing else.
    """
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n)
        out.append((epoch, int(_epoch_order(seed, epoch, n)[pos])))
    return out


@functools.lru_cache(maxsize=2)  # a batch straddles at most two epochs
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, n, 0x5EED]).permutation(n)

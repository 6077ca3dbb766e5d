"""Shards, packing and dynamic masking (roberta/data.py)."""
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from roberta.data import (Masking, PackedDataset, ShardWriter, collate, mask_tokens, pack_blocks, sample_rng,
                          step_samples)

ROOT = Path(__file__).resolve().parents[1]

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 999
VOCAB = 1000
SPECIALS = (BOS, PAD, EOS, UNK, MASK)


def synthetic_corpus(tmp_path, n_docs=40, seed=0, long_every=0, valid_docs=0):
    """Write a corpus whose non-special tokens are all distinct, so a lost or repeated token shows.

    The vocabulary is ids 0..max (the last is <mask>); no tokenizer files. Returns (directory, token -> doc)."""
    rng = np.random.default_rng(seed)
    tmp_path.mkdir(exist_ok=True)
    writers = {s: ShardWriter(tmp_path, s, np.dtype(np.uint16), shard_tokens=600) for s in ("train", "valid")}
    next_id, doc_of = 10, {}
    for d in range(n_docs + valid_docs):
        lens = rng.integers(1, 30, size=rng.integers(1, 6))
        if long_every and d % long_every == 0:
            lens[0] = 70  # longer than a block
        ids, sent_lens = [], []
        for n in lens:
            sent = list(range(next_id, next_id + n)) + [EOS]
            next_id += n
            doc_of.update({t: d for t in sent[:-1]})
            ids += sent
            sent_lens.append(len(sent))
        writers["train" if d < n_docs else "valid"].add(np.array(ids), np.array(sent_lens))
    next_id = int(next_id)
    meta = {"format": 1, "vocab_size": next_id + 1, "dtype": "uint16", "bos": BOS, "pad": PAD, "eos": EOS,
            "unk": UNK, "mask": next_id, "shards": {s: w.finish() for s, w in writers.items()}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "tokenizer").mkdir()
    return tmp_path, doc_of


@pytest.mark.parametrize("mode", ["full-sentences", "doc-sentences"])
def test_packing_keeps_every_token_once(tmp_path, mode):
    data_dir, doc_of = synthetic_corpus(tmp_path, long_every=7)
    ds = PackedDataset(data_dir, max_len=32, mode=mode)
    assert len(ds.meta["shards"]["train"]) > 1
    seen = Counter()
    for i in range(len(ds)):
        sample = ds[i]
        assert sample[0] == BOS and BOS not in sample[1:]
        assert 2 <= len(sample) <= 32
        seen.update(t for t in sample.tolist() if t >= 10)
    assert set(seen) == set(doc_of) and set(seen.values()) == {1}


def test_doc_sentences_never_cross_documents(tmp_path):
    data_dir, doc_of = synthetic_corpus(tmp_path)
    ds = PackedDataset(data_dir, max_len=64, mode="doc-sentences")
    for i in range(len(ds)):
        docs = {doc_of[t] for t in ds[i].tolist() if t >= 10}
        assert len(docs) == 1


def test_full_sentences_cross_documents_with_separator(tmp_path):
    data_dir, doc_of = synthetic_corpus(tmp_path)
    full = PackedDataset(data_dir, max_len=64, mode="full-sentences")
    per_doc = PackedDataset(data_dir, max_len=64, mode="doc-sentences")
    assert len(full) < len(per_doc)  # packing across documents fills blocks better
    crossings = 0
    for i in range(len(full)):
        sample = full[i].tolist()
        real = [(pos, t) for pos, t in enumerate(sample) if t >= 10]
        for (p0, t0), (p1, t1) in zip(real, real[1:]):
            if doc_of[t0] != doc_of[t1]:
                crossings += 1
                assert sample[p0 + 1:p1] == [EOS, EOS]  # sentence end, then the document separator
    assert crossings > 10


def test_blocks_end_at_sentence_boundaries():
    # sentences of 5, 4, 6, 3 tokens in two documents; capacity 10
    sent_ends = np.cumsum([5, 4, 6, 3])
    doc_ends = np.array([2, 4])
    assert pack_blocks(sent_ends, doc_ends, 10, True).tolist() == [[0, 9], [9, 18]]
    # crossing costs one separator: 4 + 1 + 5 does not fit in 9
    assert pack_blocks(np.cumsum([4, 5]), np.array([1, 2]), 9, True).tolist() == [[0, 4], [4, 9]]
    assert pack_blocks(np.cumsum([4, 4]), np.array([1, 2]), 9, True).tolist() == [[0, 8]]
    assert pack_blocks(np.cumsum([4, 4]), np.array([1, 2]), 9, False).tolist() == [[0, 4], [4, 8]]
    # a sentence longer than a block is cut into full pieces
    assert pack_blocks(np.cumsum([2, 23]), np.array([2]), 10, True).tolist() == [[0, 2], [2, 12], [12, 22], [22, 25]]


def masking(**kw):
    return Masking(MASK, SPECIALS, VOCAB, **kw)


def random_sequence(rng, n=200):
    seq = rng.integers(4, MASK, size=n)
    seq[0], seq[-1] = BOS, EOS
    seq[rng.integers(1, n - 1, size=5)] = EOS
    return seq


def test_mask_rates_over_many_draws():
    m = masking()
    rng = np.random.default_rng(0)
    n_real = n_chosen = n_mask = n_random = n_same = 0
    for i in range(2000):
        seq = random_sequence(rng)
        inputs, labels = mask_tokens(seq, m, sample_rng(1, 0, i))
        chosen = labels != -100
        assert not np.isin(seq[chosen], SPECIALS).any()  # specials are never masked
        assert (labels[chosen] == seq[chosen]).all() and (inputs[~chosen] == seq[~chosen]).all()
        replaced = chosen & (inputs != MASK) & (inputs != seq)
        assert not np.isin(inputs[replaced], SPECIALS).any()  # nor drawn as a random replacement
        n_real += (~np.isin(seq, SPECIALS)).sum()
        n_chosen += chosen.sum()
        n_mask += (inputs[chosen] == MASK).sum()
        n_random += replaced.sum()
        n_same += (chosen & (inputs == seq)).sum()
    assert abs(n_chosen / n_real - 0.15) < 0.003
    assert abs(n_mask / n_chosen - 0.8) < 0.01
    # a random draw can hit the original token (1 in ~995), which then counts as unchanged
    assert abs(n_random / n_chosen - 0.1) < 0.01 and abs(n_same / n_chosen - 0.1) < 0.01


def test_random_replacements_cover_only_non_special_ids():
    m = Masking(11, (BOS, PAD, EOS, UNK, 11), 12, mask_prob=0.5)
    seen = set()
    seq = np.array([BOS] + [5] * 400 + [EOS])
    for i in range(50):
        inputs, labels = mask_tokens(seq, m, sample_rng(0, 0, i))
        seen.update(inputs[(labels != -100) & (inputs != 11)].tolist())
    assert seen == {4, 5, 6, 7, 8, 9, 10}


def test_masks_are_reproducible_and_fresh_every_epoch():
    m = masking()
    seq = random_sequence(np.random.default_rng(3))
    a = mask_tokens(seq, m, sample_rng(7, 0, 42))
    b = mask_tokens(seq, m, sample_rng(7, 0, 42))
    assert all((x == y).all() for x, y in zip(a, b))
    for other in (sample_rng(7, 1, 42), sample_rng(7, 0, 43), sample_rng(8, 0, 42)):
        assert not (mask_tokens(seq, m, other)[1] == a[1]).all()


def test_padding_is_never_a_label():
    m = masking()
    rng = np.random.default_rng(0)
    pairs = [mask_tokens(random_sequence(rng, n), m, sample_rng(0, 0, n)) for n in (10, 50, 200)]
    batch = collate(pairs, PAD)
    pad = batch["input_ids"] == PAD
    assert pad.sum() == 190 + 150 and (batch["labels"][pad] == -100).all()
    assert (batch["attention_mask"] == (~pad).long()).all()


def test_whole_word_masking_takes_every_piece_of_a_word():
    word_starts = np.zeros(VOCAB, dtype=bool)
    word_starts[4:500] = True  # ids 4..499 start a word, 500..998 continue one
    m = masking(word_starts=word_starts)
    rng = np.random.default_rng(0)
    chosen_words = total_words = 0
    for i in range(300):
        seq = random_sequence(rng)
        inputs, labels = mask_tokens(seq, m, sample_rng(0, 0, i))
        chosen = labels != -100
        # split the real tokens into words and check each is all-or-nothing
        word, words = [], []
        for pos, t in enumerate(seq):
            if t in SPECIALS or word_starts[t]:
                if word:
                    words.append(word)
                word = [] if t in SPECIALS else [pos]
            else:
                word.append(pos)
        words.append(word)
        for w in filter(None, words):
            assert chosen[w].all() or not chosen[w].any()
            chosen_words += chosen[w].all()
            total_words += 1
    assert abs(chosen_words / total_words - 0.15) < 0.01


def test_step_samples_visit_every_block_once_per_epoch():
    n, batch = 10, 4
    seen = [s for step in range(5) for s in step_samples(step, batch, n, seed=0)]
    assert [e for e, _ in seen] == [0] * 10 + [1] * 10
    assert sorted(i for e, i in seen if e == 0) == list(range(10))
    assert [i for e, i in seen if e == 0] != [i for e, i in seen if e == 1]
    assert step_samples(3, batch, n, seed=0) == seen[12:16]


# ----------------------------------------------------------------------------------------------------
# preprocess: real text through the real tokenizer


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_preprocess_with_an_existing_vocabulary(tmp_path, bpe_dir):
    from roberta.data import preprocess, read_meta
    from roberta.tokenizer import RobertaTokenizer

    tok = RobertaTokenizer.from_pretrained(bpe_dir)
    docs = [["Hello world!", "The cat sat on the mat."], ["A second document.", "It has two lines.", "Three."],
            ["Zürich is in Switzerland."]] * 7
    text = "\n\n\n".join("\n".join(doc) for doc in docs) + "\n"
    out = tmp_path / "data"
    meta = preprocess([write_text(tmp_path / "a.txt", text)], out, vocab=bpe_dir, valid_fraction=0.2, workers=2,
                      progress=False)
    assert meta == read_meta(out) and meta["vocab_size"] == 50265 and meta["mask"] == 50264
    assert meta["dtype"] == "uint16" and (out / "tokenizer" / "vocab.json").exists()
    assert (out / "tokenizer" / "dict.txt").exists()
    # every 5th document (0, 5, 10, ...) is held out; the rest are train, in order
    for split, wanted in (("valid", docs[::5]), ("train", [d for i, d in enumerate(docs) if i % 5])):
        ds = PackedDataset(out, split, max_len=512, mode="doc-sentences")
        assert len(ds) == len(wanted)
        for i, doc in enumerate(wanted):
            expected = [0] + [t for line in doc for t in tok.encode(line)[1:]]  # each sentence ends in </s>
            assert ds[i].tolist() == expected


def test_preprocess_one_document_per_file_and_a_trained_vocabulary(tmp_path):
    from roberta.data import preprocess
    from roberta.tokenizer import RobertaTokenizer

    files = [write_text(tmp_path / f"{i}.txt", f"Document number {i} starts here.\n\nAnd goes on after a blank line.\n"
                        * 20) for i in range(6)]
    out = tmp_path / "data"
    meta = preprocess(files, out, vocab_size=300, doc_per_file=True, valid_fraction=0.5, workers=1, progress=False)
    assert meta["vocab_size"] == 300 and len(RobertaTokenizer.from_pretrained(out / "tokenizer")) == 300
    assert [s["documents"] for s in meta["shards"]["train"]] == [3]
    assert [s["documents"] for s in meta["shards"]["valid"]] == [3]
    assert meta["shards"]["train"][0]["sentences"] == 3 * 40


def test_preprocess_refuses_bad_input_and_leaves_nothing(tmp_path):
    from roberta.data import preprocess
    from roberta.errors import RobertaError

    out = tmp_path / "data"
    empty = write_text(tmp_path / "empty.txt", "\n\n  \n")
    with pytest.raises(RobertaError, match="corpus is empty"):
        preprocess([empty], out, vocab_size=300, progress=False)
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(RobertaError, match="model.bin holds NUL bytes, so it is not text"):
        preprocess([write_text(tmp_path / "ok.txt", "Fine text.\n"), binary], out, vocab_size=300, progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait, d\xe9j\xe0 vu.\n".encode("latin-1"))
    with pytest.raises(RobertaError, match="latin1.txt is not UTF-8 text"):
        preprocess([latin1], out, vocab_size=300, progress=False)
    with pytest.raises(RobertaError, match="not a file"):
        preprocess([tmp_path / "missing.txt"], out, vocab_size=300, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RobertaError, match="already exists and is not empty"):
        preprocess([write_text(tmp_path / "ok.txt", "Fine text.\n")], out, vocab_size=300, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_text(corpus / "a.txt", "Fine text.\n")
    with pytest.raises(RobertaError, match="is inside the input directory"):  # its next run would read the shards
        preprocess([corpus], corpus / "data", vocab_size=300, progress=False)
    assert [p.name for p in corpus.iterdir()] == ["a.txt"]
    with pytest.raises(RobertaError, match="is too large"):  # refused before the trainer allocates for it
        preprocess([corpus], tmp_path / "big", vocab_size=2**31, progress=False)
    assert not (tmp_path / "big").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".big")]


def test_preprocess_removes_what_a_killed_run_left(tmp_path):
    """SIGTERM or kill -9 leave the directory being built beside the output; the next run removes it."""
    import signal
    import subprocess
    import sys
    import time

    corpus = write_text(tmp_path / "corpus.txt", "A sentence of text, again and again.\n" * 200_000)
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "roberta", "preprocess", "--out", str(out), "--vocab-size", "300",
                             "--workers", "1", str(corpus)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".data.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM, "the run ended before it could be stopped"
    assert list(tmp_path.glob(".data.tmp-*")) and not out.exists()
    from roberta.data import preprocess

    preprocess([write_text(tmp_path / "small.txt", "Fine text.\n" * 50)], out, vocab_size=300, valid_fraction=0,
               progress=False)
    assert (out / "meta.json").is_file() and not list(tmp_path.glob(".data.tmp-*"))

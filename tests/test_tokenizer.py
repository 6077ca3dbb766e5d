"""RobertaTokenizer against the real RoBERTa files, transformers' tokenizer and fairseq's conventions."""
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import shared_path
from roberta.errors import RobertaError
from roberta.tokenizer import FAIRSEQ_FILES, HF_FILES, RobertaTokenizer

CORPORA = ("wikitext2-valid.txt", "wikitext2-test.txt", "tinyshakespeare.txt")
SPECIAL_STRINGS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
HELLO = [0, 31414, 232, 328, 2]  # 'Hello world!' in fairseq's RoBERTa


def corpus_lines(name: str) -> list[str]:
    text = shared_path("corpus", name).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


def link_files(source, target, names):
    target.mkdir(exist_ok=True)
    for name in names:
        os.symlink(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return RobertaTokenizer.from_pretrained(bpe_dir, layout="hf")


@pytest.fixture(scope="module")
def fairseq_tok(bpe_dir):
    return RobertaTokenizer.from_pretrained(bpe_dir, layout="fairseq")


@pytest.fixture(scope="module")
def hf(bpe_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.RobertaTokenizerFast(vocab=str(bpe_dir / "vocab.json"), merges=str(bpe_dir / "merges.txt"))


@pytest.fixture(scope="module")
def trained():
    return RobertaTokenizer.train(shared_path("corpus", "wikitext2-valid.txt"), vocab_size=1000, show_progress=False)


# ---- the real vocabulary ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["hf", "fairseq"])
def test_hello_world_from_both_layouts(bpe_dir, layout):
    tok = RobertaTokenizer.from_pretrained(bpe_dir, layout=layout)
    assert tok.encode("Hello world!") == HELLO
    assert tok.encode("Hello world!", add_special_tokens=False) == HELLO[1:-1]
    assert tok.tokenize("Hello world!") == ["Hello", "Ġworld", "!"]
    assert tok.convert_tokens_to_ids(["Hello", "Ġworld", "!", "not-a-token"]) == [31414, 232, 328, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 50264)
    assert len(tok) == tok.vocab_size == 50265
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 50264)] == list(SPECIAL_STRINGS)
    assert tok.token_to_id("Ġworld") == 232 and tok.token_to_id("no such token") is None
    assert tok.decode(HELLO) == "<s>Hello world!</s>"
    assert tok.decode(HELLO, skip_special_tokens=True) == "Hello world!"


def test_layout_detection(bpe_dir, tmp_path):
    assert RobertaTokenizer.from_pretrained(bpe_dir).encode("Hello world!") == HELLO
    fairseq_only = link_files(bpe_dir, tmp_path / "fairseq", FAIRSEQ_FILES)
    assert RobertaTokenizer.from_pretrained(fairseq_only).encode("Hello world!") == HELLO
    hf_only = link_files(bpe_dir, tmp_path / "hf", HF_FILES)
    assert RobertaTokenizer.from_pretrained(hf_only).encode("Hello world!") == HELLO


def test_pair_format(tok):
    a, b = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
    assert tok.encode("a", "b") == [0, *a, 2, 2, *b, 2] == [0, 102, 2, 2, 428, 2]
    assert tok.encode("a", "b", add_special_tokens=False) == a + b
    assert tok.encode_batch(["a", "Hello world!"], ["b", ""]) == [tok.encode("a", "b"), tok.encode("Hello world!", "")]


@pytest.mark.parametrize("name", CORPORA)
def test_ids_equal_transformers_on_every_corpus_line(tok, fairseq_tok, hf, name):
    # transformers always parses special strings in text; ours keeps them as text by default.
    lines = [line.replace("<unk>", "unk") for line in corpus_lines(name)]
    ours = tok.encode_batch(lines)
    assert ours == hf(lines)["input_ids"]
    assert fairseq_tok.encode_batch(lines) == ours
    assert [tok.decode(ids, skip_special_tokens=True) for ids in ours] == lines


def test_parse_special_tokens_equals_transformers_with_literal_unk(tok, hf):
    lines = [line for line in corpus_lines("wikitext2-valid.txt") if "<unk>" in line]
    assert len(lines) > 100
    ours = tok.encode_batch(lines, parse_special_tokens=True)
    assert ours == hf(lines)["input_ids"]
    assert sum(ids.count(tok.unk_token_id) for ids in ours) >= len(lines)


def test_special_strings_are_text_by_default(tok):
    text = "<s>Paris is the <mask> of France.</s><pad><unk>"
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[-1] == 2 and not set(ids[1:-1]) & {0, 1, 2, 3, 50264}
    assert ids[1:4] == tok.convert_tokens_to_ids(["<", "s", ">"])
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.tokenize("<mask>") == ["<", "mask", ">"]


def test_parse_special_tokens(tok):
    # <mask> swallows the space before it, as fairseq's fill_mask (which rstrips the text before it).
    ids = tok.encode("Paris is the <mask> of France.", parse_special_tokens=True)
    piece = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert ids == [0, *piece("Paris is the"), 50264, *piece(" of France."), 2]
    assert tok.encode("<s>x</s><pad><unk>", parse_special_tokens=True) == [0, 0, *piece("x"), 2, 1, 3, 2]
    assert tok.tokenize("a <mask>", parse_special_tokens=True) == ["a", "<mask>"]
    assert tok.encode_batch(["a <mask>"], parse_special_tokens=True) == [[0, 102, 50264, 2]]


def test_decode_special_tokens(tok, hf):
    ids = [0, *tok.encode("A", add_special_tokens=False), 3, 2, 2, *tok.encode(" B", add_special_tokens=False),
           50264, 2, 1, 1]
    assert tok.decode(ids) == hf.decode(ids) == "<s>A<unk></s></s> B<mask></s><pad><pad>"
    # Framing tokens go, <unk> and <mask> stay: they stand for content.
    assert tok.decode(ids, skip_special_tokens=True) == "A<unk> B<mask>"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    with pytest.raises(RobertaError, match="50265"):
        tok.decode([0, 50265])
    with pytest.raises(RobertaError, match="-1"):
        tok.decode([-1])


def test_decode_invalid_utf8_gives_replacement_character(tok):
    ids = tok.encode("“hi”", add_special_tokens=False)  # “ is E2 80 9C: split over two byte-level tokens
    assert tok.id_to_token(ids[0]) == "âĢ"
    assert tok.decode(ids) == "“hi”"
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[1:]) == "\ufffdhi”"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60) | st.text(st.characters(codec="utf-8", min_codepoint=0x80), max_size=20))
def test_decode_encode_round_trip(tok, hf, text):
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    if not any(special in text for special in SPECIAL_STRINGS):
        assert ids == hf(text)["input_ids"]


def test_truncation_equals_transformers(tok, hf):
    lines = [line.replace("<unk>", "unk") for line in corpus_lines("wikitext2-valid.txt")[:200]]
    firsts, seconds = lines[::2], lines[1::2]
    for max_length in (4, 9, 32, 100):
        expected = hf(firsts, truncation=True, max_length=max_length)["input_ids"]
        assert tok.encode_batch(firsts, max_length=max_length) == expected
        expected = hf(firsts, seconds, truncation=True, max_length=max_length)["input_ids"]
        assert tok.encode_batch(firsts, seconds, max_length=max_length) == expected
        assert tok.encode(firsts[3], seconds[3], max_length=max_length) == expected[3]
    assert tok.encode("a b c d", "e f g h", max_length=7) == hf("a b c d", "e f g h", truncation=True, max_length=7)["input_ids"]
    assert tok.encode("a b c d", max_length=4, add_special_tokens=False) == tok.encode("a b c d", add_special_tokens=False)
    assert tok.encode("a b c d e f", max_length=3, add_special_tokens=False) == tok.encode("a b c", add_special_tokens=False)
    with pytest.raises(RobertaError, match="max_length=3"):
        tok.encode("a", "b", max_length=3)


def test_batch_input_checks(tok):
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")
    with pytest.raises(TypeError):
        tok.encode(["a list"])
    with pytest.raises(RobertaError, match="2 texts but 1 pairs"):
        tok.encode_batch(["a", "b"], ["c"])
    # what `tokenizers` refuses with one message for every case ("TextEncodeInput must be Union[...]")
    # is said per input: which one, what is wrong with it
    lone = "caf\udce9 au lait"  # the OS decodes an undecodable byte as a lone surrogate (surrogateescape)
    cases = [
        (lambda: tok.encode(lone), RobertaError, r"^the text is not valid Unicode: a lone surrogate \(U\+DCE9\) at character 3;"),
        (lambda: tok.encode("a", lone), RobertaError, r"^the second text is not valid Unicode: .* at character 3;"),
        (lambda: tok.encode(lone, max_length=5), RobertaError, r"^the text is not valid Unicode"),
        (lambda: tok.encode_batch(["fine", lone]), RobertaError, r"^the text of input 1 is not valid Unicode"),
        (lambda: tok.encode_batch(["a", "b"], ["c", lone], return_offsets=True), RobertaError,
         r"^the second text of input 1 is not valid Unicode"),
        (lambda: tok.encode_batch(["fine", None]), TypeError, r"^the text of input 1 is NoneType, not str$"),
        (lambda: tok.encode_batch(["fine", b"bytes"]), TypeError, r"^the text of input 1 is bytes, not str$"),
        (lambda: tok.encode(None), TypeError, r"^encode expects a str text, got NoneType$"),
        (lambda: tok.encode("a", 5), TypeError, r"^encode expects a str pair or None, got int$"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


# ---- saving -----------------------------------------------------------------------------------

def test_save_real_tokenizer_reproduces_the_files(fairseq_tok, bpe_dir, tmp_path):
    fairseq_tok.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(HF_FILES + FAIRSEQ_FILES)  # no temporary files left
    for name in ("merges.txt", "vocab.bpe", "dict.txt"):
        assert (tmp_path / name).read_bytes() == (bpe_dir / name).read_bytes(), name
    for name in ("vocab.json", "encoder.json"):
        assert json.loads((tmp_path / name).read_text("utf-8")) == json.loads((bpe_dir / name).read_text("utf-8"))


def test_save_from_hf_layout_reloads_with_identical_ids(tok, bpe_dir, tmp_path):
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == json.loads((bpe_dir / "vocab.json").read_text("utf-8"))
    assert (tmp_path / "merges.txt").read_bytes() == (bpe_dir / "merges.txt").read_bytes()
    lines = corpus_lines("wikitext2-test.txt")
    expected = tok.encode_batch(lines)
    for layout in ("hf", "fairseq"):
        assert RobertaTokenizer.from_pretrained(tmp_path, layout=layout).encode_batch(lines) == expected, layout


# ---- training ---------------------------------------------------------------------------------

def test_trained_tokenizer_has_roberta_conventions(trained, tmp_path):
    assert len(trained) == 1000
    assert [trained.token_to_id(t) for t in SPECIAL_STRINGS] == [0, 1, 2, 3, 999]
    assert trained.mask_token_id == 999
    lines = corpus_lines("wikitext2-valid.txt")
    ids = trained.encode_batch(lines)
    assert all(row[0] == 0 and row[-1] == 2 and max(row) < 999 for row in ids)
    assert sum(map(len, ids)) < 0.5 * sum(len(line.encode()) for line in lines)  # it learned to merge
    assert [trained.decode(row, skip_special_tokens=True) for row in ids] == lines
    assert trained.encode("snow ☃", parse_special_tokens=True)[-1] == 2  # unseen bytes still encode
    assert trained.decode(trained.encode("snow ☃"), skip_special_tokens=True) == "snow ☃"
    trained.save_pretrained(tmp_path)
    for layout in ("hf", "fairseq"):
        assert RobertaTokenizer.from_pretrained(tmp_path, layout=layout).encode_batch(lines) == ids, layout


def test_train_from_iterator_equals_train_from_files(trained):
    with open(shared_path("corpus", "wikitext2-valid.txt"), encoding="utf-8") as f:
        again = RobertaTokenizer.train_from_iterator(f, vocab_size=1000, show_progress=False)
    assert again.get_vocab() == trained.get_vocab()
    assert again.encode_batch(corpus_lines("wikitext2-test.txt")[:300]) == trained.encode_batch(corpus_lines("wikitext2-test.txt")[:300])


def test_train_bad_input(tmp_path):
    with pytest.raises(RobertaError, match="nope.txt"):
        RobertaTokenizer.train(tmp_path / "nope.txt", vocab_size=1000)
    with pytest.raises(RobertaError, match="too small"):
        RobertaTokenizer.train_from_iterator(["abc"], vocab_size=100)


# ---- bad files --------------------------------------------------------------------------------

def one_line_error(call, match):
    with pytest.raises(RobertaError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_files(bpe_dir, tmp_path):
    one_line_error(lambda: RobertaTokenizer.from_pretrained(tmp_path / "absent"), "does not exist")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(tmp_path), "holds no tokenizer")
    partial = link_files(bpe_dir, tmp_path / "partial", ["encoder.json", "vocab.bpe"])
    one_line_error(lambda: RobertaTokenizer.from_pretrained(partial, layout="fairseq"), "lacks dict.txt")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(bpe_dir, layout="sentencepiece"), "unknown tokenizer layout")


def fairseq_with_dict(bpe_dir, tmp_path, rows):
    folder = link_files(bpe_dir, tmp_path / "fs", ["encoder.json", "vocab.bpe"])
    (folder / "dict.txt").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return folder


def test_malformed_dict_names_file_and_line(bpe_dir, tmp_path):
    rows = (bpe_dir / "dict.txt").read_text("utf-8").split("\n")[:-1]
    bad = fairseq_with_dict(bpe_dir, tmp_path, rows[:2] + ["13"] + rows[3:])
    message = one_line_error(lambda: RobertaTokenizer.from_pretrained(bad), "line 3")
    assert "dict.txt" in message
    (bad / "dict.txt").write_text("13 5\n99999 1\n", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(bad), "line 2: GPT-2 id 99999 is not in encoder.json")
    (bad / "dict.txt").write_text("13 5\n13 1\n", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(bad), "line 2: '13' appears twice")
    (bad / "dict.txt").write_text("13 5\n<s> 1\n", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(bad), "line 2")


def test_gpt2_tokens_missing_from_dict_become_unk(bpe_dir, tmp_path):
    rows = (bpe_dir / "dict.txt").read_text("utf-8").split("\n")[:-1]
    del rows[232 - 4]  # the row of 'Ġworld' (id 232); later rows move up by one
    folder = fairseq_with_dict(bpe_dir, tmp_path, rows)
    tok = RobertaTokenizer.from_pretrained(folder)
    assert len(tok) == 50264
    assert tok.encode("Hello world!") == [0, 31413, 3, 327, 2]
    assert tok.encode_batch([" world", "Hello world!"], max_length=4) == [[0, 3, 2], [0, 31413, 3, 2]]
    one_line_error(lambda: tok.save_pretrained(tmp_path / "out"), "layout='fairseq'")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    tok.save_pretrained(tmp_path / "out", layout="fairseq")
    assert RobertaTokenizer.from_pretrained(tmp_path / "out").encode("Hello world!") == [0, 31413, 3, 327, 2]


def test_corrupt_hf_files(bpe_dir, tmp_path):
    folder = link_files(bpe_dir, tmp_path / "hf", ["merges.txt"])
    (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "vocab.json is not valid JSON")
    (folder / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "JSON object")
    vocab = json.loads((bpe_dir / "vocab.json").read_text("utf-8"))
    vocab["<s>"], vocab["."] = vocab["."], vocab["<s>"]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "'<s>' has id 4")
    (folder / "vocab.json").write_bytes(b"\xff\xfe")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "not UTF-8")

    folder = link_files(bpe_dir, tmp_path / "hf2", ["vocab.json"])
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nĠ a b\n", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "merges.txt line 3")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nzzz q\n", encoding="utf-8")
    one_line_error(lambda: RobertaTokenizer.from_pretrained(folder), "line 3: token 'zzz' is not in the vocabulary")


# ---- character offsets --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_loaded(bpe_dir):
    """transformers' fast tokenizer loaded the way users load it, checked on a known sequence first."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(bpe_dir))
    assert hf("Hello world!")["input_ids"] == HELLO
    return hf


def expected_spans(tok, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Independent oracle: each token's bytes (its vocabulary entry, byte-level decoded) laid end to end
    over text.encode(), leading spaces left out, then the smallest run of characters holding them."""
    unbyte = {c: b for b, c in enumerate(_byte_alphabet())}
    char_of_byte, position = [], 0
    for i, char in enumerate(text):
        char_of_byte += [i] * len(char.encode("utf-8"))
    char_of_byte.append(len(text))  # the end
    spans = []
    for token in ids:
        raw = bytes(unbyte[c] for c in tok.id_to_token(token))
        start, end = position, position + len(raw)
        position = end
        start += len(raw) - len(raw.lstrip(b" "))
        if start >= end:  # only spaces: an empty span at the end
            spans.append((char_of_byte[end], char_of_byte[end]))
        else:
            spans.append((char_of_byte[start], char_of_byte[end - 1] + 1))
    assert position == len(text.encode("utf-8"))  # the tokens cover every byte once
    return spans


def _byte_alphabet() -> list[str]:
    # GPT-2's byte -> printable character table, in byte order (as in its encoder.py)
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40)
       | st.lists(st.sampled_from([" ", "  ", "\n", "é", "e\u0301", "😀", "👍🏽", "中文", "ß", "a", "Ab", "'s", "\t",
                                  "\u00a0", "\u2028", "\x00"]), max_size=15).map("".join))
def test_offsets_slice_each_tokens_text_on_arbitrary_unicode(tok, text):
    ids, offsets = tok.encode(text, add_special_tokens=False, return_offsets=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert offsets == expected_spans(tok, text, ids)
    unbyte = {c: b for b, c in enumerate(_byte_alphabet())}
    for token, (start, end) in zip(ids, offsets):
        raw = bytes(unbyte[c] for c in tok.id_to_token(token))
        if raw.decode("utf-8", errors="replace").encode("utf-8") == raw:  # a token of whole characters
            assert text[start:end] == raw.decode("utf-8").lstrip(" ")
    framed, framed_offsets = tok.encode(text, return_offsets=True)
    assert framed == [0, *ids, 2] and framed_offsets == [(0, 0), *offsets, (0, 0)]


def test_offsets_examples(tok):
    text = " Hello  wörld 😀!\n"
    ids, offsets = tok.encode(text, add_special_tokens=False, return_offsets=True)
    assert [text[s:e] for s, e in offsets] == ["Hello", "", "w", "ör", "ld", "😀", "😀", "!", "\n"]
    ids, offsets, words = tok.encode("a b", "c d", return_offsets=True, return_word_ids=True)
    assert offsets == [(0, 0), (0, 1), (2, 3), (0, 0), (0, 0), (0, 1), (2, 3), (0, 0)]
    assert words == [None, 0, 1, None, None, 0, 1, None]
    with pytest.raises(RobertaError, match="return_offsets=True"):
        tok.encode("a", return_word_ids=True)


def test_offsets_under_max_length_follow_the_cut(tok, hf_loaded):
    text, pair = "one two three four five six", "seven eight nine"
    for max_length in (6, 9, 30):
        ours = tok.encode(text, pair, max_length=max_length, return_offsets=True)
        ref = hf_loaded(text, pair, max_length=max_length, truncation="longest_first", return_offsets_mapping=True)
        assert ours == (ref["input_ids"], [tuple(o) for o in ref["offset_mapping"]])
    assert tok.encode_batch([text, "x"], max_length=4, return_offsets=True) == \
        [tok.encode(t, max_length=4, return_offsets=True) for t in (text, "x")]


@pytest.mark.parametrize("name", CORPORA)
def test_offsets_equal_transformers_on_the_corpus(tok, hf_loaded, name):
    lines = [line.replace("<unk>", "unk") for line in corpus_lines(name)][:3000]
    ours = tok.encode_batch(lines, return_offsets=True, return_word_ids=True)
    ref = hf_loaded(lines, return_offsets_mapping=True)
    assert [ids for ids, _, _ in ours] == ref["input_ids"]
    assert [offsets for _, offsets, _ in ours] == [[tuple(o) for o in row] for row in ref["offset_mapping"]]
    assert [words for _, _, words in ours] == [ref.word_ids(i) for i in range(len(lines))]
    pairs = list(zip(lines[::2], lines[1::2]))[:500]
    ours = tok.encode_batch([a for a, _ in pairs], [b for _, b in pairs], return_offsets=True)
    ref = hf_loaded([a for a, _ in pairs], [b for _, b in pairs], return_offsets_mapping=True)
    assert [offsets for _, offsets in ours] == [[tuple(o) for o in row] for row in ref["offset_mapping"]]


def test_hub_encode_offsets_per_sentence(tok):
    from roberta.hub import encode

    tokens, offsets = encode(tok, "Hi there", "you  two", return_offsets=True)
    assert tokens.tolist() == encode(tok, "Hi there", "you  two").tolist() == tok.encode("Hi there", "you  two")
    assert offsets == [(0, 0), (0, 2), (3, 8), (0, 0), (0, 0), (0, 3), (4, 4), (5, 8), (0, 0)]
    tokens, offsets = encode(tok, "a", "b", "c", no_separator=True, return_offsets=True)
    assert tokens.tolist() == [0, 102, 2, 428, 2, 438, 2]
    assert offsets == [(0, 0), (0, 1), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)]

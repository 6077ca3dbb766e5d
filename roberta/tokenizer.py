"""RoBERTa's tokenizer: GPT-2 byte-level BPE with fairseq's id mapping.

fairseq encodes text in two steps: GPT-2's BPE turns it into GPT-2 token ids, then `dict.txt`
renumbers those ids by corpus frequency after the four specials `<s> <pad> </s> <unk>` (ids 0-3),
and the masked-LM task appends `<mask>` as the last id. Hugging Face stores the composed result as
`vocab.json`. Both layouts load into ONE `tokenizers` BPE whose vocabulary already maps byte-level
tokens to the final RoBERTa ids, so encoding is a single call into Rust with no per-token Python.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .errors import RobertaError, RobertaWarning
from .fileio import atomic_write, read_json

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, the order of fairseq's Dictionary
MASK = "<mask>"  # always the last id
HF_FILES = ("vocab.json", "merges.txt")
FAIRSEQ_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
TOKENIZER_JSON = ("tokenizer.json",)  # the `tokenizers` library's one-file form, as many Hub repositories ship it
MERGES_HEADER = "#version: 0.2"
DEFAULT_VOCAB_SIZE = 50265  # RoBERTa's: 50257 GPT-2 tokens + 3 padding words + 5 specials
CHUNK_CHARS = 1 << 16  # characters of a long text tokenized at a time by `ids_in_chunks`
# A pre-tokenizer word ending this close to a chunk's end may go on past it ('they'r|e' is "they" "'"
# "r" in the chunk but "they" "'re" in the text: the contractions are at most three characters), so the
# chunk ends before it and the next chunk starts with it.
CHUNK_MARGIN = 8


MAX_VOCAB_SIZE = 1 << 24  # far past any BPE in use; an embedding row per token


class RobertaTokenizer:
    """GPT-2 byte-level BPE with RoBERTa's ids: `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3, `<mask>` last.

    Encoding follows fairseq: no space is added before the text ('Hello world!' gives
    [0, 31414, 232, 328, 2]), one sequence is `<s> A </s>` and a pair `<s> A </s></s> B </s>`.

    Special-token strings inside text are plain text by default: '<mask>' typed by a user is encoded
    as the characters '<', 'mask', '>' (fairseq's behaviour, and no way to inject control tokens).
    `parse_special_tokens=True` recognises `<s> <pad> </s> <unk> <mask>` in the text as their ids
    (Hugging Face's behaviour); `<mask>` then swallows the space before it, as fairseq's fill_mask
    and Hugging Face's roberta-base do, so 'the <mask> of' encodes like 'the' + `<mask>` + ' of'.

    `decode` renders every id, specials included, as its text. `skip_special_tokens=True` drops the
    framing tokens `<s>`, `</s>` and `<pad>` but keeps `<unk>` and `<mask>`, which stand for
    content. For one sentence that is fairseq's hub `decode` (it drops a leading `<s>` and the
    `</s>`s and prints `<unk>`/`<mask>` as text); Hugging Face drops `<unk>`/`<mask>` as well.
    fairseq also splits a pair at `</s></s>` into a list; decode each part for that. Bytes that are
    not valid UTF-8 come out as U+FFFD.

    A GPT-2 token that fairseq's dict.txt lacks encodes as `<unk>`, as in fairseq.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 encoder: dict[str, int] | None = None, counts: list[int] | None = None):
        """`vocab`: token -> RoBERTa id; `merges`: BPE merges by rank. `encoder` (token -> GPT-2 id)
        and `counts` (dict.txt's count column) are kept when loaded from fairseq files so that
        `save_pretrained` writes those files back unchanged."""
        vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))  # id order: saving and lookups rely on it
        _check_vocab(vocab)
        self._vocab = vocab
        self._merges = merges
        self._encoder = encoder
        self._counts = counts
        # GPT-2 tokens missing from dict.txt still need ids for the BPE merges to reach them: they
        # get ids past the end, which encoding then maps to <unk>.
        missing = [token for token in (encoder or ()) if token not in vocab]
        internal = {**vocab, **{token: len(vocab) + i for i, token in enumerate(missing)}}
        self._has_missing = bool(missing)
        lacking = [char for char in pre_tokenizers.ByteLevel.alphabet() if char not in internal]
        if lacking:
            raise RobertaError(f"the vocabulary lacks {len(lacking)} of the 256 byte-level tokens "
                               f"(e.g. {lacking[0]!r}); it is not a byte-level BPE vocabulary")

        self.bos_token_id, self.pad_token_id, self.eos_token_id, self.unk_token_id = range(4)
        self.mask_token_id = len(vocab) - 1
        bpe = models.BPE(internal, merges)  # no unk_token: every byte is in the vocabulary
        self._plain = self._pipeline(bpe)
        # The same model (shared, not copied) with the special strings recognised in text.
        self._parsing = self._pipeline(bpe)
        self._parsing.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[:3]])
        self._parsing.add_tokens([AddedToken("<unk>", special=False, normalized=False),
                                  AddedToken(MASK, lstrip=True, special=False, normalized=False)])

    def _pipeline(self, bpe: models.BPE) -> Tokenizer:
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # `<s> A </s>` and `<s> A </s></s> B </s>`, with transformers' offsets: a token's span
        # leaves out the space before it (trim_offsets), since that space is not part of the word.
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", self.eos_token_id), ("<s>", self.bos_token_id), trim_offsets=True, add_prefix_space=False)
        return tokenizer

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, layout: str | None = None) -> "RobertaTokenizer":
        """Load from a folder with `vocab.json` + `merges.txt` (layout 'hf'), `encoder.json` +
        `vocab.bpe` + `dict.txt` (layout 'fairseq') or a BPE `tokenizer.json` (layout 'json'); by
        default whichever is complete, in that order."""
        directory = Path(directory)
        expected = "vocab.json + merges.txt (Hugging Face) or encoder.json + vocab.bpe + dict.txt (fairseq)"
        if not directory.is_dir():
            raise RobertaError(f"tokenizer folder {directory} does not exist; pass a folder with {expected}")
        files = {"hf": HF_FILES, "fairseq": FAIRSEQ_FILES, "json": TOKENIZER_JSON}
        if layout is None:
            complete = [name for name, names in files.items() if all((directory / n).is_file() for n in names)]
            if not complete:
                raise RobertaError(f"{directory} holds no tokenizer: expected {expected}")
            layout = complete[0]
        if layout not in files:
            raise RobertaError(f"unknown tokenizer layout {layout!r}: use 'hf', 'fairseq' or 'json'")
        missing = [n for n in files[layout] if not (directory / n).is_file()]
        if missing:
            raise RobertaError(f"{directory} lacks {', '.join(missing)} for the {layout} layout; expected {expected}")
        if layout == "hf":
            vocab = _read_token_ids(directory / "vocab.json")
            _check_same_vocabulary(directory, vocab)
            return cls._checked(directory / "vocab.json", vocab, _read_merges(directory / "merges.txt", vocab))
        if layout == "json":
            return cls._checked(directory / "tokenizer.json", *_read_tokenizer_json(directory / "tokenizer.json"))
        encoder = _read_token_ids(directory / "encoder.json")
        merges = _read_merges(directory / "vocab.bpe", encoder)
        vocab, counts = _read_dict(directory / "dict.txt", encoder)
        return cls._checked(directory / "dict.txt", vocab, merges, encoder, counts)

    @classmethod
    def _checked(cls, path: Path, *args) -> "RobertaTokenizer":
        try:
            return cls(*args)
        except RobertaError as exc:
            raise RobertaError(f"{path}: {exc}") from None

    # ---- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, files: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int = DEFAULT_VOCAB_SIZE,
              min_frequency: int = 2, show_progress: bool = True) -> "RobertaTokenizer":
        """Train a new byte-level BPE on text files, with RoBERTa's special tokens and ids."""
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise RobertaError(f"training files not found: {', '.join(missing) or 'none given'}")
        return cls._train(lambda tokenizer, trainer: tokenizer.train([str(p) for p in paths], trainer),
                          vocab_size, min_frequency, show_progress)

    @classmethod
    def train_from_iterator(cls, iterator: Iterable[str] | Iterator[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                            min_frequency: int = 2, show_progress: bool = True,
                            length: int | None = None) -> "RobertaTokenizer":
        """Train a new byte-level BPE on texts from an iterator (`length` sizes the progress bar)."""
        return cls._train(lambda tokenizer, trainer: tokenizer.train_from_iterator(iterator, trainer, length=length),
                          vocab_size, min_frequency, show_progress)

    @classmethod
    def _train(cls, run, vocab_size: int, min_frequency: int, show_progress: bool) -> "RobertaTokenizer":
        smallest = 256 + len(SPECIALS) + 1
        if vocab_size < smallest:
            raise RobertaError(f"vocab_size={vocab_size} is too small: it needs at least {smallest} "
                               "(256 bytes and 5 special tokens)")
        if vocab_size > MAX_VOCAB_SIZE:  # the trainer allocates for it up front: 2^31 aborted the process
            raise RobertaError(f"vocab_size={vocab_size:,} is too large: at most {MAX_VOCAB_SIZE:,} (RoBERTa's "
                               "BPE has 50,265 tokens)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # The trainer puts its special tokens first, in order, so <s> <pad> </s> <unk> get 0..3;
        # <mask> is appended after training so that it is the last id, as in fairseq.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                      show_progress=show_progress, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        run(tokenizer, trainer)
        model = json.loads(tokenizer.to_str())["model"]
        vocab = model["vocab"]
        vocab[MASK] = len(vocab)
        if len(vocab) < vocab_size:
            warnings.warn(f"the trained vocabulary has {len(vocab):,} tokens, fewer than the {vocab_size:,} asked: the "
                          f"text holds no more pairs seen at least {min_frequency} times; give more text or a "
                          "smaller vocabulary size", RobertaWarning, stacklevel=3)
        return cls(vocab, [tuple(merge) for merge in model["merges"]])

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True,
               max_length: int | None = None, parse_special_tokens: bool = False,
               return_offsets: bool = False, return_word_ids: bool = False):
        """Token ids of `text` (and `pair`), framed as `<s> A </s>` / `<s> A </s></s> B </s>`.

        `max_length` caps the total length, specials included, by cutting the end of the text (of
        the longer text first for a pair); the special tokens are always kept.

        `return_offsets=True` gives `(ids, offsets)`: each token's `(start, end)` character span in
        the text it came from (a pair's second text for its tokens), so that `text[start:end]` is
        the token's text. As in transformers' fast tokenizers (`trim_offsets`), a token's span
        leaves out the spaces before it (' world' spans 'world'), a token made only of spaces has
        an empty span at its end, special tokens are `(0, 0)`, and the byte-level pieces of one
        character (an emoji split in two tokens) each span that whole character. Spans are in
        Python `str` indices (code points), so combining marks count as characters of their own.
        `return_word_ids=True` also gives `word_ids`: the index of the pre-tokenizer word (' world',
        '!') each token belongs to, None for special tokens: `(ids, offsets, word_ids)`.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str text, got {type(text).__name__}")
        if not isinstance(pair, (str, type(None))):
            raise TypeError(f"encode expects a str pair or None, got {type(pair).__name__}")
        rows = self._encode_rows([text], None if pair is None else [pair], add_special_tokens, max_length,
                                 parse_special_tokens, return_offsets or return_word_ids)
        return self._returned(rows[0], return_offsets, return_word_ids)

    def encode_batch(self, texts: list[str], pairs: list[str] | None = None, add_special_tokens: bool = True,
                     max_length: int | None = None, parse_special_tokens: bool = False,
                     return_offsets: bool = False, return_word_ids: bool = False) -> list:
        """`encode` for many texts at once, in parallel inside `tokenizers` (one result per text)."""
        if isinstance(texts, str) or isinstance(pairs, str):
            raise TypeError("encode_batch expects a list of texts, not one str; use encode for a single text")
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise RobertaError(f"encode_batch got {len(texts)} texts but {len(pairs)} pairs; they must match")
        rows = self._encode_rows(texts, pairs, add_special_tokens, max_length, parse_special_tokens,
                                 return_offsets or return_word_ids)
        return [self._returned(row, return_offsets, return_word_ids) for row in rows]

    @staticmethod
    def _returned(row, return_offsets: bool, return_word_ids: bool):
        ids, offsets, words = row
        if not (return_offsets or return_word_ids):
            return ids
        if return_word_ids and not return_offsets:
            raise RobertaError("return_word_ids=True needs return_offsets=True: the result is (ids, offsets, word_ids)")
        return (ids, offsets, words) if return_word_ids else (ids, offsets)

    def _encode_rows(self, texts, pairs, add_special_tokens, max_length, parse_special_tokens, details: bool):
        """(ids, offsets, word_ids) per input (offsets and word_ids None unless `details`)."""
        try:
            return self._encode_unchecked(texts, pairs, add_special_tokens, max_length, parse_special_tokens, details)
        except (TypeError, UnicodeEncodeError):  # `tokenizers` takes UTF-8: say which input it could not, and why
            for n, text in enumerate(texts + (pairs or [])):
                row, side = n % len(texts), "" if pairs is None else "first " if n < len(texts) else "second "
                which = f"the {side}text" + (f" of input {row}" if len(texts) > 1 else "")
                if not isinstance(text, str):
                    raise TypeError(f"{which} is {type(text).__name__}, not str") from None
                bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
                if bad is not None:
                    raise RobertaError(f"{which} is not valid Unicode: a lone surrogate (U+{ord(text[bad]):04X}) at "
                                       f"character {bad}; decode its bytes as UTF-8 (errors='replace' keeps the "
                                       "rest), or drop the character") from None
            raise

    def _encode_unchecked(self, texts, pairs, add_special_tokens, max_length, parse_special_tokens, details: bool):
        room = self._room(max_length, pairs is not None, add_special_tokens)
        tokenizer = self._parsing if parse_special_tokens else self._plain
        if room is None:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encodings = (tokenizer.encode_batch if details else tokenizer.encode_batch_fast)(
                inputs, add_special_tokens=add_special_tokens)
            return [(ids, e.offsets if details else None, e.word_ids if details else None)
                    for ids, e in zip(self._ids(encodings), encodings)]
        # Under a length cap each text is encoded alone and cut here, tokens with their spans.
        encode = tokenizer.encode_batch if details else tokenizer.encode_batch_fast
        parts = [encode(group, add_special_tokens=False) for group in (texts, pairs) if group is not None]
        rows = []
        for encodings in zip(*parts):
            pieces = [list(zip(ids, e.offsets, e.word_ids)) if details else ids
                      for ids, e in zip(self._ids(encodings), encodings)]
            special = (self.bos_token_id, (0, 0), None) if details else self.bos_token_id
            framed = self._frame(pieces[0], pieces[1] if len(pieces) > 1 else None, room, add_special_tokens,
                                 special, (self.eos_token_id, (0, 0), None) if details else self.eos_token_id)
            if details:
                ids, offsets, words = (list(column) for column in zip(*framed)) if framed else ([], [], [])
                rows.append((ids, offsets, words))
            else:
                rows.append((framed, None, None))
        return rows

    def _ids(self, encodings) -> list[list[int]]:
        ids = [encoding.ids for encoding in encodings]
        if self._has_missing:  # only for a dict.txt that lacks GPT-2 tokens
            end, unk = len(self._vocab), self.unk_token_id
            ids = [[i if i < end else unk for i in row] for row in ids]
        return ids

    def _room(self, max_length: int | None, is_pair: bool, add_special_tokens: bool) -> int | None:
        """Tokens left for text under `max_length` once the specials are counted (None: no limit)."""
        if max_length is None:
            return None
        specials = (4 if is_pair else 2) if add_special_tokens else 0
        if max_length < specials:
            raise RobertaError(f"max_length={max_length} is too short: the special tokens alone take {specials}")
        return max_length - specials

    @staticmethod
    def _frame(first: list, second: list | None, room: int, add_special_tokens: bool, bos, eos) -> list:
        """Cut to `room` and frame with `bos`/`eos`; the items are ids, or (id, span, word) triples."""
        if second is None:
            first = first[:room]
        else:
            keep_first, keep_second = longest_first(len(first), len(second), room)
            first, second = first[:keep_first], second[:keep_second]
        if not add_special_tokens:
            return first + (second or [])
        return [bos] + first + [eos] if second is None else [bos] + first + [eos, eos] + second + [eos]

    def ids_in_chunks(self, text: str, chars: int = CHUNK_CHARS) -> Iterator[list[int]]:
        """The ids of `text` (no special tokens) about `chars` characters at a time: together exactly
        `encode(text, add_special_tokens=False)`, without ever holding a long text's whole encoding.
        Each chunk keeps the words the pre-tokenizer ends at least CHUNK_MARGIN characters before its
        end (those are the text's own words: its pattern looks no further ahead); the rest begin the
        next chunk."""
        start = 0
        while start < len(text):
            size = chars
            while True:
                chunk = text[start:start + size]
                if start + size >= len(text):
                    yield self.encode(chunk, add_special_tokens=False)
                    return
                words = self._plain.pre_tokenizer.pre_tokenize_str(chunk)
                keep = next((i for i, (_, (_, end)) in enumerate(words) if end > len(chunk) - CHUNK_MARGIN),
                            len(words))
                if keep > 0:
                    break
                size *= 2  # one word longer than the chunk
            ids, _, word_ids = self.encode(chunk, add_special_tokens=False, return_offsets=True, return_word_ids=True)
            yield [i for i, word in zip(ids, word_ids) if word < keep]
            start += words[keep][1][0]

    def tokenize(self, text: str, parse_special_tokens: bool = False) -> list[str]:
        """The byte-level BPE pieces of `text`, without special tokens ('Ġ' marks a space)."""
        encoding = (self._parsing if parse_special_tokens else self._plain).encode(text, add_special_tokens=False)
        # Vocabulary entries rather than `encoding.tokens`, which would show a <mask> with the space it swallowed.
        return [self._plain.id_to_token(i) for i in encoding.ids]

    # ---- decoding and lookup ------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tensor or array); see the class docstring for special tokens."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._vocab)):
            bad = next(i for i in ids if not 0 <= i < len(self._vocab))
            raise RobertaError(f"cannot decode id {bad}: the vocabulary has ids 0..{len(self._vocab) - 1}")
        return self._parsing.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, id: int) -> str:
        if not 0 <= id < len(self._vocab):
            raise RobertaError(f"id {id} is outside the vocabulary (0..{len(self._vocab) - 1})")
        return self._plain.id_to_token(id)

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Ids of BPE pieces; pieces outside the vocabulary become `<unk>`."""
        return [self._vocab.get(token, self.unk_token_id) for token in tokens]

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    def __repr__(self) -> str:
        return f"RobertaTokenizer(vocab_size={len(self._vocab)})"

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, layout: str = "both") -> None:
        """Write `vocab.json` + `merges.txt` (Hugging Face) and `encoder.json` + `vocab.bpe` +
        `dict.txt` (fairseq); `layout` 'hf' or 'fairseq' writes one of them. Each file is written
        to a temporary name and renamed, so a crash never leaves a half-written file."""
        if layout not in ("both", "hf", "fairseq"):
            raise RobertaError(f"unknown tokenizer layout {layout!r}: use 'both', 'hf' or 'fairseq'")
        if layout != "fairseq" and self._has_missing:
            raise RobertaError("this tokenizer maps GPT-2 tokens that dict.txt lacks to <unk>, which vocab.json "
                               "cannot express; save it with layout='fairseq'")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        files = {}
        if layout in ("both", "hf"):
            files["vocab.json"] = json.dumps(self._vocab, ensure_ascii=False)
            files["merges.txt"] = f"{MERGES_HEADER}\n{merges}"
        if layout in ("both", "fairseq"):
            tokens = list(self._vocab)[len(SPECIALS):-1]  # dict.txt rows: ids 4 .. mask-1
            # Without GPT-2's own numbering (a trained or vocab.json tokenizer), number the tokens
            # in id order; dict.txt then lists 0, 1, 2, ... and the ids come out the same.
            encoder = self._encoder or {token: i for i, token in enumerate(tokens)}
            counts = self._counts or [0] * len(tokens)
            files["encoder.json"] = json.dumps(encoder, ensure_ascii=False)
            files["vocab.bpe"] = f"{MERGES_HEADER}\n{merges}"
            files["dict.txt"] = "".join(f"{encoder.get(t, t)} {c}\n" for t, c in zip(tokens, counts))
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            atomic_write(directory / name, text)


# ---- file reading and checks --------------------------------------------------------------------

def longest_first(first: int, second: int, room: int) -> tuple[int, int]:
    """Tokens each sentence of a pair keeps within `room`: the longer is cut first, token by token,
    as transformers' truncation="longest_first" does. Both cut, the shorter keeps half the room
    (rounded down) and the longer the rest; on a tie the second keeps the rest."""
    if first + second <= room:
        return first, second
    short = min(first, second, room // 2)
    return (room - short, short) if first > second else (short, room - short)


def _check_vocab(vocab: dict[str, int]) -> None:
    ids = sorted(vocab.values())
    if ids != list(range(len(vocab))):
        raise RobertaError(f"token ids must be 0..{len(vocab) - 1} with no gaps or repeats")
    for expected, token in enumerate((*SPECIALS, MASK)):
        found = vocab.get(token)
        want = expected if token != MASK else len(vocab) - 1
        if found != want:
            raise RobertaError(f"{token!r} has id {found} but RoBERTa needs it at {want} "
                               f"(<s> <pad> </s> <unk> = 0..3, <mask> last)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RobertaError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _lines(path: Path) -> list[str]:
    lines = _read_text(path).split("\n")  # not splitlines(): it would also split at U+2028 and friends
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_token_ids(path: Path) -> dict[str, int]:
    """A JSON object of token -> id (vocab.json, encoder.json)."""
    table = read_json(path, kind=None)
    if not isinstance(table, dict) or not all(type(i) is int for i in table.values()):
        wrong = next((i for i in table.values() if type(i) is not int), None) if isinstance(table, dict) else table
        raise RobertaError(f"{path} should be a JSON object mapping each token to an integer id (found "
                           f"{repr(wrong)[:40]})")
    return table


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE `tokenizer.json` (its added tokens join the vocabulary)."""
    data = read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise RobertaError(f"{path} is not a BPE tokenizer (RoBERTa's is byte-level BPE)")
    vocab = dict(model["vocab"])
    wrong = next((item for item in vocab.items() if type(item[1]) is not int), None)
    if wrong is not None:
        raise RobertaError(f"{path}: model.vocab gives {wrong[0]!r} the id {repr(wrong[1])[:40]}; ids are whole "
                           f"numbers: the file is damaged, restore it from the original")
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise RobertaError(f"{path}: added_tokens is {repr(added_tokens)[:40]}, not a list of tokens")
    for number, added in enumerate(added_tokens, 1):
        if not (isinstance(added, dict) and isinstance(added.get("content"), str) and type(added.get("id")) is int):
            raise RobertaError(f"{path}: added token {number} ({repr(added)[:60]}) is not an object with a "
                               f"string content and a whole-number id")
        vocab.setdefault(added["content"], added["id"])
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise RobertaError(f"{path}: model.merges is {repr(merges)[:40]}, not a list of merges")
    pairs = []
    for number, merge in enumerate(merges, 1):
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) if isinstance(merge, list) else ()
        if len(pair) != 2 or not all(isinstance(t, str) and t for t in pair) or not all(
                t in vocab for t in (*pair, pair[0] + pair[1])):
            raise RobertaError(f"{path}: merge {number} ({repr(merge)[:60]}) is not two tokens of its vocabulary")
        pairs.append(pair)
    return vocab, pairs


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges, one 'left right' pair per line after the '#version' header; each part and the
    merged token must be in the vocabulary the merges belong to."""
    lines = _lines(path)
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = []
    for number, line in enumerate(lines[start:], start + 1):
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise RobertaError(f"{path} line {number}: expected two tokens separated by one space, got {line!r}")
        for token in (*pair, pair[0] + pair[1]):
            if token not in vocab:
                raise RobertaError(f"{path} line {number}: token {token!r} is not in the vocabulary; "
                                   "the vocabulary and merges files do not belong together")
        merges.append(pair)
    if not merges and len(vocab) > 256 + len(SPECIALS) + 1:
        raise RobertaError(f"{path} holds no merges, so every word would be cut into single bytes; the file is "
                           "empty or truncated: restore it from the original")
    return merges


def _check_same_vocabulary(directory: Path, vocab: dict[str, int]) -> None:
    """A folder with both layouts must give every token the same id in both: a dict.txt from another
    model beside vocab.json would otherwise go unnoticed (the model reads one, fairseq the other)."""
    if not (directory / "dict.txt").is_file():
        return
    if (directory / "encoder.json").is_file():
        other, _ = _read_dict(directory / "dict.txt", _read_token_ids(directory / "encoder.json"))
        differ = next((t for t in vocab if other.get(t) != vocab[t]), None)
        if differ is None and len(other) == len(vocab):
            return
        detail = (f"token {differ!r} has id {vocab[differ]} in vocab.json but {other.get(differ)} in dict.txt"
                  if differ is not None else f"{len(vocab)} tokens in vocab.json, {len(other)} in dict.txt")
    else:
        rows = len(_lines(directory / "dict.txt"))
        if rows + len(SPECIALS) + 1 == len(vocab):
            return
        detail = f"{len(vocab)} tokens in vocab.json, {rows + len(SPECIALS) + 1} in dict.txt"
    raise RobertaError(f"{directory}: vocab.json and dict.txt do not describe the same vocabulary ({detail}); "
                       "remove the file that belongs to another model")


def _read_dict(path: Path, encoder: dict[str, int]) -> tuple[dict[str, int], list[int]]:
    """fairseq's dict.txt: row i ('<GPT-2 id or word> <count>') gets id i + 4; <mask> comes last."""
    gpt2_tokens = {i: token for token, i in encoder.items()}
    if len(gpt2_tokens) != len(encoder):
        raise RobertaError(f"{path.with_name('encoder.json')} gives two tokens the same id")
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    counts = []
    for number, line in enumerate(_lines(path), 1):
        symbol, _, count = line.rstrip().rpartition(" ")
        if not symbol or not count.isdecimal():
            raise RobertaError(f"{path} line {number}: expected '<symbol> <count>', got {line!r}")
        if symbol.isascii() and symbol.isdigit():
            if int(symbol) not in gpt2_tokens:
                raise RobertaError(f"{path} line {number}: GPT-2 id {symbol} is not in encoder.json; "
                                   "dict.txt and encoder.json do not belong together")
            token = gpt2_tokens[int(symbol)]
        else:  # fairseq's padding words (madeupword0000, ...) are plain symbols
            token = symbol
        if token in vocab or token == MASK:
            raise RobertaError(f"{path} line {number}: {symbol!r} appears twice (special tokens are implicit)")
        vocab[token] = len(vocab)
        counts.append(int(count))
    vocab[MASK] = len(vocab)
    return vocab, counts

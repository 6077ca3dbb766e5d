"""Text spans from token-level heads: entities (`tag`) and answers (`answer`), with character offsets.

Both follow transformers' pipelines step for step, so a model gives the same entities and answers
here as there (`tests/test_spans.py` checks it on the same weights):

- `tag` is the token-classification pipeline: a softmax per token, then `aggregation`
  "none" (one result per token), "simple" (adjacent tokens of one entity, B-/I- aware, grouped
  with their mean score), or "first" / "max" / "average" (each word first takes one label from its
  tokens: the first token's, the most confident token's, or the mean of the tokens' scores; then
  words group as in "simple"). A word starts where a token follows a space or the text start (the
  pipeline's rule for BPE tokenizers without word markers).
- `answer` is the extractive question-answering pipeline: per window, softmax over the context
  tokens (and `<s>`), a span's score is p(start) * p(end) over spans of at most `max_answer_len`
  tokens, spans are widened to whole words (`align_to_words`), equal answers from several windows
  add their scores. The SQuAD 2.0 empty answer scores p(start=`<s>`) * p(end=`<s>`), the lowest
  over windows.

Texts longer than the model's window are read in overlapping windows: `stride` tokens of each window
repeat the end of the previous one (the pipelines' `stride` / `doc_stride`). For tagging, entities
found in several windows are merged by keeping the longest (then the highest-scoring) of each overlap.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import windows
from .errors import InputError, RobertaError
from .inference import length_batches, pad_batch
from .tokenizer import CHUNK_CHARS, RobertaTokenizer

AGGREGATIONS = ("none", "simple", "first", "max", "average")
BATCH_TOKENS = 4096  # padded tokens run together: bounded memory, however many texts or windows


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@torch.inference_mode()
def _run(model, sequences: list[list[int]], pad_id: int) -> list:
    """The model's outputs for each sequence, unpadded, as float32 numpy: token-classification
    logits [T, labels], or QA (start [T], end [T]). Sequences of similar length run together, up to
    BATCH_TOKENS padded tokens a batch; the outputs come back in the order given."""
    device = model.get_input_embeddings().weight.device
    outputs: list = [None] * len(sequences)
    for batch in length_batches([len(seq) for seq in sequences], BATCH_TOKENS):
        ids, mask = pad_batch([sequences[i] for i in batch], pad_id)
        # the layout made here on the host, the ids sent without waiting: the GPU runs the whole batch
        # before it is asked for anything, and then once, for the results
        layout = model.encoder_model.layout(mask, device)
        out = model(ids.to(device, non_blocking=True), layout=layout)
        if out.logits is not None:
            logits = out.logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                outputs[i] = logits[row, :len(sequences[i])]
        else:
            start, end = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                outputs[i] = (start[row, :len(sequences[i])], end[row, :len(sequences[i])])
    return outputs


def _max_tokens(model, max_length: int | None) -> int:
    limit = model.config.max_tokens
    if max_length is None:
        return limit
    if not 4 < max_length <= limit:
        raise RobertaError(f"max_length must be between 5 and the model's {limit} tokens, got {max_length}")
    return max_length


# ---- entities -----------------------------------------------------------------------------------


def tag(model, tokenizer: RobertaTokenizer, text: str, aggregation: str = "simple", stride: int | None = None,
        ignore_labels=("O",), max_length: int | None = None) -> list[dict]:
    """Entities in `text` from a token-classification model (`tag_many` of one text).

    Returns, for `aggregation` "simple", "first", "max" or "average", one dict per entity:
    `{"entity_group", "score", "word", "start", "end"}` (`text[start:end]` is the entity; `word` is
    its tokens decoded, with the space before it, as transformers gives it); for "none" one dict
    per token, `{"entity", "score", "index", "word", "start", "end"}` (`word` the BPE token, `index`
    its position in the window). Labels in `ignore_labels` are left out.

    A text longer than the model's window (or `max_length` tokens) needs `stride`: it is tagged in
    overlapping windows. Without it such a text is refused.
    """
    if not isinstance(text, str):
        raise RobertaError(f"tag takes one text (str), got {type(text).__name__}")
    return tag_many(model, tokenizer, [text], aggregation, stride, ignore_labels, max_length)[0]


def tag_many(model, tokenizer: RobertaTokenizer, texts: list[str], aggregation: str = "simple",
             stride: int | None = None, ignore_labels=("O",), max_length: int | None = None) -> list[list[dict]]:
    """`tag` of each text, the windows of all of them run through the model together in batches of
    similar length (a corpus of short lines runs as batches, not one line at a time), the entities
    the same as `tag` gives each text alone (to float rounding, since a batch's products are summed
    in another order). The server runs the same steps, its windows batched with other requests':
    `check_tag_options`, `tag_windows`, the model's logits for `windows_of` the plans, `entities` of each
    (`per_plan`)."""
    check_tag_options(aggregation, stride)
    room = _max_tokens(model, max_length) - 2
    plans = [tag_windows(tokenizer, text, room, stride) for text in texts]
    labels = model.config.labels()
    return [entities(plan, outputs, aggregation, labels, tokenizer, ignore_labels)
            for plan, outputs in per_plan(plans, _run(model, windows_of(plans), tokenizer.pad_token_id))]


def windows_of(plans) -> list[list[int]]:
    """The windows of every plan (`tag_windows`, `answer_windows`: each plan's last item), in order."""
    return [window for plan in plans for window in plan[-1]]


def per_plan(plans, outputs):
    """Each plan with the model's outputs for its own windows, from the outputs of `windows_of(plans)`."""
    first = 0
    for plan in plans:
        yield plan, outputs[first:first + len(plan[-1])]
        first += len(plan[-1])


def check_tag_options(aggregation: str, stride: int | None) -> None:
    if aggregation not in AGGREGATIONS:
        raise RobertaError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if stride is not None and aggregation == "none":
        raise RobertaError("stride needs an aggregation other than 'none' (overlapping windows repeat tokens); "
                           "use simple, first, max or average")
    if stride is not None and stride < 0:  # refused for every text, not only for those long enough to need it
        raise RobertaError(f"stride must be at least 0 (tokens shared by consecutive windows), got {stride}")


def tag_windows(tokenizer: RobertaTokenizer, text: str, room: int, stride: int | None):
    """(text, ids, offsets, ranges, windows) of one text to tag: its tokens in windows of `room` tokens
    (the model's limit less `<s>` and `</s>`) overlapping by `stride`, each `<s> ... </s>`."""
    if not isinstance(text, str):
        raise RobertaError(f"tag takes texts (str), got {type(text).__name__}")
    def too_long(count: str):
        return RobertaError(f"the text has {count} tokens but the model takes at most {room + 2}; pass stride=N "
                            "(--stride N) to tag it in windows that overlap by N tokens")

    if stride is None and len(text) > CHUNK_CHARS:  # refused after its first chunks, not tokenized whole
        count = 0
        for chunk in tokenizer.ids_in_chunks(text):
            count += len(chunk)
            if count > room:
                raise too_long(f"more than {room + 2}")
    ids, offsets = tokenizer.encode(text, add_special_tokens=False, return_offsets=True)
    if len(ids) > room and stride is None:
        raise too_long(str(len(ids) + 2))
    ranges = windows.spans(len(ids), room, stride or 0)
    return text, ids, offsets, ranges, [[tokenizer.bos_token_id, *ids[a:b], tokenizer.eos_token_id] for a, b in ranges]


def entities(plan, outputs, aggregation: str, labels: dict[int, str], tokenizer, ignore_labels) -> list[dict]:
    """One text's entities (`tag_windows`' plan) from the token-classification logits of its windows."""
    text, ids, offsets, ranges, _ = plan
    found = []
    for (a, b), logits in zip(ranges, outputs):
        scores = _softmax(logits[1:-1])  # the text's tokens, without <s> and </s>
        tokens = []
        for i, (token, (start, end), probs) in enumerate(zip(ids[a:b], offsets[a:b], scores)):
            # BPE has no word markers: a token continues a word unless a space (or the text start) precedes it
            is_subword = start > 0 and " " not in text[start - 1:start + 1]
            word = tokenizer.id_to_token(token)
            if token == tokenizer.unk_token_id:
                word, is_subword = text[start:end], False
            tokens.append({"ids": [token], "word": word, "scores": probs, "start": start, "end": end,
                           "index": i + 1, "is_subword": is_subword})
        found += [e for e in _aggregate(tokens, aggregation, labels, tokenizer)
                  if e.get("entity", e.get("entity_group")) not in ignore_labels]
    return _merge_overlaps(found) if len(ranges) > 1 else found


def _aggregate(tokens: list[dict], aggregation: str, labels: dict[int, str], tokenizer) -> list[dict]:
    if aggregation in ("none", "simple"):
        per_token = []
        for t in tokens:
            best = int(t["scores"].argmax())
            per_token.append({"entity": labels[best], "score": float(t["scores"][best]), "index": t["index"],
                              "word": t["word"], "start": t["start"], "end": t["end"], "ids": t["ids"]})
        if aggregation == "none":
            return [{k: v for k, v in e.items() if k != "ids"} for e in per_token]
        return _group(per_token, tokenizer)
    words, current = [], []
    for t in tokens:
        if current and not t["is_subword"]:
            words.append(_word(current, aggregation, labels))
            current = []
        current.append(t)
    if current:
        words.append(_word(current, aggregation, labels))
    return _group(words, tokenizer)


def _word(tokens: list[dict], aggregation: str, labels: dict[int, str]) -> dict:
    """One label for the tokens of one word."""
    if aggregation == "first":
        scores = tokens[0]["scores"]
    elif aggregation == "max":
        scores = max(tokens, key=lambda t: t["scores"].max())["scores"]  # the first of equal maxima
    else:
        scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
    best = int(scores.argmax())
    return {"entity": labels[best], "score": float(scores[best]), "start": tokens[0]["start"],
            "end": tokens[-1]["end"], "ids": [i for t in tokens for i in t["ids"]]}


def _split_tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label  # a label without a prefix continues the same label


def _group(entities: list[dict], tokenizer) -> list[dict]:
    """Adjacent tokens or words of one entity become one group: same tag, and not a fresh B-."""
    groups, current = [], []
    for entity in entities:
        if current:
            bi, label = _split_tag(entity["entity"])
            if label == _split_tag(current[-1]["entity"])[1] and bi != "B":
                current.append(entity)
                continue
            groups.append(current)
        current = [entity]
    if current:
        groups.append(current)
    return [{"entity_group": group[0]["entity"].split("-", 1)[-1],
             "score": float(np.nanmean([e["score"] for e in group])),
             "word": tokenizer.decode([i for e in group for i in e["ids"]]),
             "start": group[0]["start"], "end": group[-1]["end"]} for group in groups]


def _merge_overlaps(entities: list[dict]) -> list[dict]:
    """Entities from overlapping windows: of entities that overlap, keep the longest, then the best scored."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


# ---- answers ------------------------------------------------------------------------------------


def answer(model, tokenizer: RobertaTokenizer, question: str, context: str, topk: int = 1,
           max_answer_len: int = 15, max_seq_len: int | None = None, doc_stride: int | None = None,
           no_answer: bool = False, null_threshold: float = 0.0, align_to_words: bool = True):
    """The answer to `question` in `context` from an extractive QA model: `{"answer", "score",
    "start", "end"}` with `context[start:end] == answer`; `topk` > 1 gives a list of up to `topk`.

    Windows hold `<s> question </s></s> context part </s>` in `max_seq_len` tokens (default the
    smaller of the model's limit and 384), overlapping by `doc_stride` tokens (default the smaller of
    half a window and 128, or half the room a long question leaves), so a context of any length is read
    whole. `no_answer=True` (SQuAD 2.0)
    adds the empty answer `{"answer": "", "start": 0, "end": 0}` scored as the model's no-answer
    probability; it wins over a span only when its score beats the span's by more than
    `null_threshold` (0: the higher score wins, as in transformers). `answer_many` of one pair.
    """
    return answer_many(model, tokenizer, [(question, context)], topk, max_answer_len, max_seq_len, doc_stride,
                       no_answer, null_threshold, align_to_words)[0]


def answer_many(model, tokenizer: RobertaTokenizer, pairs, topk: int = 1, max_answer_len: int = 15,
                max_seq_len: int | None = None, doc_stride: int | None = None, no_answer: bool = False,
                null_threshold: float = 0.0, align_to_words: bool = True) -> list:
    """`answer` for each (question, context) pair, the windows of all of them run through the model
    together in batches of similar length; each answer the same as `answer` gives its pair alone (to
    float rounding)."""
    _check_answer_options(topk, max_answer_len, null_threshold)
    plans = [answer_windows(model, tokenizer, pair, max_seq_len, doc_stride, no_answer) for pair in pairs]
    return [answer_from(plan, outputs, topk, max_answer_len, no_answer, null_threshold, align_to_words)
            for plan, outputs in per_plan(plans, _run(model, windows_of(plans), tokenizer.pad_token_id))]


def _check_answer_options(topk: int, max_answer_len: int, null_threshold: float) -> None:
    if topk < 1 or max_answer_len < 1:
        raise RobertaError(f"topk and max_answer_len must be at least 1, got {topk} and {max_answer_len}")
    if not isinstance(null_threshold, (int, float)) or not math.isfinite(null_threshold):
        raise RobertaError(f"null_threshold must be a finite number, got {null_threshold!r}")


def answer_windows(model, tokenizer, pair, max_seq_len, doc_stride, no_answer):
    """(context, prefix length, context ranges, offsets, word ids, windows) of one (question, context)
    pair; an empty context that may have the empty answer has no windows. The server runs the same
    steps as `answer_many`, its windows batched with other requests' (its schema checks the options):
    this, the model's start and end logits for `windows_of` the plans, `answer_from` of each (`per_plan`)."""
    question, context = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
    if not isinstance(question, str) or not isinstance(context, str):
        raise RobertaError("answer takes a question and a context, both str")
    if not context.strip():  # nothing to point at: spans of blanks would be answers of nothing
        if not no_answer:
            raise InputError("the context is empty, so it holds no answer; give a context, or allow the empty "
                             "answer (no_answer=True, --no-answer)")
        return context, 0, [], [], [], []
    max_seq_len = min(model.config.max_tokens, 384) if max_seq_len is None else _max_tokens(model, max_seq_len)
    if doc_stride is not None and not 0 <= doc_stride <= max_seq_len:
        raise RobertaError(f"doc_stride must be between 0 and max_seq_len {max_seq_len} (tokens shared by "
                           f"consecutive windows), got {doc_stride}")
    q_ids = tokenizer.encode(question, add_special_tokens=False)
    c_ids, c_offsets, c_words = tokenizer.encode(context, add_special_tokens=False, return_offsets=True,
                                                 return_word_ids=True)
    room = max_seq_len - len(q_ids) - 4  # <s> question </s></s> context </s>
    if room < 1:
        raise InputError(f"the question has {len(q_ids)} tokens, which leaves no room for the context in "
                         f"{max_seq_len}-token windows; shorten the question or raise max_seq_len")
    if doc_stride is None:  # a long question leaves less room: the default overlap then takes half of it
        doc_stride = min(max_seq_len // 2, 128)
        doc_stride = doc_stride if doc_stride < room else room // 2
    ranges = windows.spans(len(c_ids), room, doc_stride)
    prefix = [tokenizer.bos_token_id, *q_ids, tokenizer.eos_token_id, tokenizer.eos_token_id]
    sequences = [prefix + c_ids[a:b] + [tokenizer.eos_token_id] for a, b in ranges]
    return context, len(prefix), ranges, c_offsets, c_words, sequences


def answer_from(plan, outputs, topk, max_answer_len, no_answer, null_threshold, align_to_words):
    """One pair's answer (`answer`) from the start and end logits of its windows (`answer_windows`)."""
    context, prefix, ranges, c_offsets, c_words, _ = plan
    if not ranges:  # an empty context: only the empty answer
        empty = {"answer": "", "score": 1.0, "start": 0, "end": 0}
        return empty if topk == 1 else [empty]
    candidates_per_window = topk * 2 + 10 if align_to_words else topk  # word alignment merges some spans
    null_score, answers = 1_000_000.0, []
    for (a, b), (start_logits, end_logits) in zip(ranges, outputs):
        # the context tokens and <s> can be answers; the question, separators and </s> cannot
        allowed = np.zeros(len(start_logits), dtype=bool)
        allowed[0] = True
        allowed[prefix:prefix + b - a] = True
        p_start = _softmax(np.where(allowed, start_logits, -10000.0))
        p_end = _softmax(np.where(allowed, end_logits, -10000.0))
        null_score = min(null_score, float(p_start[0] * p_end[0]))
        p_start[0] = p_end[0] = 0.0
        offsets = [(0, 0)] * prefix + c_offsets[a:b] + [(0, 0)]
        words = [None] * prefix + c_words[a:b] + [None]
        for s, e, score in _best_spans(p_start, p_end, candidates_per_window, max_answer_len, allowed):
            start, end = _char_span(s, e, offsets, words, align_to_words)
            text = context[start:end]
            same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
            if same is not None:  # one answer found again (another window or span of the same words)
                same["score"] += score
            else:
                answers.append({"answer": text, "score": score, "start": start, "end": end})
    ranked = [(x["score"], x) for x in answers]
    if no_answer:
        ranked.append((null_score - null_threshold, {"answer": "", "score": null_score, "start": 0, "end": 0}))
    ranked.sort(key=lambda pair: pair[0], reverse=True)  # stable: a tie keeps the span first
    best = [x for _, x in ranked[:topk]]
    return best[0] if topk == 1 else best


def _best_spans(p_start: np.ndarray, p_end: np.ndarray, k: int, max_answer_len: int, allowed: np.ndarray):
    """The `k` best (start, end, p_start * p_end) with start <= end < start + max_answer_len, both allowed."""
    candidates = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_len - 1)
    flat = candidates.ravel()
    if k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) <= k:
        order = np.argsort(-flat)
    else:
        order = np.argpartition(-flat, k)[:k]
        order = order[np.argsort(-flat[order])]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts] & allowed[ends]
    return [(int(s), int(e), float(candidates[s, e])) for s, e in zip(starts[keep], ends[keep])]


def _char_span(s: int, e: int, offsets, words, align_to_words: bool) -> tuple[int, int]:
    """Character span of tokens s..e; with `align_to_words`, of the whole words they fall in."""
    if not align_to_words or words[s] is None or words[e] is None:
        return offsets[s][0], offsets[e][1]
    first = words.index(words[s])
    last = len(words) - 1 - words[::-1].index(words[e])
    return offsets[first][0], offsets[last][1]

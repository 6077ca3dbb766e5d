"""`roberta.load` and the hub object: RoBERTa the way its original release publishes it.

    import roberta
    model = roberta.load("roberta.base")          # a name, or a fairseq/Hugging Face/saved path
    tokens = model.encode("Hello world!")         # tensor([0, 31414, 232, 328, 2])
    model.decode(tokens)                          # 'Hello world!'
    model.extract_features(tokens)                # [1, 5, 768]: the last layer
    model.predict("mnli", model.encode("A man sleeps.", "A person rests."))   # log-probabilities
    model.fill_mask("The capital of France is <mask>.", topk=3)

Beyond the original: a list of inputs is a batch. `encode` of a list gives a list of tensors, and
`extract_features`/`predict`/`fill_mask` of a list run it as one padded batch whose results equal
the one-at-a-time ones. A text may hold several `<mask>`s, and `truncate=True` cuts inputs longer
than the model's limit instead of refusing them. `zero_shot` classifies with an NLI head and `rerank`
ranks passages with a cross-encoder (`roberta.pairs`). Inference runs without gradients unless the
object is in train mode (so fine-tuning through it still works). Each call builds its batch on the
host (ids, mask and the encoder's layout) and sends it to the model's device without waiting, so on
a GPU the forward pass never stops to tell the host about the batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import download, windows
from .checkpoint import model_class, model_path, not_a_model, parameter_count, read_checkpoint
from .errors import InputError, RobertaError, RobertaWarning
from .fileio import atomic_open, read_json
from .inference import length_batches, pad_batch
from .model import RobertaForMaskedLM, RobertaForQuestionAnswering, RobertaForTokenClassification, find_head
from .pairs import read_cross_encoder
from .tokenizer import RobertaTokenizer, longest_first

MASK = "<mask>"
WINDOW_BATCH = 16  # windows of one long sequence run this many at a time: bounded memory


class RobertaHub(nn.Module):
    """A masked-LM RoBERTa, its named classification heads and its tokenizer, behind fairseq's calls."""

    def __init__(self, model: RobertaForMaskedLM | RobertaForTokenClassification | RobertaForQuestionAnswering,
                 tokenizer: RobertaTokenizer):
        super().__init__()
        if len(tokenizer) > model.config.vocab_size:
            raise RobertaError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                               f"{model.config.vocab_size}; load the tokenizer files that belong to this model")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: SentencePooling | None = None  # a sentence-transformers directory's own (`load` sets it)
        self.cross_encoder = None  # a CrossEncoder directory's activation and max length (`load` sets it)
        self.precision, self.precision_reason = "fp32", "as loaded"  # `load` may reduce it
        self.inference_only = False  # weights prepared for inference kernels (`load`): not trainable or savable
        self.source: Path | None = None  # the directory or archive `load` read (a job's model identity)
        self.train(model.training)  # the hub is in the mode its model is in

    def train(self, mode: bool = True) -> "RobertaHub":
        if mode and self.inference_only:
            raise RobertaError(self._fp32_only("fine-tune"))
        return super().train(mode)

    def to(self, *args, **kwargs) -> "RobertaHub":
        """nn.Module.to; a model loaded in bf16 or int8 holds weights prepared for its device's kernels
        (`inference.reduce_precision`), so it is not moved or cast: load it where it should run."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        here, weights = self.device, self.model.get_input_embeddings().weight.dtype
        moved = device is not None and (device.type != here.type or device.index not in (None, here.index))
        if self.inference_only and (moved or (dtype is not None and dtype != weights)):
            raise RobertaError(f"this model was loaded in {self.precision} for {self.device}, with weights prepared "
                               "for that device; load it where it should run: roberta.load(..., device=...)")
        return super().to(*args, **kwargs)

    def _fp32_only(self, what: str) -> str:
        if self.precision == "fp32":
            return (f"this model was loaded for inference only, with weights prepared for its kernels; to {what} "
                    "it, load it with roberta.load(...) without inference_only=True")
        return (f"this model was loaded in {self.precision} for inference; to {what} it, load it with "
                "roberta.load(..., precision='fp32')")

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def max_tokens(self) -> int:
        return self.model.config.max_tokens

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, sentence, *addl_sentences: str, no_separator: bool = False, truncate: bool = False,
               return_offsets: bool = False):
        """`<s> A </s>`, `<s> A </s></s> B </s>` ... as a LongTensor (no space is added before A).

        A list of sentences (and lists of second sentences, one each) gives a list of tensors.
        `truncate=True` keeps the first `max_tokens` ids of a longer input, ending it with `</s>`; a
        pair loses tokens from its longer sentence first (transformers' `longest_first`), so both stay.
        `return_offsets=True` gives `(tokens, offsets)`: each token's (start, end) character span in
        the sentence it came from, `(0, 0)` for special tokens (see `RobertaTokenizer.encode`).
        """
        if truncate and not return_offsets and not no_separator:  # a long text is tokenized a chunk at a
            return encode(self.tokenizer, sentence, *addl_sentences, limit=self.max_tokens)  # time, as far as needed
        result = encode(self.tokenizer, sentence, *addl_sentences, no_separator=no_separator,
                        return_offsets=return_offsets)
        if not truncate:
            return result
        cut = []
        for item in result if isinstance(result, list) else [result]:
            ids, offsets = item if return_offsets else (item, None)
            fitted = self._fit(ids[None], truncate=True)[0]
            if offsets is not None and len(fitted) < len(ids):
                offsets = offsets[:len(fitted) - 1] + [(0, 0)]  # the closing </s>
            cut.append((fitted, offsets) if return_offsets else fitted)
        return cut if isinstance(result, list) else cut[0]

    def decode(self, tokens):
        """Text of one sequence; a sequence of several sentences (split at `</s></s>`) gives a list."""
        return decode(self.tokenizer, tokens)

    # ---- the encoder ---------------------------------------------------------------------------

    def extract_features(self, tokens, return_all_hiddens: bool = False, truncate: bool = False,
                         window: int | None = None, stride: int | None = None):
        """Last-layer features [B, T, H]; with `return_all_hiddens` a list of layers + 1 such tensors
        (the embeddings first). A list of 1-D token tensors gives a list of the one-at-a-time results.

        `window` / `stride` read a sequence longer than the model in overlapping windows of `window`
        tokens (default the model's limit) sharing `stride` tokens (default half a window); each
        token's features come from the window where it is most central (`roberta.windows`), so the
        result has one row per token, as for a short sequence, which is read in one pass."""
        plan = windows.check(window, stride, self.max_tokens)
        if plan is None:
            ids, lengths = self._batch(tokens, truncate)
            ids, layout = self._placed(ids)
            with self._inference():
                out = self.model.roberta(ids, output_hidden_states=return_all_hiddens, layout=layout)
            layers = list(out.hidden_states) if return_all_hiddens else [out.last_hidden_state]
            if lengths is None:
                return layers if return_all_hiddens else layers[0]
            items = [[layer[i:i + 1, :n] for layer in layers] for i, n in enumerate(lengths)]
            return items if return_all_hiddens else [item[0] for item in items]
        sequences, as_list = self._sequences(tokens)
        items = []
        for ids in sequences:
            stitched = None
            for start, layers in self.stitched_rows(ids, plan, return_all_hiddens):
                if stitched is None:
                    stitched = [h.new_empty(len(ids), h.shape[-1]) for h in layers]
                for out, h in zip(stitched, layers):
                    out[start:start + len(h)] = h
            stitched = [out[None] for out in stitched]
            items.append(stitched if return_all_hiddens else stitched[-1])
        if as_list:
            return items
        if return_all_hiddens:
            return [torch.cat([item[layer] for item in items]) for layer in range(len(items[0]))]
        return torch.cat(items)

    def stitched_rows(self, ids: list[int], plan: tuple[int, int], return_all_hiddens: bool = False):
        """The features of one long sequence read in windows (`plan`: window, stride), as pieces
        `(position, layers)`: rows [n, hidden] of each layer (the last only, unless
        `return_all_hiddens`) for positions position..position+n, each token from the window where
        it is most central. One batch of windows is held at a time; the caller keeps what it needs
        (the stitched sequence, or a pooled sum)."""
        rows, ranges = windows.split(ids, *plan)
        runs = windows.owned(ranges)
        for first in range(0, len(rows), WINDOW_BATCH):
            batch = self.extract_features(rows[first:first + WINDOW_BATCH], return_all_hiddens=return_all_hiddens)
            for w, layers in enumerate(batch, first):
                layers = layers if return_all_hiddens else [layers]
                if w == 0:
                    yield 0, [h[0, :1] for h in layers]  # <s>
                (a, b), offset = runs[w], 1 - ranges[w][0]
                if b > a:
                    yield 1 + a, [h[0, a + offset:b + offset] for h in layers]
                if w == len(rows) - 1:
                    yield len(ids) - 1, [h[0, -1:] for h in layers]  # </s>

    def _sequences(self, tokens) -> tuple[list[list[int]], bool]:
        """Token lists of one sequence (1-D), a [batch, length] tensor or a list, and whether a list came."""
        _check_ids(tokens)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() not in (1, 2):
                raise RobertaError(f"tokens must be 1-D or [batch, length], got shape {list(tokens.shape)}")
            rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
            if len({len(r) for r in rows}) > 1:
                raise RobertaError("windows need sequences of one length in a tensor; pass a list of 1-D tensors")
            return rows, False
        rows = [torch.as_tensor(t, dtype=torch.long).reshape(-1).tolist() for t in tokens]
        if not rows:
            raise RobertaError("got an empty list of inputs; give at least one")
        return rows, True

    def embed(self, sentences, pool: str | None = None, normalize: bool | None = None,
              truncate: bool = False, batch_tokens: int = 4096) -> torch.Tensor:
        """Sentence embeddings: [hidden] for a text, [texts, hidden] for a list (float32).

        By default they follow the model: a sentence-transformers directory's pooling, normalisation
        and max_seq_length (inputs longer are cut, as sentence-transformers does), equal to its
        `encode`; any other model pools the `<s>` vector. `pool` (cls, mean, max, mean_sqrt_len_tokens,
        weightedmean, lasttoken) and `normalize` override that.
        """
        texts = [sentences] if isinstance(sentences, str) else _many(sentences, "embed", "a sentence")
        mode, unit, limit = self._pooling(pool, normalize)
        tokens = [self._fit_to(encode(self.tokenizer, text), truncate, limit) for text in texts]
        vectors: list = [None] * len(tokens)
        for batch in length_batches([len(t) for t in tokens], batch_tokens):
            for i, h in zip(batch, self.extract_features([tokens[j] for j in batch])):
                vectors[i] = pool_tokens(h[0].float(), mode)
        out = torch.stack(vectors)
        out = F.normalize(out, dim=-1) if unit else out
        return out[0] if isinstance(sentences, str) else out

    def _pooling(self, pool: str | None, normalize: bool | None) -> tuple[str, bool, int | None]:
        """(mode, normalise, token limit) from the arguments, else from the model's own pooling."""
        own = self.pooling or SentencePooling()
        mode = own.mode if pool is None else pool
        if mode not in POOLINGS:
            raise RobertaError(f"pool must be one of {', '.join(POOLINGS)}, got {mode!r}")
        return mode, own.normalize if normalize is None else normalize, own.max_tokens

    def _fit_to(self, ids: torch.Tensor, truncate: bool, limit: int | None) -> torch.Tensor:
        """`_fit`, with a sentence-transformers model's own limit cutting silently, as it does."""
        if limit is not None and len(ids) > limit:
            ids = torch.cat([ids[:limit - 1], ids.new_tensor([self.tokenizer.eos_token_id])])
        return self._fit(ids[None], truncate)[0]

    def labels(self, head: str) -> list[str] | None:
        """The class names of `head` (a fine-tuned classifier's id2label), or None where it has none:
        `predict(head, ...)[:, i]` is the class `labels(head)[i]`."""
        return head_labels(self.model.config, head)

    def register_classification_head(self, name: str, num_classes: int) -> None:
        """Add a new (randomly initialised) sentence-classification head, fine-tune it, then `predict`."""
        model = self._masked_lm("register_classification_head")
        model.register_classification_head(name, num_classes).train(self.training)

    def predict(self, head: str, tokens, return_logits: bool = False, truncate: bool = False,
                window: int | None = None, stride: int | None = None, pool: str = "mean") -> torch.Tensor:
        """Log-probabilities [B, classes] of a classification head (logits with `return_logits`).

        A list of 1-D token tensors is one padded batch: row i equals `predict(head, tokens[i])`.
        `window` / `stride` classify a sequence longer than the model from overlapping windows (see
        `extract_features`): the head reads each window's `<s>`, and the windows' logits are pooled
        by `pool`, "mean" (the average logit, a geometric mean of the windows' probabilities) or
        "max" (each class's highest logit over the windows), before the softmax. A sequence that
        fits is one window, so the result equals the single pass."""
        model = self._masked_lm("predict")
        plan = windows.check(window, stride, self.max_tokens)
        if pool not in ("mean", "max"):
            raise RobertaError(f"pool must be mean or max, got {pool!r}")
        if plan is None:
            ids, layout = self._placed(self._batch(tokens, truncate)[0])
            with self._inference():
                logits = model.classify(ids, head=head, layout=layout)
        else:
            pooled = []
            for ids in self._sequences(tokens)[0]:
                rows = windows.split(ids, *plan)[0]
                scores = torch.cat([self.predict(head, rows[i:i + WINDOW_BATCH], return_logits=True)
                                    for i in range(0, len(rows), WINDOW_BATCH)])
                pooled.append(scores.mean(0) if pool == "mean" else scores.max(0).values)
            logits = torch.stack(pooled)
        return logits if return_logits else F.log_softmax(logits.float(), dim=-1)

    def fill_mask(self, masked_input, topk: int = 5, as_dicts: bool = False, window: int | None = None,
                  stride: int | None = None):
        """The `topk` most likely tokens for `<mask>`: [(filled text, probability, token), ...].

        As in fairseq, the text around the mask is encoded without the space before `<mask>` and the
        predicted token brings its own leading space (' Paris'), so 'is <mask>.' fills as 'is Paris.'.
        A text with several masks gives one such list per mask, each filling only its mask (the others
        stay `<mask>`); a list of texts gives a list of results. `as_dicts=True` gives the dicts of the
        fill-mask pipelines instead: {"sequence", "score", "token" (id), "token_str"}.
        `window` / `stride` fill texts longer than the model: each mask is predicted in the
        overlapping window where it is most central (see `extract_features`).
        """
        texts = [masked_input] if isinstance(masked_input, str) else _many(masked_input, "fill_mask", "a text")
        if not self.has_lm_head() and not self.training:
            warnings.warn("this checkpoint has no masked-LM head (lm_head.*): it was initialised at random when "
                          "loaded, so these predictions are noise; use a checkpoint saved with its LM head",
                          RobertaWarning, stacklevel=2)
        if not 0 < topk <= len(self.tokenizer):
            raise RobertaError(f"topk must be between 1 and the vocabulary size {len(self.tokenizer)}, got {topk}")
        model = self._masked_lm("fill_mask")
        encoded = [self._encode_masked(text) for text in texts]
        plan = windows.check(window, stride, self.max_tokens)
        if plan is None:
            rows, predict_at = encoded, None  # every mask of a row
        else:
            rows, predict_at = [], []  # windows, and the masks each one predicts (those most central in it)
            for seq in encoded:
                seq = seq.tolist()
                parts, ranges = windows.split(seq, *plan)
                masks = [j for j, token in enumerate(seq[1:-1]) if token == self.tokenizer.mask_token_id]
                for w, part in enumerate(parts):
                    rows.append(torch.tensor(part))
                    predict_at.append([1 + j - ranges[w][0] for j in masks if windows.most_central(ranges, j) == w])
        logits, size = [], WINDOW_BATCH if plan else max(len(rows), 1)
        decoder = model.roberta.embeddings.word_embeddings.weight
        for start in range(0, max(len(rows), 1), size):
            ids, _ = self._batch(rows[start:start + size], truncate=None)
            wanted = ids == self.tokenizer.mask_token_id
            if plan:
                wanted.fill_(False)
                for r, positions in enumerate(predict_at[start:start + size]):
                    wanted[r, positions] = True
            # The masks' places in the flattened batch, found on the host (on the device, choosing them
            # would make the GPU wait), in text order: windows come in order and a later mask is never
            # central in an earlier one.
            at = wanted.flatten().nonzero().squeeze(1).to(self.device, non_blocking=True)
            ids, layout = self._placed(ids)
            with torch.no_grad(), _eval(model):
                hidden = model.roberta(ids, layout=layout).last_hidden_state
                # the 50K-way LM head only at the masks: [masks in the batch, vocab]
                logits.append(model.lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, at), decoder))
        logits = torch.cat(logits)
        probs, predicted = logits.float().softmax(dim=-1).topk(topk, dim=-1)
        probs, predicted = probs.tolist(), predicted.tolist()
        results, row = [], 0
        for text in texts:
            n = len(_mask_positions(text))
            per_mask = self.mask_choices(text, probs[row:row + n], predicted[row:row + n], as_dicts)
            results.append(per_mask[0] if n == 1 else per_mask)
            row += n
        return results[0] if isinstance(masked_input, str) else results

    def mask_choices(self, text: str, probs: list[list[float]], predicted: list[list[int]], as_dicts: bool = False):
        """One list of choices per `<mask>` of `text`, from its masks' top-k probabilities and token ids."""
        per_mask = []
        for position, mask_probs, mask_tokens in zip(_mask_positions(text), probs, predicted):
            choices = []
            for p, token in zip(mask_probs, mask_tokens):
                token_str = self.tokenizer.decode([token])
                filled = _fill(text, position, token_str)
                choices.append({"sequence": filled, "score": p, "token": token, "token_str": token_str}
                               if as_dicts else (filled, p, token_str))
            per_mask.append(choices)
        return per_mask

    def zero_shot(self, texts, candidate_labels, hypothesis_template: str = "This example is {}.",
                  multi_label: bool = False, head: str | None = None):
        """Zero-shot classification with an NLI head, as transformers' `zero-shot-classification`
        pipeline: `{"sequence", "labels", "scores"}` with the labels best first (a list of texts gives
        a list). Every (text, hypothesis) pair runs in one batch; see `roberta.pairs`."""
        from . import pairs

        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise RobertaError("zero_shot needs a text or a non-empty list of texts")
        labels = pairs.parse_labels(candidate_labels)
        hypotheses = pairs.hypotheses(labels, hypothesis_template)
        head = self.pair_head(head)
        entailment, contradiction = pairs.nli_classes(self.nli_labels(head), head)
        limit = self.pair_limit()
        tails = [self.tokenizer.encode(h, add_special_tokens=False) for h in hypotheses]
        tokens = [ids for text in items for ids in pairs.hypothesis_pairs(self.tokenizer, text, tails, limit)[0]]
        logits = self.predict(head, tokens, return_logits=True).reshape(len(items), len(labels), -1)
        scores = pairs.zero_shot_scores(logits, entailment, contradiction, multi_label).tolist()
        results = []
        for text, row in zip(items, scores):
            best = pairs.ranked(row, labels)
            results.append({"sequence": text, "labels": [l for l, _ in best], "scores": [s for _, s in best]})
        return results[0] if isinstance(texts, str) else results

    def rerank(self, query: str, texts, top_k: int | None = None, return_documents: bool = False,
               head: str | None = None):
        """Passages ranked by a cross-encoder, best first, as sentence-transformers' `CrossEncoder.rank`:
        `[{"corpus_id", "score"}, ...]` (with "text" when `return_documents`), at most `top_k`."""
        from . import pairs

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not isinstance(query, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise RobertaError("rerank needs a query text and a non-empty list of texts")
        if top_k is not None and top_k < 1:
            raise RobertaError(f"top_k must be at least 1, got {top_k}")
        scores = self.score_pairs([(query, t) for t in texts], head=head).tolist()
        return [{"corpus_id": i, "score": s, **({"text": texts[i]} if return_documents else {})}
                for i, s in pairs.ranked(scores, list(range(len(texts))), top_k)]

    def score_pairs(self, sentence_pairs, head: str | None = None, raw: bool = False,
                    batch_tokens: int = 4096) -> torch.Tensor:
        """One score per (first, second) pair from a one-output head, as `CrossEncoder.predict`: the
        logit through the cross-encoder's activation (sigmoid unless its directory names another);
        `raw` gives the logits. Pairs past the limit are cut longest-first, as CrossEncoder cuts them."""
        from . import pairs

        head = self.pair_head(head, one_output=True)
        limit = self.pair_limit()
        tokens = [pairs.encode_pair(self.tokenizer, a, b, limit) for a, b in sentence_pairs]
        if not tokens:
            raise RobertaError("score_pairs needs at least one (first, second) pair")
        logits = torch.empty(len(tokens))
        for batch in length_batches([len(t) for t in tokens], batch_tokens):  # bounded memory, little padding
            logits[batch] = self.predict(head, [tokens[i] for i in batch], return_logits=True)[:, 0].float().cpu()
        return logits if raw else (self.cross_encoder or pairs.CrossEncoderHead()).score(logits)

    def pair_head(self, head: str | None = None, one_output: bool = False) -> str:
        """The head pair pipelines use: `head`, else the model's main one, its only one, or `mnli`."""
        heads = self.model.config.classification_heads if isinstance(self.model, RobertaForMaskedLM) else {}
        if head is None:
            main = self.model.config.head_name
            head = main if main in heads else next(iter(heads)) if len(heads) == 1 else "mnli" if "mnli" in heads else None
        if head not in heads:
            raise RobertaError(f"no classification head {'named ' + repr(head) if head is not None else 'to use'} "
                               f"(this model has: {', '.join(heads) or 'none'}); name one (head=... in Python, "
                               "--head on the command line, \"head\" in a server request)")
        if one_output and heads[head] != 1:
            raise RobertaError(f"head {head!r} has {heads[head]} outputs; a cross-encoder scores with one "
                               "(a sentence-transformers CrossEncoder or a one-label classifier)")
        return head

    def nli_labels(self, head: str) -> list[str] | None:
        """The class names of an NLI head: its id2label, or fairseq's for roberta.large.mnli's `mnli`."""
        from .pairs import FAIRSEQ_MNLI

        names = self.labels(head)
        if names is None and head == "mnli" and self.model.config.classification_heads[head] == 3:
            return FAIRSEQ_MNLI
        return names

    def pair_limit(self) -> int:
        """Tokens a pair may have: the model's limit, or a cross-encoder's smaller max length."""
        own = self.cross_encoder.max_tokens if self.cross_encoder else None
        return min(own or self.max_tokens, self.max_tokens)

    def tag(self, text, aggregation: str = "simple", stride: int | None = None, ignore_labels=("O",)):
        """Entities from a token-classification checkpoint: `[{"entity_group", "score", "word",
        "start", "end"}, ...]` with `text[start:end]` the entity; a list of texts gives a list of
        such lists, the texts run through the model together in batches (`roberta.spans.tag_many`).
        `aggregation` and `stride` (overlapping windows for long texts) are those of transformers'
        token-classification pipeline; see `roberta.spans.tag`."""
        from . import spans

        model = self._task_model(RobertaForTokenClassification, "tag", "a token-classification", "classifier.")
        if isinstance(text, str):
            return spans.tag(model, self.tokenizer, text, aggregation, stride, ignore_labels)
        return spans.tag_many(model, self.tokenizer, _many(text, "tag", "a text"), aggregation, stride, ignore_labels)

    def answer(self, question, context, topk: int = 1, **options):
        """The answer to `question` in `context` from a question-answering checkpoint: `{"answer",
        "score", "start", "end"}` (a list of up to `topk` for `topk` > 1), `context[start:end]` the
        answer. Long contexts are read in overlapping windows (`doc_stride`); `no_answer=True`
        allows the SQuAD 2.0 empty answer, with `null_threshold`; see `roberta.spans.answer`. A list
        of questions (with one context for all, or a list as long) gives a list of answers, the pairs
        run through the model together in batches (`roberta.spans.answer_many`)."""
        from . import spans

        model = self._task_model(RobertaForQuestionAnswering, "answer", "a question-answering", "qa_outputs.")
        if isinstance(question, str):
            return spans.answer(model, self.tokenizer, question, context, topk, **options)
        questions = _many(question, "answer", "a question")
        contexts = [context] * len(questions) if isinstance(context, str) else _many(context, "answer", "a context")
        if len(contexts) != len(questions):
            raise RobertaError(f"answer got {len(questions)} questions and {len(contexts)} contexts; give one context "
                               "for all, or one per question")
        return spans.answer_many(model, self.tokenizer, list(zip(questions, contexts)), topk, **options)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the model (config.json + model.safetensors, heads included) and tokenizer files."""
        if self.inference_only:
            raise RobertaError(self._fp32_only("save"))
        self.model.save_pretrained(directory, tokenizer=self.tokenizer)

    # ---- helpers -------------------------------------------------------------------------------

    def _task_model(self, cls, method: str, kind: str, head: str):
        if not isinstance(self.model, cls):
            raise RobertaError(f"{method} needs {kind} checkpoint (config.json architectures: {cls.__name__}); "
                               f"this one is {self.checkpoint_kind()}")
        if any(k.startswith(head) for k in getattr(self.model, "missing_keys", [])):
            raise RobertaError(f"{method} needs {kind} checkpoint with its trained head ({head}*), which this one "
                               f"lacks (it would answer with a random head); fine-tune one first")
        return self.model

    def has_lm_head(self) -> bool:
        """False when the checkpoint had no masked-LM head (lm_head.*) and one was initialised at random."""
        return not any(k.startswith("lm_head.") for k in getattr(self.model, "missing_keys", []))

    def _masked_lm(self, method: str) -> RobertaForMaskedLM:
        if not isinstance(self.model, RobertaForMaskedLM):
            raise RobertaError(f"{method} needs a masked-LM checkpoint; this one is {self.checkpoint_kind()} "
                               "(use tag for token classification, answer for question answering)")
        return self.model

    def checkpoint_kind(self) -> str:
        """What the loaded checkpoint is, in a user's words (a sequence classifier loads as the masked-LM
        model with its heads, so the class name alone would mislead)."""
        if isinstance(self.model, RobertaForTokenClassification):
            return "a token-classification checkpoint (a tagger)"
        if isinstance(self.model, RobertaForQuestionAnswering):
            return "a question-answering checkpoint (a reader)"
        heads = list(getattr(self.model, "classification_heads", {}))
        if heads and not self.has_lm_head():
            return f"a sequence-classification checkpoint (heads: {', '.join(heads)})"
        return "a masked-LM checkpoint" + (f" with classification heads ({', '.join(heads)})" if heads else "")

    def _encode_masked(self, text: str) -> torch.Tensor:
        # fairseq's rule: the spans around each mask lose their trailing spaces (the space before a mask
        # belongs to the predicted token) and keep their leading ones.
        if MASK not in text:
            raise InputError(f"fill_mask needs a {MASK} in the text, e.g. 'The capital of France is {MASK}.'")
        tok = self.tokenizer
        ids = [tok.bos_token_id]
        for i, span in enumerate(text.split(MASK)):
            ids += ([tok.mask_token_id] if i else []) + tok.encode(span.rstrip(), add_special_tokens=False)
        return torch.tensor(ids + [tok.eos_token_id], dtype=torch.long)

    def _batch(self, tokens, truncate: bool | None) -> tuple[torch.Tensor, list[int] | None]:
        """[B, T] ids on the host, and the lengths when `tokens` was a list (right-padded). A tensor
        on a GPU is copied to the host once, here: what the batch looks like is decided there."""
        _check_ids(tokens)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() not in (1, 2):
                raise RobertaError(f"tokens must be 1-D or [batch, length], got shape {list(tokens.shape)}")
            return self._fit(tokens.to("cpu", torch.long).reshape(-1, tokens.shape[-1]), truncate), None
        rows = [self._fit(torch.as_tensor(t, dtype=torch.long, device="cpu").reshape(1, -1), truncate)[0]
                for t in tokens]
        if not rows:
            raise RobertaError("got an empty list of inputs; give at least one")
        return pad_batch(rows, self.tokenizer.pad_token_id)[0], [len(r) for r in rows]

    def _placed(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        """Host ids [B, T] sent to the model's device without waiting, and the encoder's layout for
        them made on the host from `mask` (by default every non-pad token, fairseq's rule): the
        forward pass then never makes a GPU stop to tell the host about the batch."""
        encoder = self.model.encoder_model
        encoder.check_inputs(ids)  # on the host, where reading the ids costs nothing
        mask = ids.ne(self.model.config.pad_token_id) if mask is None else mask
        return ids.to(self.device, non_blocking=True), encoder.layout(mask, self.device)

    def _fit(self, ids: torch.Tensor, truncate: bool | None, limit: int | None = None) -> torch.Tensor:
        """Refuse (or with `truncate`, cut as `cut` does: a pair longest first) inputs past the limit
        (default: the model's); None: the caller offers no truncation."""
        n, limit = ids.shape[-1], limit or self.max_tokens
        if n <= limit:
            return ids
        if not truncate:
            raise InputError(too_long("input", n, limit, truncate))
        pad = self.tokenizer.pad_token_id
        rows = []
        for row in ids.tolist():
            while len(row) > limit and row[-1] == pad:  # a padded batch: the padding goes first
                row.pop()
            rows.append(cut(self.tokenizer, row, limit) if len(row) > limit else row)
        return pad_batch(rows, pad)[0].to(ids.device)

    def _inference(self):
        # Gradients only when training through the hub (fine-tuning), never for inference.
        return torch.set_grad_enabled(self.training and torch.is_grad_enabled())


# ---- text <-> ids, with the tokenizer alone (the CLI encodes without loading weights) ------------


def encode(tokenizer: RobertaTokenizer, sentence, *addl_sentences: str, no_separator: bool = False,
           return_offsets: bool = False, limit: int | None = None):
    """`RobertaHub.encode`: fairseq's framing, `</s></s>` between sentences (`</s>` with no_separator).
    `limit`: cut to that many tokens as `cut` does, tokenizing no more than that needs (`encode_within`)."""
    if not isinstance(sentence, str):
        batch, others = _many(sentence, "encode", "a sentence"), [_many(more, "encode", "a sentence") for more in addl_sentences]
        if any(len(more) != len(batch) for more in others):
            raise RobertaError("encode got lists of different lengths; give one second sentence per sentence")
        return [encode(tokenizer, *texts, no_separator=no_separator, return_offsets=return_offsets, limit=limit)
                for texts in zip(batch, *others)]
    if limit is not None:
        return torch.tensor(encode_within(tokenizer, [sentence, *addl_sentences], limit, True), dtype=torch.long)
    bos, eos, none = [tokenizer.bos_token_id], [tokenizer.eos_token_id], [(0, 0)]
    ids, offsets = [], []
    for i, text in enumerate((sentence, *addl_sentences)):
        encoded = tokenizer.encode(text, add_special_tokens=False, return_offsets=return_offsets)
        text_ids, text_offsets = encoded if return_offsets else (encoded, [])
        before = 1 if i == 0 or not no_separator else 0  # <s> first, then a </s> separator unless told not to
        ids += (bos if i == 0 else eos) * before + text_ids + eos
        offsets += none * before + text_offsets + none
    tokens = torch.tensor(ids, dtype=torch.long)
    return (tokens, offsets) if return_offsets else tokens


def too_long(what: str, tokens: int | None, limit: int, truncate: bool | None) -> str:
    """The refusal of an input past the model's limit (`tokens` None: more than the limit)."""
    count = f"more than {limit}" if tokens is None else tokens
    offer = "" if truncate is None else f"pass truncate=True (--truncate) to keep the first {limit}, or "
    return f"{what} has {count} tokens but the model takes at most {limit}; {offer}shorten it"


def cut(tokenizer: RobertaTokenizer, ids: list[int], limit: int) -> list[int]:
    """`ids` cut to `limit` tokens keeping the end marker. A pair (`<s> A </s></s> B </s>`) loses
    tokens from its longer sentence first, as transformers' truncation="longest_first": both
    sentences and the `</s></s>` between them stay."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if len(ids) <= limit:
        return ids
    sep = next((i for i in range(1, len(ids) - 2) if ids[i] == eos and ids[i + 1] == eos), None)
    if sep is None or ids[0] != bos or ids[-1] != eos or limit < 4:
        return ids[:limit - 1] + [eos]
    first, second = ids[1:sep], ids[sep + 2:-1]
    keep_first, keep_second = longest_first(len(first), len(second), limit - 4)
    return [bos, *first[:keep_first], eos, eos, *second[:keep_second], eos]


def _many(value, method: str, what: str) -> list:
    """A list of the inputs a method was given many of; a clear TypeError for what is neither one nor many."""
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise TypeError(f"{method} takes {what} (str) or a list of them, got {type(value).__name__}")
    return list(value)


def encode_within(tokenizer: RobertaTokenizer, sentences: list[str], limit: int | None, truncate: bool | None,
                  what: str = "input") -> list[int]:
    """`encode(tokenizer, *sentences)` refused past `limit` tokens, or with `truncate` cut as `cut`
    cuts it, tokenizing no more of a long text than that needs: a chunk at a time
    (`RobertaTokenizer.ids_in_chunks`), stopping once a sentence is past the limit. None: no limit."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if limit is None:  # every token (windows read them all)
        ids = [bos]
        for i, text in enumerate(sentences):
            ids += [eos] * (i > 0) + [t for chunk in tokenizer.ids_in_chunks(text) for t in chunk] + [eos]
        return ids
    if len(sentences) > 2:
        ids = encode(tokenizer, *sentences).tolist()
        if len(ids) > limit and not truncate:
            raise InputError(too_long(what, len(ids), limit, truncate))
        return cut(tokenizer, ids, limit)
    room = limit - 2 * len(sentences)
    heads, whole = [], []
    for text in sentences:
        ids = []
        for chunk in tokenizer.ids_in_chunks(text):
            ids += chunk
            if len(ids) > room:
                break
        heads.append(ids[:room + 1])
        whole.append(len(ids) <= room)
    lengths = [len(h) for h in heads]
    if sum(lengths) > room:
        if not truncate:
            raise InputError(too_long(what, sum(lengths) + 2 * len(sentences) if all(whole) else None, limit,
                                      truncate))
        if len(heads) == 1:
            lengths = [room]
        else:
            if not any(whole):  # which is longer decides who keeps the odd token: count them, a chunk at a time
                lengths = [sum(len(c) for c in tokenizer.ids_in_chunks(text)) for text in sentences]
            lengths = list(longest_first(*lengths, max(room, 0)))
    ids = [bos]
    for i, (head, n) in enumerate(zip(heads, lengths)):
        ids += [eos] * (i > 0) + head[:n] + [eos]
    return ids


def decode(tokenizer: RobertaTokenizer, tokens):
    """`RobertaHub.decode`: one string, or a list when `</s></s>` separates several sentences."""
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], torch.Tensor):
        return [decode(tokenizer, t) for t in tokens]
    # a list of ints is taken as it is: an id past 64 bits gets the tokenizer's range error, not an overflow
    ids = list(tokens) if isinstance(tokens, (list, tuple)) and all(type(i) is int for i in tokens) \
        else torch.as_tensor(tokens).tolist()
    if not isinstance(ids, list) or (ids and isinstance(ids[0], list)):
        raise RobertaError("decode takes one sequence of ids (a 1-D tensor); decode a batch row by row")
    eos = tokenizer.eos_token_id
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    sentences, start = [], 0
    for i in range(len(ids) - 1):
        if ids[i] == eos and ids[i + 1] == eos:
            sentences.append(ids[start:i + 1])
            start = i + 1
    sentences.append(ids[start:])
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in sentences]
    return texts[0] if len(texts) == 1 else texts


@contextlib.contextmanager
def _eval(module: nn.Module):
    """Eval mode for the duration (fill_mask never wants dropout), then the mode it had."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def _mask_positions(text: str) -> list[int]:
    positions, start = [], text.find(MASK)
    while start != -1:
        positions.append(start)
        start = text.find(MASK, start + len(MASK))
    return positions


def _fill(text: str, position: int, token: str) -> str:
    # The predicted token carries its own leading space, so the space before the mask goes.
    if position > 0 and text[position - 1] == " ":
        position -= 1
        return text[:position] + token + text[position + 1 + len(MASK):]
    return text[:position] + token + text[position + len(MASK):]


# ---- sentence embeddings: sentence-transformers' pooling -----------------------------------------

POOLINGS = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers < 3 wrote one flag per mode in 1_Pooling/config.json
_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclasses.dataclass(frozen=True)
class SentencePooling:
    """How a model turns token vectors into a sentence vector (sentence-transformers' Pooling/Normalize)."""
    mode: str = "cls"
    normalize: bool = False
    max_tokens: int | None = None  # sentence-transformers' max_seq_length: longer inputs are cut


def pool_tokens(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    """One sentence vector from the [tokens, hidden] vectors of one unpadded sequence, as
    sentence-transformers' Pooling computes it."""
    if mode == "cls":
        return hidden[0]
    if mode == "lasttoken":
        return hidden[-1]
    if mode == "max":
        return hidden.max(0).values
    if mode == "mean":
        return hidden.mean(0)
    if mode == "mean_sqrt_len_tokens":
        return hidden.sum(0) / math.sqrt(hidden.shape[0])
    if mode == "weightedmean":  # position weights 1..T
        weights = torch.arange(1, hidden.shape[0] + 1, dtype=hidden.dtype, device=hidden.device)[:, None]
        return (hidden * weights).sum(0) / weights.sum()
    raise RobertaError(f"pool must be one of {', '.join(POOLINGS)}, got {mode!r}")


def read_sentence_config(directory: Path) -> tuple[SentencePooling, Path] | None:
    """A sentence-transformers directory's pooling and the folder of its transformer (None otherwise).

    modules.json lists the modules in order: a Transformer (the RoBERTa, usually at the top level),
    a Pooling (its config.json: `pooling_mode`, or the older one-flag-per-mode form) and optionally a
    Normalize. max_seq_length comes from sentence_bert_config.json, or tokenizer_config.json's
    model_max_length where newer versions keep it.
    """
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _json(modules_file, kind=None)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise RobertaError(f"{modules_file} should be a list of modules (sentence-transformers' modules.json)")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown or kinds.count("Transformer") != 1 or kinds.count("Pooling") > 1:
        raise RobertaError(f"{modules_file}: modules {', '.join(kinds)}; only Transformer, Pooling and Normalize "
                           "(sentence-transformers' usual pipeline) are supported")
    transformer = directory / str(modules[kinds.index("Transformer")].get("path") or "")
    mode = "cls"
    if "Pooling" in kinds:
        config = _json(directory / str(modules[kinds.index("Pooling")].get("path", "")) / "config.json")
        modes = config.get("pooling_mode")
        if modes is None:
            modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
        modes = [modes] if isinstance(modes, str) else modes if isinstance(modes, list) else [modes]
        if len(modes) != 1 or not isinstance(modes[0], str) or modes[0] not in POOLINGS:
            raise RobertaError(f"{directory}: pooling {modes} is not supported; one of {', '.join(POOLINGS)} is")
        mode = modes[0]
    max_tokens = None
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        value = _json(transformer / name).get(key) if (transformer / name).is_file() else None
        if isinstance(value, int) and 2 <= value < 1_000_000:
            max_tokens = value
            break
    return SentencePooling(mode, "Normalize" in kinds, max_tokens), transformer


def _json(path: Path, kind: type = dict):
    if not path.is_file():
        raise RobertaError(f"{path} is missing; the sentence-transformers directory is incomplete")
    return read_json(path, kind=kind)


# ---- loading ------------------------------------------------------------------------------------


def resolve(name_or_path: str | os.PathLike, cache_dir=None, offline: bool | None = None,
            base_url: str | None = None, progress: bool = True) -> Path:
    """The local path of a model: a path as it is, a fairseq release name (`roberta.base`) from its
    archive, or a Hub repository (`org/name`, `org/name@revision`) from the Hugging Face cache,
    downloaded there when missing. `cache_dir` replaces both caches; `base_url` names a mirror."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return model_path(path)
    name = str(name_or_path)
    if name in download.MODELS:
        return download.download(name, cache_dir, base_url, offline, progress)
    if download.parse_hub_id(name) and not name.startswith((".", "/", "~")):
        return download.hub_snapshot(name, cache_dir, base_url, offline, progress)
    raise RobertaError(f"{name_or_path} is neither an existing path nor a known model name "
                       f"({', '.join(download.MODELS)}, or a Hub id such as FacebookAI/roberta-base[@revision])")


def load(name_or_path: str | os.PathLike, device: str | torch.device | None = None, cache_dir=None,
         offline: bool | None = None, base_url: str | None = None, progress: bool = True,
         precision: str = "fp32", kernels: str | None = None, inference_only: bool = False) -> RobertaHub:
    """Load a RoBERTa by name (`roberta.base`, `roberta.large`, `roberta.large.mnli`), Hub id
    (`FacebookAI/roberta-base`, `org/name@revision`: any RoBERTa-family repository) or path: a fairseq
    directory or .tar.gz (model.pt + dict.txt), a Hugging Face directory (sharded, ZipNN-compressed or
    sentence-transformers too), or a directory `save` wrote. In eval mode.

    `precision`: "fp32" (default) gives the exact published numbers in float32 on every machine, as
    transformers, sentence-transformers and fairseq do, and is what training, saving and new heads need.
    "auto" runs in what this machine does fastest for inference (see `roberta.inference`); "bf16" and
    "int8" ask for one. `hub.precision` and `hub.precision_reason` say what was chosen and why.
    `kernels`: "default" runs every float32 product through F.linear instead of the GEMM measured
    fastest here ("measure"), for runs that repeat bit for bit across machines; process-wide, as
    $ROBERTA_KERNELS (`roberta.kernels`).
    `inference_only=True` also prepares an fp32 model's weights for inference alone (q, k and v
    concatenated once, reordered for oneDNN where that measures faster here: `inference.reduce_precision`;
    the commands and the server do): it then cannot be trained, given a head or saved, as bf16 and int8
    models cannot.
    """
    from . import kernels as _kernels
    from .inference import prepare, prepared, resolve_precision

    if kernels is not None:
        _kernels.use(kernels)

    source = resolve(name_or_path, cache_dir, offline, base_url, progress)
    with _model_dir(source) as directory:
        cross = read_cross_encoder(directory)
        sentence = None if cross else read_sentence_config(directory)
        directory = sentence[1] if sentence else directory
        model = model_class(directory).from_pretrained(directory)
        tokenizer = _tokenizer(directory, cache_dir, offline, base_url, progress)
    hub = RobertaHub(model, tokenizer).eval()
    hub.pooling = sentence[0] if sentence else None
    hub.cross_encoder = cross or _one_output_head(model, directory)
    hub.source = source.parent if source.name == "model.pt" else source
    hub = hub.to(device) if device is not None else hub
    hub.precision, hub.precision_reason = resolve_precision(precision, hub.device)
    prepare(hub.model, hub.precision, inference_only)
    hub.inference_only = hub.precision != "fp32" or prepared(hub.model)
    return hub


@contextlib.contextmanager
def opened(name_or_path: str | os.PathLike, cache_dir=None, offline: bool | None = None,
           base_url: str | None = None, progress: bool = True):
    """(directory, tokenizer) of a model opened as `load` opens it (a name, a path, an archive),
    for code that builds another model class from it (fine-tuning, evaluation). An archive's
    directory lasts as long as the `with` block."""
    with _model_dir(resolve(name_or_path, cache_dir, offline, base_url, progress)) as directory:
        yield directory, _tokenizer(directory, cache_dir, offline, base_url, progress)


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir=None, offline: bool | None = None,
                   base_url: str | None = None, progress: bool = True) -> RobertaTokenizer:
    """Only the tokenizer of a model (what `encode`/`decode` need), without reading its weights."""
    with _model_dir(resolve(name_or_path, cache_dir, offline, base_url, progress)) as directory:
        return _tokenizer(directory, cache_dir, offline, base_url, progress)


def _one_output_head(model, directory: Path):
    """A one-output sequence classifier scores pairs as a CrossEncoder with its defaults would: sigmoid,
    cut at the tokenizer's model_max_length."""
    from .pairs import CrossEncoderHead, model_max_length

    config = model.config
    if config.classification_heads.get(config.head_name) == 1:
        return CrossEncoderHead("Sigmoid", model_max_length(directory))
    return None


@contextlib.contextmanager
def _model_dir(path: Path):
    """The directory to load from: the path itself, or a .tar.gz extracted into a temporary one."""
    if path.is_dir():
        yield path
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix="roberta-") as tmp:
            yield download.extract_archive(path, tmp)
    elif path.name == "model.pt":
        yield path.parent
    else:
        raise RobertaError(f"{path} is not a model: pass a directory, a .tar.gz archive or a fairseq model.pt")


def _tokenizer(directory: Path, cache_dir, offline, base_url, progress) -> RobertaTokenizer:
    if all((directory / f).is_file() for f in ("vocab.json", "merges.txt")) or \
            all((directory / f).is_file() for f in ("encoder.json", "vocab.bpe", "dict.txt")) or \
            (directory / "tokenizer.json").is_file():
        return RobertaTokenizer.from_pretrained(directory)
    if not (directory / "dict.txt").is_file():
        if not (directory / "config.json").is_file():
            raise not_a_model(directory)
        raise RobertaError(f"{directory} holds no tokenizer: expected vocab.json + merges.txt, tokenizer.json, or dict.txt "
                           f"(fairseq, with encoder.json + vocab.bpe or the GPT-2 BPE download)")
    # A fairseq release ships dict.txt only; the BPE files are GPT-2's, downloaded once into the cache.
    bpe = download.gpt2_bpe(cache_dir, base_url, offline, progress)
    with tempfile.TemporaryDirectory(prefix="roberta-tok-") as tmp:
        for source in (bpe / "encoder.json", bpe / "vocab.bpe", directory / "dict.txt"):
            os.symlink(source.resolve(), Path(tmp) / source.name)
        return RobertaTokenizer.from_pretrained(tmp, layout="fairseq")


def describe(name_or_path: str | os.PathLike, cache_dir=None, offline: bool | None = None,
             base_url: str | None = None, progress: bool = True) -> dict:
    """What a checkpoint holds: its format, config, classification heads, parameter count, dtype, size."""
    path = resolve(name_or_path, cache_dir, offline, base_url, progress)
    with _model_dir(path) as directory:
        config, state = read_checkpoint(directory)
        layout = "fairseq" if (directory / "model.pt").is_file() else "huggingface"
    if "classifier.out_proj.weight" in state:  # a transformers sequence classifier: its head, by name
        config.classification_heads[config.head_name or "default"] = state["classifier.out_proj.weight"].shape[0]
    parameters = parameter_count(config)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    base = path if path.is_dir() else path.parent
    repository, revision = hub_origin(path)
    cross = read_cross_encoder(path) if path.is_dir() else None
    sentence = read_sentence_config(path) if path.is_dir() and not cross else None
    return {
        "path": str(path),
        "repository": repository,
        "revision": revision,
        "files": {str(f.relative_to(base)): f.stat().st_size for f in files},
        "labels": {head: names for head in config.classification_heads
                   if (names := head_labels(config, head)) is not None},
        "pooling": dataclasses.asdict(sentence[0]) if sentence else None,
        "cross_encoder": dataclasses.asdict(cross) if cross else None,
        "format": layout,
        "config": config.to_dict(),
        "heads": dict(config.classification_heads),
        "tasks": _head_tasks(config, state),
        "max_tokens": config.max_tokens,
        "parameters": parameters,
        "dtype": ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()
                                   if t.is_floating_point()})),
        "size_bytes": sum(f.stat().st_size for f in files),
    }


def hub_origin(path: Path) -> tuple[str | None, str | None]:
    """(repository, commit) of a snapshot in the Hugging Face cache (models--org--name/snapshots/<commit>)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder.parent.parent.name.removeprefix("models--").replace("--", "/"), folder.name
    return None, None


def _head_tasks(config, state: dict) -> list[dict]:
    """Every head a checkpoint holds, with its task kind, its number of outputs and its class names."""
    named = [{"name": head, "task": "sequence classification", "classes": classes,
              "labels": head_labels(config, head)} for head, classes in config.classification_heads.items()]
    names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else None
    if "classifier.weight" in state:  # a transformers token classifier (NER, POS): one label per token
        classes = state["classifier.weight"].shape[0]
        named.append({"name": config.head_name or "token_classification", "task": "token classification",
                      "classes": classes, "labels": names if names and len(names) == classes else None})
    if "qa_outputs.weight" in state:  # extractive question answering: a start and an end score per token
        named.append({"name": config.head_name or "qa", "task": "question answering", "classes": 2,
                      "labels": ["start", "end"]})
    return named


def _check_ids(tokens) -> None:
    """Token ids are what the model reads: a text (or anything else) where they belong is refused with
    what to call instead, before torch meets it with an obscure TypeError."""
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex():
            raise RobertaError(f"expected token ids (integers), got a {tokens.dtype} tensor: pass what encode returns")
        return
    items = [tokens] if isinstance(tokens, (str, bytes)) else tokens if isinstance(tokens, (list, tuple)) else []
    if tokens is None or isinstance(tokens, (int, float, dict)):
        raise RobertaError(f"expected token ids (a tensor from encode, or a list of them), got a {type(tokens).__name__}")
    text = next((item for item in items if isinstance(item, (str, bytes))), None)
    if text is not None:
        raise RobertaError(f"expected token ids, got the text {text[:40]!r}: call encode first, e.g. "
                           f"hub.encode({text[:20]!r}), or embed(texts) for sentence vectors")


def head_labels(config, head: str) -> list[str] | None:
    """The class names of a classification head: a fine-tuned transformers classifier's id2label, which
    belongs to its one head (`head_name`); None where the checkpoint names none."""
    head = find_head(head, config.classification_heads)
    classes = config.classification_heads.get(head)
    if not config.id2label or classes is None or head != (config.head_name or "default") \
            or sorted(config.id2label) != list(range(classes)):
        return None
    return [config.id2label[i] for i in range(classes)]


def write_features(hub: RobertaHub, texts, path: str | os.PathLike, pool: str | None = None,
                   layer: int = -1, truncate: bool = False, batch_tokens: int = 4096, window: int | None = None,
                   stride: int | None = None, name: str | None = None) -> list[int]:
    """Features of each text (a TAB separates the sentences of a pair) written atomically to `path`.

    `.npy`: one row per text ([texts, hidden]); `.jsonl`: {"text", "tokens", "features"} per line.
    `pool`: None (default) follows the model: a sentence-transformers directory's pooling,
    normalisation and max length (what `embed` gives), else the `<s>` vector; "cls" (the `<s>`
    vector, what classification heads read), "mean" over the tokens, the other sentence-transformers
    modes (max, mean_sqrt_len_tokens, weightedmean, lasttoken), or "none" (every token: .jsonl only).
    `layer`: 0 is the embeddings, -1 (default) the last layer. `window`/`stride` read texts longer
    than the model in overlapping windows (see `RobertaHub.extract_features`; cls, mean or none).
    `texts` may be any iterable: they are read, computed and written FEATURE_CHUNK at a time, so
    memory does not grow with their number (the .npy header, whose row count comes last, is
    rewritten at the end). `name` (e.g. the input file) makes errors name the line. Returns the
    shape of one text's features.
    """
    from . import jobs

    path = Path(path)
    if path.suffix not in (".npy", ".jsonl"):
        raise RobertaError(f"cannot write features to {path}: name it .npy or .jsonl (or a directory, for shards)")
    if not path.parent.is_dir():
        raise RobertaError(f"cannot write {path}: the directory {path.parent} does not exist; create it first")
    if pool not in (None, "none", *POOLINGS):
        raise RobertaError(f"pool must be none or one of {', '.join(POOLINGS)}, got {pool!r}")
    if pool == "none" and path.suffix == ".npy":
        raise RobertaError("pool 'none' gives a matrix per text of its own length, which .npy cannot hold; "
                           "write .jsonl, or pool with cls or mean")
    mode, unit, limit = ("none", False, None) if pool == "none" else hub._pooling(pool, None if pool is None else False)
    jobs.check_layer(hub, layer)
    windowed = windows.check(window, stride, hub.max_tokens) is not None
    ours = hub.pooling is None and pool in (None, "cls", "mean", "none") or windowed
    if windowed and pool not in (None, "cls", "mean", "none"):
        raise RobertaError(f"windows pool with cls, mean or none, not {pool!r}")

    def features(texts: list[str], first_line: int) -> tuple[list, list]:
        if ours:
            tokens = jobs.tokenize(hub, [text.split("\t") for text in texts], truncate, windowed,
                                   first_line=first_line if name else None, name=name or "input")
            return tokens, jobs.feature_rows(hub, tokens, pool or "cls", layer, batch_tokens, window, stride)
        # a sentence-transformers model's own pooling, or one of its other modes
        tokens = [hub._fit_to(hub.encode(*text.split("\t")), truncate, limit).tolist() for text in texts]
        # Sorted into batches of similar length under a token budget: almost no padding work, and the
        # vectors go back to input order.
        vectors: list = [None] * len(tokens)
        for batch in length_batches([len(t) for t in tokens], batch_tokens):
            hidden = hub.extract_features([torch.tensor(tokens[i]) for i in batch],
                                          return_all_hiddens=layer not in (-1, hub.model.config.num_hidden_layers))
            for i, h in zip(batch, hidden):
                h = (h[layer] if isinstance(h, list) else h)[0].float()
                vector = h if mode == "none" else pool_tokens(h, mode)
                vectors[i] = (F.normalize(vector, dim=-1) if unit else vector).cpu().numpy()
        return tokens, vectors

    rows, shape = 0, None
    with atomic_open(path) as f:
        if path.suffix == ".npy":
            f.write(bytes(NPY_HEADER))  # room for the header, written once the rows are counted
        for chunk in jobs.chunks(texts, FEATURE_CHUNK):
            tokens, vectors = features(chunk, rows + 1)
            shape = shape or list(vectors[0].shape)
            if path.suffix == ".npy":
                f.write(np.ascontiguousarray(np.stack(vectors), dtype="<f4").tobytes())
            else:
                f.write("".join(json.dumps({"text": text, "tokens": ids, "features": vector.tolist()}) + "\n"
                                for text, ids, vector in zip(chunk, tokens, vectors)).encode("utf-8"))
            rows += len(chunk)
        if rows == 0:
            raise RobertaError("no inputs to write features for; give at least one text")
        if path.suffix == ".npy":
            f.seek(0)
            f.write(npy_header((rows, *shape)))
    return shape


FEATURE_CHUNK = 4096  # texts `write_features` reads and computes at a time
NPY_HEADER = 128  # bytes of a streamed .npy's header: room for any float32 [rows, width] shape


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy (version 1.0) header of exactly NPY_HEADER bytes for little-endian float32 rows."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + text.ljust(NPY_HEADER - 11) + b"\n"

"""Sentence-pair pipelines: zero-shot classification with an NLI head, and cross-encoder reranking.

Zero-shot (transformers' `zero-shot-classification` pipeline): each candidate label becomes a
hypothesis, "This example is {label}.", paired with the text; an NLI head scores every pair in one
forward pass. One label per text: a softmax of the entailment logits over the labels. Several true
labels (`multi_label`, or a single candidate): each label's entailment against its contradiction.
The entailment class is the first label of the head's id2label that starts with "entail"; the
contradiction class is 0, or the last class when entailment is 0, as transformers takes them.

Cross-encoders (sentence-transformers' `CrossEncoder`): a sequence-classification model with one
output scores (query, passage) pairs; its activation (sigmoid unless the directory says otherwise)
turns the logit into the score. A pair longer than the model's limit is cut as CrossEncoder's
tokenizer cuts it ("longest_first": the longer side loses tokens first); zero-shot cuts only the
text, never the hypothesis ("only_first").
"""
from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import torch

from .errors import RobertaError
from .tokenizer import longest_first

HYPOTHESIS = "This example is {}."
# fairseq's roberta.large.mnli names no classes; its README gives them
FAIRSEQ_MNLI = ["contradiction", "neutral", "entailment"]
# The activations a CrossEncoder directory may name (sentence-transformers stores the class's path).
ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Identity": lambda x: x, "Tanh": torch.tanh}


@dataclasses.dataclass(frozen=True)
class CrossEncoderHead:
    """How a one-output classifier's logit becomes a score, and where its inputs are cut."""
    activation: str = "Sigmoid"
    max_tokens: int | None = None  # CrossEncoder's max_length (the tokenizer's model_max_length)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](logits.float())


def read_cross_encoder(directory: Path) -> CrossEncoderHead | None:
    """A CrossEncoder directory's activation and max length (None: not a CrossEncoder directory).

    sentence-transformers >= 5 writes config_sentence_transformers.json with `model_type`
    "CrossEncoder" and `activation_fn`; 4.x kept `activation_fn` in config.json's
    `sentence_transformers`; earlier ones `sbert_ce_default_activation_function`. The max length is
    tokenizer_config.json's `model_max_length`."""
    st_config, config = _object(directory / "config_sentence_transformers.json"), _object(directory / "config.json")
    if st_config.get("model_type") == "CrossEncoder":
        path = st_config.get("activation_fn")
    elif isinstance(config.get("sentence_transformers"), dict) and "activation_fn" in config["sentence_transformers"]:
        path = config["sentence_transformers"]["activation_fn"]
    elif config.get("sbert_ce_default_activation_function"):
        path = config["sbert_ce_default_activation_function"]
    else:
        return None
    name = str(path).rsplit(".", 1)[-1] if path else "Sigmoid"
    if not str(path or "torch.").startswith("torch."):
        name = "Sigmoid"  # CrossEncoder runs no code from the directory either: it falls back to its default
    if name not in ACTIVATIONS:
        raise RobertaError(f"{directory}: activation {path} is not supported; {', '.join(ACTIVATIONS)} are")
    return CrossEncoderHead(name, model_max_length(directory))


def model_max_length(directory: Path) -> int | None:
    value = _object(directory / "tokenizer_config.json").get("model_max_length")
    return value if isinstance(value, int) and 4 <= value < 1_000_000 else None


def _object(path: Path) -> dict:
    """A JSON file's object, or {} where it is missing or not one: the loaders that need the file
    report on it; here it only decides what a cross-encoder looks like."""
    from .hub import _json

    try:
        value = _json(path) if path.is_file() else {}
    except RobertaError:
        return {}
    return value if isinstance(value, dict) else {}


def fit_pair(first: list[int], second: list[int], limit: int, strategy: str = "longest_first") -> tuple[list, list]:
    """The two sentences' tokens (without specials) cut so that `<s> A </s></s> B </s>` has at most
    `limit` tokens, as Hugging Face's tokenizers cut them: "longest_first" takes from the longer one
    until both fit (splitting the budget evenly when both are long), "only_first" from A alone."""
    budget = limit - 4
    n1, n2 = len(first), len(second)
    if n1 + n2 <= budget:
        return first, second
    if strategy == "only_first":
        if n2 >= budget:
            raise RobertaError(f"the hypothesis has {n2} tokens, which leaves no room for the text within the "
                               f"model's {limit}; shorten the hypothesis template or the label")
        return first[:budget - n2], second
    keep1, keep2 = longest_first(n1, n2, budget)
    return first[:keep1], second[:keep2]


def encode_pair(tokenizer, first: str, second: str, limit: int, strategy: str = "longest_first") -> torch.Tensor:
    """`<s> A </s></s> B </s>` within `limit` tokens (see `fit_pair`)."""
    a, b = (tokenizer.encode(text, add_special_tokens=False) for text in (first, second))
    a, b = fit_pair(a, b, limit, strategy)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return torch.tensor([bos, *a, eos, eos, *b, eos], dtype=torch.long)


def hypothesis_pairs(tokenizer, text: str, hypotheses: list[list[int]], limit: int) -> tuple[list[torch.Tensor], bool]:
    """`<s> text </s></s> hypothesis </s>` for each hypothesis' token ids within `limit` tokens, the text
    cut to fit ("only_first", as the zero-shot pipeline cuts it), and whether the whole text fitted in
    every pair. The text is tokenized once, a chunk at a time, no further than the pairs can hold."""
    room = limit - 4 - min(map(len, hypotheses))  # the most of the text any pair holds
    ids: list[int] = []
    for chunk in tokenizer.ids_in_chunks(text):
        ids += chunk
        if len(ids) > room:
            break
    fits = all(len(ids) + len(h) + 4 <= limit for h in hypotheses)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pairs = []
    for hypothesis in hypotheses:
        first, second = fit_pair(ids, hypothesis, limit, "only_first")
        pairs.append(torch.tensor([bos, *first, eos, eos, *second, eos], dtype=torch.long))
    return pairs, fits


def nli_classes(labels: list[str] | None, head: str) -> tuple[int, int]:
    """(entailment, contradiction) class ids of an NLI head, as transformers' pipeline finds them."""
    entailment = next((i for i, name in enumerate(labels or []) if name.lower().startswith("entail")), None)
    if entailment is None or len(labels) < 2:
        raise RobertaError(f"head {head!r} has no entailment class (its labels: {labels or 'unnamed'}); zero-shot "
                           "needs an NLI head whose id2label names one, e.g. roberta-large-mnli")
    return entailment, len(labels) - 1 if entailment == 0 else 0


def zero_shot_scores(logits: torch.Tensor, entailment: int, contradiction: int, multi_label: bool) -> torch.Tensor:
    """[texts, labels] scores from the NLI logits [texts, labels, classes] of every (text, hypothesis)."""
    logits = logits.float()
    if multi_label or logits.shape[1] == 1:
        return logits[..., [contradiction, entailment]].softmax(-1)[..., 1]
    return logits[..., entailment].softmax(-1)


def ranked(scores: list[float], labels: list, top_k: int | None = None) -> list[tuple]:
    """(label, score) best first; equal scores keep their order (Python's stable sort, as CrossEncoder.rank)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return [(labels[i], scores[i]) for i in order[:top_k]]


def parse_labels(candidate_labels) -> list[str]:
    """A list of labels, or one comma-separated string of them (as the pipeline takes them)."""
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    labels = list(candidate_labels)
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise RobertaError("zero-shot needs at least one candidate label, each a non-empty text")
    seen = set()
    for label in labels:  # a label given twice would have its probability split between its copies
        if label in seen:
            raise RobertaError(f"candidate label {label!r} is given more than once; give each label once")
        seen.add(label)
    return labels


def hypotheses(labels: list[str], template: str) -> list[str]:
    """The hypothesis of each label: the template with the label in its one `{}` (or `{0}`).

    Only the plain placeholder is taken: str.format would also run a template's format spec (`{:>99999999}`
    builds a text that long), attribute and index lookups (`{0.__class__}`) and conversions, none of
    which a hypothesis needs, and a template may come from a server's client."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # an unmatched brace
        fields = []
    if len(fields) != 1 or fields[0][0] not in ("", "0") or fields[0][1] or fields[0][2]:
        raise RobertaError(f"the hypothesis template {template!r} needs one {{}} for the label (no other fields, "
                           f"format specs or conversions; {{{{ and }}}} for braces); e.g. {HYPOTHESIS!r}")
    return [template.format(label) for label in labels]

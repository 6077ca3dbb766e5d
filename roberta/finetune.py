"""Fine-tuning and evaluation on GLUE, SQuAD, RACE and the user's own labelled files.

`finetune(task, data_dir, model_dir, out_dir)` starts from a pretrained checkpoint (a masked-LM one is
fine: its encoder is kept and a new head initialised), trains with the published recipe of the task
(`recipe_for`), keeps the checkpoint with the best dev score in `out_dir`, and writes `metrics.jsonl`,
`curves.png`, `recipe.json` and `eval.json` there. The head is saved under the task's name
(`config.head_name`) so that `roberta.load(out_dir).predict('<task>', tokens)` finds it.

CPU runs stay practical because batches are grouped by length and padded to their longest member,
never to 512.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import tasks
from .device import resolve_device
from .errors import RobertaError
from .fileio import atomic_write
from .model import (RobertaClassificationHead, RobertaForMultipleChoice, RobertaForQuestionAnswering,
                    RobertaForSequenceClassification)

# --------------------------------------------------------------------------------------------------
# Recipes


@dataclass
class Recipe:
    """Every training setting in one place; `recipe.json` in the output directory is this, as JSON.

    `total_updates` and `warmup_updates` are the published ones for 10 epochs over the full training
    set; None derives them (epochs x batches per epoch, and 6% of that), which `recipe_for` does
    whenever the batch size, the epochs or the training set size are changed.
    """
    task: str
    lr: float = 1e-5
    batch_size: int = 32
    max_epochs: int = 10
    total_updates: int | None = None
    warmup_updates: int | None = None
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    clip_norm: float = 0.0
    dropout: float = 0.1
    max_len: int = 512
    seed: int = 1
    eval_every: int = 0                 # updates between dev evaluations; 0: at the end of each epoch
    log_every: int = 10
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    skip_bad_rows: bool = False
    device: str = "auto"
    # SQuAD
    doc_stride: int = 128
    max_answer_len: int = 30
    null_threshold: float = 0.0
    # the user's own data (task "custom")
    head_name: str | None = None        # default: the task's name in lower case
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    problem_type: str = "classification"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


# The fairseq README (examples/roberta/README.glue.md): lr, batch size, total and warmup updates; the
# rest (10 epochs, weight decay 0.1, Adam (0.9, 0.98) eps 1e-6, dropout 0.1) is common to all tasks.
GLUE_RECIPES = {
    "MNLI": (1e-5, 32, 123873, 7432), "QNLI": (1e-5, 32, 33112, 1986), "QQP": (1e-5, 32, 113272, 28318),
    "RTE": (2e-5, 16, 2036, 122), "SST-2": (1e-5, 32, 20935, 1256), "MRPC": (1e-5, 16, 2296, 137),
    "CoLA": (1e-5, 16, 5336, 320), "STS-B": (2e-5, 16, 3598, 214),
}
# The paper's appendix (Table 10) for SQuAD and RACE: linear decay after 6% warmup. (fairseq's
# README.race.md shows a variant: fixed lr, weight decay 0.01, 5 epochs; set those to reproduce it.)
# WNLI has no published recipe; it gets RTE's, the closest task in size and kind.
OTHER_RECIPES = {
    "squad": dict(lr=1.5e-5, batch_size=48, max_epochs=2, weight_decay=0.01, max_len=384),
    "race": dict(lr=1e-5, batch_size=16, max_epochs=4, weight_decay=0.1, max_len=512),
    "WNLI": dict(lr=2e-5, batch_size=16),
    "custom": dict(lr=1e-5, batch_size=32),
}
# Settings whose change makes the published update counts meaningless.
_SCHEDULE_INPUTS = ("batch_size", "max_epochs", "max_train_examples")


def task_name(task: str) -> str:
    """The canonical name: a GLUE task's own spelling, or 'squad', 'race', 'custom'."""
    if task.lower() in ("squad", "race", "custom"):
        return task.lower()
    return tasks.glue_task(task).name


def recipe_for(task: str, **overrides) -> Recipe:
    """The published recipe of `task` with `overrides` applied (unknown names are an error)."""
    name = task_name(task)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise RobertaError(f"unknown recipe setting(s) {sorted(unknown)}: see roberta.finetune.Recipe for the names")
    if name in GLUE_RECIPES:
        lr, batch, total, warmup = GLUE_RECIPES[name]
        base = dict(lr=lr, batch_size=batch, total_updates=total, warmup_updates=warmup)
    else:
        base = dict(OTHER_RECIPES[name])
    if any(k in overrides for k in _SCHEDULE_INPUTS) and "total_updates" not in overrides:
        base["total_updates"] = None
        if "warmup_updates" not in overrides:
            base["warmup_updates"] = None
    recipe = Recipe(task=name, **{**base, **overrides})
    recipe.adam_betas, recipe.text_columns = tuple(recipe.adam_betas), tuple(recipe.text_columns)
    return recipe


def parse_settings(pairs: list[str]) -> dict:
    """`--set key=value` pairs as recipe overrides, values parsed as JSON where they parse
    (`lr=2e-5`, `adam_betas=[0.9,0.98]`), else kept as strings (`problem_type=regression`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RobertaError(f"--set {pair!r}: expected key=value, e.g. --set lr=2e-5")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------------
# Batching: group by length, pad to the batch's longest


def length_grouped_batches(lengths, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Indices in batches of similar length. With `rng` (training) ties are broken at random and the
    batch order shuffled; without it (evaluation) the order is fixed."""
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = perm[np.argsort(lengths[perm], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad(seqs: list[list[int]], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: input ids and the attention mask (1 real, 0 padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_pairs(tokenizer, texts_a: list[str], texts_b: list[str | None], max_len: int) -> list[list[int]]:
    """`<s> a </s>` or `<s> a </s></s> b </s>`, cut to `max_len` tokens longest segment first."""
    if all(b is None for b in texts_b):
        return tokenizer.encode_batch(list(texts_a), max_length=max_len)
    return tokenizer.encode_batch(list(texts_a), pairs=[b or "" for b in texts_b], max_length=max_len)


# --------------------------------------------------------------------------------------------------
# Tasks: how each kind reads, encodes, batches and scores its data


class SentenceTask:
    """GLUE and the user's own files: one label (or score, or label set) per sentence or pair."""
    model_class = RobertaForSequenceClassification

    def __init__(self, recipe: Recipe, data_dir: Path, tokenizer, splits=("train", "dev"), id2label=None):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.glue = tasks.glue_task(recipe.task) if recipe.task != "custom" else None
        self.label_scale = 5.0 if recipe.task == "STS-B" else 1.0  # STS-B trains on scores scaled to [0, 1]
        if self.glue:
            self.problem_type = "regression" if self.glue.labels is None else "classification"
            self.labels = list(self.glue.labels) if self.glue.labels else None
        else:
            self.problem_type = recipe.problem_type
            self.labels = [id2label[i] for i in sorted(id2label)] if id2label and recipe.problem_type != "regression" else None
        self.files = {split: self._files(data_dir, split) for split in splits}
        self.data = {}
        for split, files in self.files.items():
            self.data[split] = [self._read(f) for f in files]

    def _files(self, data_dir: Path, split: str) -> list[Path]:
        if self.glue:
            return tasks.glue_split_files(self.glue, data_dir, split)
        found = [data_dir / f"{split}{ext}" for ext in (".csv", ".tsv", ".jsonl") if (data_dir / f"{split}{ext}").exists()]
        if len(found) != 1:
            raise RobertaError(f"{data_dir}: expected exactly one of {split}.csv, {split}.tsv, {split}.jsonl "
                               f"for the user's data, found {len(found)}")
        return found

    def _read(self, path: Path) -> list[tasks.Example]:
        r = self.recipe
        if self.glue:
            split = tasks.read_glue(self.glue, path, skip_bad_rows=r.skip_bad_rows)
        else:
            is_test = path.name.startswith("test")
            split, labels = tasks.read_table(path, list(r.text_columns), None if is_test else r.label_column,
                                             r.problem_type, labels=self.labels, skip_bad_rows=r.skip_bad_rows)
            self.labels = self.labels or labels
        if split.skipped:
            tqdm.write(f"{path}: skipped {split.skipped} bad rows")
        return split.examples

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.labels)

    def config_overrides(self) -> dict:
        problem = {"classification": "single_label_classification", "regression": "regression",
                   "multi_label": "multi_label_classification"}[self.problem_type]
        id2label = {i: name for i, name in enumerate(self.labels)} if self.labels else {0: "score"}
        return dict(num_labels=self.num_labels, id2label=id2label, problem_type=problem)

    def encode(self, examples) -> list:
        ids = encode_pairs(self.tokenizer, [e.text_a for e in examples], [e.text_b for e in examples], self.recipe.max_len)
        return [dict(ids=i, label=e.label, guid=e.guid) for i, e in zip(ids, examples)]

    def length(self, item) -> int:
        return len(item["ids"])

    def collate(self, items) -> dict:
        ids, mask = pad([it["ids"] for it in items], self.tokenizer.pad_token_id)
        batch = dict(input_ids=ids, attention_mask=mask)
        if items[0]["label"] is not None:
            batch["labels"] = self._labels([it["label"] for it in items])
        return batch

    def _labels(self, labels) -> torch.Tensor:
        if self.problem_type == "regression":
            return torch.tensor(labels, dtype=torch.float) / self.label_scale
        if self.problem_type == "multi_label":
            y = torch.zeros(len(labels), self.num_labels)
            for i, ls in enumerate(labels):
                y[i, ls] = 1.0
            return y
        return torch.tensor(labels, dtype=torch.long)

    def predict(self, model, items, device, batch_size) -> tuple[list, dict | None]:
        """Predictions (label index, score, or label-index list) and, if labelled, the metrics."""
        logits = forward_all(model, self, items, device, batch_size)["logits"].numpy()
        if self.problem_type == "regression":
            preds = list(logits[:, 0] * self.label_scale)
        elif self.problem_type == "multi_label":
            preds = [list(np.flatnonzero(row > 0)) for row in logits]  # sigmoid > 0.5
        else:
            preds = list(logits.argmax(-1))
        if items[0]["label"] is None:
            return preds, None
        labels = [it["label"] for it in items]
        if self.problem_type == "regression":
            return preds, tasks.regression_metrics(labels, preds)
        if self.problem_type == "multi_label":
            onehot = lambda ls: self._labels(ls).numpy().astype(int)  # noqa: E731
            return preds, tasks.multi_label_metrics(onehot(labels), onehot(preds))
        return preds, tasks.classification_metrics(labels, preds)

    def prediction_rows(self, items, preds) -> tuple[list[str], list[list]]:
        """GLUE's submission format: `index<TAB>prediction` with label names (scores for STS-B)."""
        def show(p):
            if self.problem_type == "regression":
                return f"{float(p):.3f}"
            if self.problem_type == "multi_label":
                return ",".join(self.labels[i] for i in p)
            return self.labels[int(p)]
        return ["index", "prediction"], [[it["guid"], show(p)] for it, p in zip(items, preds)]

    @property
    def metric(self) -> str:
        if self.glue:
            return self.glue.metric
        return {"classification": "accuracy", "regression": "pearson", "multi_label": "micro_f1"}[self.problem_type]


class SquadTask:
    """SQuAD v1.1 / v2.0: a start and an end per window of a long context; answers decoded to text."""
    model_class = RobertaForQuestionAnswering

    def __init__(self, recipe: Recipe, data_dir: Path, tokenizer, splits=("train", "dev"), id2label=None):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.files = {split: self._files(data_dir, split) for split in splits}
        self.data = {split: [tasks.read_squad(f, recipe.skip_bad_rows).examples for f in fs] for split, fs in self.files.items()}
        names = " ".join(f.name for fs in self.files.values() for f in fs)
        self.version_2 = "v2" in names or any(ex.is_impossible for fs in self.data.values() for d in fs for ex in d)
        self.metric = "f1"

    @staticmethod
    def _files(data_dir: Path, split: str) -> list[Path]:
        found = sorted(data_dir.glob(f"{split}*.json"))
        if len(found) != 1:
            raise RobertaError(f"{data_dir}: expected one {split}-v1.1.json or {split}-v2.0.json, found {len(found)}")
        return found

    def config_overrides(self) -> dict:
        return {}

    def encode(self, examples) -> list:
        def encode_with_offsets(text):
            return self.tokenizer.encode(text, add_special_tokens=False, return_offsets=True)

        features = tasks.squad_features(examples, encode_with_offsets, self.recipe.max_len,
                                        self.recipe.doc_stride, bos=self.tokenizer.bos_token_id,
                                        eos=self.tokenizer.eos_token_id)
        return [dict(ids=f.input_ids, feature=f, examples=examples) for f in features]

    def length(self, item) -> int:
        return len(item["ids"])

    def collate(self, items) -> dict:
        ids, mask = pad([it["ids"] for it in items], self.tokenizer.pad_token_id)
        return dict(input_ids=ids, attention_mask=mask,
                    start_positions=torch.tensor([it["feature"].start for it in items]),
                    end_positions=torch.tensor([it["feature"].end for it in items]))

    def predict(self, model, items, device, batch_size) -> tuple[dict, dict]:
        out = forward_all(model, self, items, device, batch_size)
        starts, ends = out["start_logits"].numpy(), out["end_logits"].numpy()
        examples = items[0]["examples"] if items else []
        r = self.recipe
        preds = tasks.squad_decode(examples, [it["feature"] for it in items], starts, ends,
                                   max_answer_len=r.max_answer_len, version_2=self.version_2, null_threshold=r.null_threshold)
        labelled = any(ex.answers or ex.is_impossible for ex in examples)
        return preds, tasks.squad_metrics(examples, preds) if labelled else None


class RaceTask:
    """RACE: four (article, question + option) sequences per question, one score each."""
    model_class = RobertaForMultipleChoice
    metric = "accuracy"

    def __init__(self, recipe: Recipe, data_dir: Path, tokenizer, splits=("train", "dev"), id2label=None):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.files = {split: [data_dir / split] for split in splits}
        self.data = {split: [tasks.read_race(data_dir / split, recipe.skip_bad_rows).examples] for split in splits}

    def config_overrides(self) -> dict:
        return {}

    def encode(self, examples) -> list:
        a = [ex.article for ex in examples for _ in range(4)]
        b = [tasks.race_option_text(ex.question, opt) for ex in examples for opt in ex.options]
        ids = encode_pairs(self.tokenizer, a, b, self.recipe.max_len)
        return [dict(ids=ids[4 * i: 4 * i + 4], label=ex.label, level=ex.level, guid=ex.guid) for i, ex in enumerate(examples)]

    def length(self, item) -> int:
        return max(len(s) for s in item["ids"])

    def collate(self, items) -> dict:
        ids, mask = pad([s for it in items for s in it["ids"]], self.tokenizer.pad_token_id)
        batch = dict(input_ids=ids.view(len(items), 4, -1), attention_mask=mask.view(len(items), 4, -1))
        if items[0]["label"] is not None:
            batch["labels"] = torch.tensor([it["label"] for it in items])
        return batch

    def predict(self, model, items, device, batch_size) -> tuple[list, dict | None]:
        preds = list(forward_all(model, self, items, device, batch_size)["logits"].argmax(-1).numpy())
        if items[0]["label"] is None:
            return preds, None
        return preds, tasks.race_metrics([it["label"] for it in items], preds, [it["level"] for it in items])

    def prediction_rows(self, items, preds):
        return ["id", "answer"], [[it["guid"], "ABCD"[int(p)]] for it, p in zip(items, preds)]


def load_task(recipe: Recipe, data_dir, tokenizer, splits=("train", "dev"), id2label=None):
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RobertaError(f"{data_dir} is not a directory: --data takes the task's data directory, e.g. glue_data/SST-2")
    kind = {"squad": SquadTask, "race": RaceTask}.get(recipe.task, SentenceTask)
    return kind(recipe, data_dir, tokenizer, splits, id2label)


def forward_all(model, task, items, device, batch_size: int) -> dict[str, torch.Tensor]:
    """The model's logits for every item, in the items' order, computed in length-grouped batches.
    Per-token logits (SQuAD) from batches of different lengths are padded with -inf."""
    model.eval()
    batches = length_grouped_batches([task.length(it) for it in items], batch_size)
    parts: dict[str, list] = {}
    with torch.no_grad():
        for index in batches:
            batch = task.collate([items[i] for i in index])
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            for name in ("logits", "start_logits", "end_logits"):
                if getattr(out, name) is not None:
                    parts.setdefault(name, []).append(getattr(out, name).float().cpu())
    order = torch.as_tensor(np.argsort(np.concatenate(batches)), dtype=torch.long)
    result = {}
    for name, tensors in parts.items():
        if name != "logits":
            T = max(t.shape[-1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, T - t.shape[-1]), value=-math.inf) for t in tensors]
        result[name] = torch.cat(tensors)[order]
    return result


# --------------------------------------------------------------------------------------------------
# Training


def _checkpoint(model_dir, tokenizer):
    """A local checkpoint for a path or a model name (`roberta.base` is downloaded once), and its
    tokenizer unless one is given."""
    from .hub import load_tokenizer, resolve

    path = resolve(model_dir)
    return path, tokenizer or load_tokenizer(path)


def _split_metrics(task, files: list[Path], items_per_file: list[list], model, device, batch_size):
    """Predictions and metrics for each file of a split; with several files (MNLI's matched and
    mismatched dev sets) each metric is prefixed by the file's name without 'dev_'/'test_'."""
    preds, merged = [], {}
    for path, items in zip(files, items_per_file):
        if not items:
            raise RobertaError(f"{path} has no examples to evaluate")
        p, metrics = task.predict(model, items, device, batch_size)
        preds.append(p)
        if metrics is not None:
            prefix = "" if len(files) == 1 else path.stem.split("_", 1)[-1] + "_"
            merged.update({prefix + k: v for k, v in metrics.items()})
    return preds, merged


def _score_key(task, files: list[Path]) -> str:
    return task.metric if len(files) == 1 else files[0].stem.split("_", 1)[-1] + "_" + task.metric


def _task_model(data, model_dir, head_name: str, dropout: float):
    """The task's model on the checkpoint's encoder. A sentence task gets a fresh head unless the
    checkpoint's head is already this task's (same name and size): starting RTE from an MNLI model,
    as the paper does, replaces the 3-way `mnli` head with a new 2-way `rte` one."""
    model = data.model_class.from_pretrained(model_dir, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = model.config
    fields = data.config_overrides()
    if fields:
        keep = config.head_name == head_name and config.num_labels == fields["num_labels"]
        for key, value in fields.items():
            setattr(config, key, value)
        config.__post_init__()
        if not keep:
            model.classifier = RobertaClassificationHead(config, config.num_labels)
            model.classifier.apply(model._init_weights)
            model.num_labels = config.num_labels
    config.head_name = head_name
    return model


def _fit_max_len(recipe: Recipe, model) -> Recipe:
    """A model pretrained on shorter inputs than the recipe's max_len takes inputs cut to its length."""
    if recipe.max_len <= model.config.max_tokens:
        return recipe
    return dataclasses.replace(recipe, max_len=model.config.max_tokens)


def finetune(task: str, data_dir, model_dir, out_dir, recipe: Recipe | None = None, tokenizer=None,
             **overrides) -> dict:
    """Fine-tune `model_dir` on `task` and return the best dev metrics (also in `out_dir/eval.json`)."""
    recipe = recipe or recipe_for(task, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    device = resolve_device(recipe.device)
    model_dir, tokenizer = _checkpoint(model_dir, tokenizer)
    data = load_task(recipe, data_dir, tokenizer)
    head_name = recipe.head_name or recipe.task.lower()
    model = _task_model(data, model_dir, head_name, recipe.dropout).to(device)
    recipe = data.recipe = _fit_max_len(recipe, model)
    atomic_write(out / "recipe.json", recipe.to_json())

    train_examples = data.data["train"][0]
    if recipe.max_train_examples and recipe.max_train_examples < len(train_examples):
        keep = np.sort(rng.choice(len(train_examples), recipe.max_train_examples, replace=False))
        train_examples = [train_examples[i] for i in keep]
    if not train_examples:
        raise RobertaError(f"{data.files['train'][0]} has no training examples")
    train = data.encode(train_examples)
    dev = [data.encode(d[: recipe.max_dev_examples]) for d in data.data["dev"]]

    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = recipe.total_updates or steps_per_epoch * recipe.max_epochs
    warmup = recipe.warmup_updates if recipe.warmup_updates is not None else round(0.06 * total)
    updates = min(total, steps_per_epoch * recipe.max_epochs)

    def lr_factor(step):  # fairseq's polynomial_decay with power 1: linear warmup, linear decay to 0
        return step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    # fairseq applies weight decay to every parameter, decoupled from the gradient, as AdamW does.
    # The fused kernel matters on CPU: the 50K-row embedding makes the per-tensor loop the slowest step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.adam_betas,
                                  eps=recipe.adam_eps, weight_decay=recipe.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + 1))

    lengths = [data.length(it) for it in train]
    score_key = _score_key(data, data.files["dev"])
    best = {"score": -math.inf, "step": 0, "metrics": {}}
    log_path = out / "metrics.jsonl"
    log = open(log_path, "w", encoding="utf-8")

    def evaluate_dev(step, epoch):
        _, metrics = _split_metrics(data, data.files["dev"], dev, model, device, recipe.batch_size)
        log.write(json.dumps({"step": step, "epoch": epoch, "dev": metrics}) + "\n")
        log.flush()
        score = metrics[score_key]
        tqdm.write(f"step {step} epoch {epoch}: dev {score_key} {score:.4f}")
        if score > best["score"]:
            best.update(score=score, step=step, metrics=metrics)
            model.save_pretrained(out, tokenizer=tokenizer)

    step, loss_sum, tokens, train_time = 0, 0.0, 0, 0.0  # train_time leaves the dev evaluations out
    bar = tqdm(total=updates, desc=f"finetune {recipe.task}", unit="upd", dynamic_ncols=True)
    try:
        for epoch in range(1, recipe.max_epochs + 1):
            for index in length_grouped_batches(lengths, recipe.batch_size, rng):
                if step >= updates:
                    break
                t0 = time.perf_counter()
                model.train()
                batch = {k: v.to(device) for k, v in data.collate([train[i] for i in index]).items()}
                loss = model(**batch).loss
                loss.backward()
                if recipe.clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
                train_time += time.perf_counter() - t0
                bar.update(1)
                if step % recipe.log_every == 0 or step == updates:
                    n = step % recipe.log_every or recipe.log_every
                    record = {"step": step, "epoch": epoch, "loss": loss_sum / n,
                              "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens / train_time}
                    log.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    loss_sum, tokens, train_time = 0.0, 0, 0.0
                if recipe.eval_every and step % recipe.eval_every == 0:
                    evaluate_dev(step, epoch)
            if not recipe.eval_every or step % recipe.eval_every:
                evaluate_dev(step, epoch)
            if step >= updates:
                break
    finally:
        bar.close()
        log.close()
    result = {"task": recipe.task, "head_name": head_name, "metric": score_key, "best_step": best["step"],
              "updates": step, "dev": best["metrics"]}
    atomic_write(out / "eval.json", json.dumps(result, indent=2) + "\n")
    plot_curves(log_path, out / "curves.png")
    return result


def plot_curves(metrics_jsonl, png) -> None:
    """Training loss and every dev metric against updates, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(metrics_jsonl, encoding="utf-8") if line.strip()]
    train = [r for r in records if "loss" in r]
    dev = [r for r in records if "dev" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax1.set(xlabel="update", ylabel="training loss", title="loss")
    for name in (dev[0]["dev"] if dev else {}):
        if name not in ("mse", "total"):
            ax2.plot([r["step"] for r in dev], [r["dev"][name] for r in dev], marker="o", label=name)
    ax2.set(xlabel="update", title="dev metrics")
    if dev:
        ax2.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic_write(png, image.getvalue())


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(task: str, data_dir, model_dir, split: str = "dev", predictions=None, out_file=None,
             batch_size: int = 32, tokenizer=None, **overrides) -> dict:
    """Score a fine-tuned model on a split ('dev', or 'test' for predictions only). Writes the metrics
    to `out_file` (JSON) and, with `predictions`, the per-example predictions in the leaderboard's
    format: GLUE `index<TAB>prediction` TSV with label names, SQuAD JSON {id: answer}, RACE
    `id<TAB>answer` letters; one file per data file (MNLI's matched/mismatched get a suffix)."""
    recipe = recipe_for(task, **overrides)
    device = resolve_device(recipe.device)
    model_dir, tokenizer = _checkpoint(model_dir, tokenizer)
    kind = {"squad": SquadTask, "race": RaceTask}.get(recipe.task, SentenceTask)
    model = kind.model_class.from_pretrained(model_dir).to(device)
    recipe = _fit_max_len(recipe, model)
    data = load_task(recipe, data_dir, tokenizer, splits=(split,), id2label=model.config.id2label)
    if isinstance(data, SentenceTask) and model.config.num_labels != data.num_labels:
        raise RobertaError(f"{model_dir} has {model.config.num_labels} outputs but {recipe.task} needs "
                           f"{data.num_labels}: is this checkpoint fine-tuned on {recipe.task}?")
    files = data.files[split]
    items = [data.encode(examples[: recipe.max_dev_examples]) for examples in data.data[split]]
    preds, metrics = _split_metrics(data, files, items, model, device, batch_size)
    result = {"task": recipe.task, "split": split, "model": str(model_dir), "metrics": metrics}
    if out_file:
        atomic_write(Path(out_file), json.dumps(result, indent=2) + "\n")
    if predictions:
        for path, its, p in zip(files, items, preds):
            target = Path(predictions)
            if len(files) > 1:
                target = target.with_name(f"{target.stem}-{path.stem.split('_', 1)[-1]}{target.suffix}")
            if isinstance(data, SquadTask):
                atomic_write(target, json.dumps(p, indent=2, ensure_ascii=False) + "\n")
            else:
                header, rows = data.prediction_rows(its, p)
                atomic_write(target, "".join("\t".join(map(str, r)) + "\n" for r in [header] + rows))
    return result

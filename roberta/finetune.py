"""Fine-tuning and evaluation on GLUE, SQuAD, RACE and the user's own labelled files.

`finetune(task, data_dir, model, out_dir)` starts from a pretrained model (anything `roberta.load`
opens; a masked-LM checkpoint is fine: its encoder is kept and a new head initialised), trains with
the published recipe of the task (`recipe_for`) on the shared training layer (`roberta/train.py`:
fp32/bf16/fp16, accumulation, DDP under torchrun, checksummed checkpoints and exact resume), and
writes in `out_dir`:

    recipe.json     the settings;  metrics.jsonl, curves.png: the plan, the training log, dev scores
    sources.json    the content identity (xxh3-128) of the data files and of the model it started from,
                    which `--resume` checks: other bytes under the same names are refused
    model/          the checkpoint with the best dev score (written whole or not at all), its head
                    saved under the task's name so that `roberta.load(out/model).predict(task, ...)` finds it
    checkpoints/    the latest training state, for `--resume` after a crash or kill -9
    eval.json       the best dev metrics

The update counts are derived from the data actually read (epochs x updates per epoch, 6% warmup)
unless set: fairseq's published counts belong to the official training sets. CPU runs stay practical
because batches are grouped by length and padded to their longest member, never to 512.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import tasks
from .checkpoint import is_checkpoint_file, load_model
from .errors import RobertaError
from .fileio import atomic_write, check_output, content_digest, read_json
from .inference import length_batches, pad_batch
from .model import RobertaForMultipleChoice, RobertaForQuestionAnswering, RobertaForSequenceClassification
from .train import (check_reproducible, PRECISIONS, Dist, Metrics, Settings, adamw, load_checkpoint, lr_at, micro_steps,
                    precision_context, prepare_run_dir, save_checkpoint, set_lr, setup_distributed, train_step, unwrap,
                    wrap_ddp, write_dir)

# --------------------------------------------------------------------------------------------------
# Recipes


@dataclass
class Recipe(Settings):
    """Every fine-tuning setting in one place; `recipe.json` in the output directory is this, as JSON.
    The names are those of pretraining (`PretrainConfig`) wherever the setting is the same."""
    task: str = "custom"
    lr: float | None = None             # None: the task's published rate, adapted to the model's size
    batch_size: int = 32                # examples per update, over all processes and micro-steps
    update_freq: int = 1                # micro-steps per update (gradient accumulation)
    max_epochs: int = 10
    total_updates: int | None = None    # None: epochs x updates per epoch of the data actually read
    warmup_updates: int | None = None   # None: 6% of total_updates
    weight_decay: float = 0.1           # not on biases and LayerNorm weights
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    clip_norm: float = 0.0
    dropout: float = 0.1
    max_len: int = 512
    precision: str = "fp32"             # fp32, bf16, or fp16 (with dynamic loss scaling)
    seed: int = 1
    eval_every: int = 0                 # updates between dev evaluations; 0: at the end of each epoch
    patience: int = 0                   # stop after this many evaluations without a better dev score; 0: never
    save_every: int = 0                 # updates between training checkpoints; 0: at each evaluation
    log_every: int = 10
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    skip_bad_rows: bool = False
    device: str = "auto"                # under torchrun, each process takes the GPU of its LOCAL_RANK
    # SQuAD
    doc_stride: int = 128
    max_answer_len: int = 30
    null_threshold: float = 0.0
    # the user's own data (task "custom")
    head_name: str | None = None        # default: the task's name in lower case
    text_columns: tuple[str, ...] = ("text",)  # names, or positions counted from 0 (`1`)
    label_column: str = "label"
    header: str = "auto"                # auto: a header line when columns are named, none when numbered
    problem_type: str = "classification"

    WHAT = "recipe setting"
    RANGES = dict(lr=(0.0, None), batch_size=(1, None), update_freq=(1, None), max_epochs=(1, None),
                  total_updates=(1, None), warmup_updates=(0, None), weight_decay=(0.0, None),
                  adam_betas=(0.0, 0.999999), adam_eps=(0.0, 1.0), clip_norm=(0.0, None), dropout=(0.0, 0.99),
                  max_len=(8, 4096), seed=(0, 2**63 - 1), eval_every=(0, None), patience=(0, None),
                  save_every=(0, None), log_every=(1, None), max_train_examples=(1, None),
                  max_dev_examples=(1, None), doc_stride=(1, None), max_answer_len=(1, None))
    CHOICES = dict(precision=PRECISIONS, problem_type=tasks.PROBLEM_TYPES, header=("auto", "yes", "no"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# The fairseq README (examples/roberta/README.glue.md): lr, batch size, and the total and warmup updates
# of 10 epochs over the official training set; the rest (weight decay 0.1, Adam (0.9, 0.98) eps 1e-6,
# dropout 0.1) is common to all tasks. The counts are shown beside the plan, not used: a run derives its
# own from the data it reads, unless total_updates / warmup_updates are set.
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
# The warmup of every recipe without warmup_updates: the first 6% of the updates (the paper, Appendix C).
WARMUP_RATIO = 0.06
# Settings that may change when a run is resumed: they do not alter what is computed.
CHANGEABLE_ON_RESUME = {"log_every", "device"}


def task_name(task: str) -> str:
    """The canonical name: a GLUE task's own spelling, or 'squad', 'race', 'custom'."""
    if task.lower() in ("squad", "race", "custom"):
        return task.lower()
    return tasks.glue_task(task).name


def published(task: str) -> dict:
    """The published recipe of `task`: lr, batch_size (and for GLUE total and warmup updates)."""
    name = task_name(task)
    if name in GLUE_RECIPES:
        lr, batch, total, warmup = GLUE_RECIPES[name]
        return dict(lr=lr, batch_size=batch, total_updates=total, warmup_updates=warmup)
    return dict(OTHER_RECIPES[name])


def recipe_for(task: str, **overrides) -> Recipe:
    """The published recipe of `task` with `overrides` applied (old names renamed, unknown ones refused)."""
    base = {k: v for k, v in published(task).items() if k not in ("lr", "total_updates", "warmup_updates")}
    return Recipe.from_dict({"task": task_name(task), **base, **overrides})


def default_lr(recipe: Recipe, model) -> tuple[float, str]:
    """The peak learning rate and a line saying where it comes from. The published rates are for
    base and large (768 and 1024 wide); a narrower model learns nothing at them (a 64-wide model stays
    at chance at 1e-5 and learns at 1e-3), so they are scaled by (768 / width)^2, at most 1e-3."""
    if recipe.lr is not None:
        return recipe.lr, f"lr {recipe.lr:g} (set)"
    rate, width = published(recipe.task)["lr"], model.config.hidden_size
    if width >= 768:
        return rate, f"lr {rate:g} (published)"
    scaled = min(1e-3, max(rate, rate * (768 / width) ** 2))
    return scaled, (f"lr {scaled:g}: the published {rate:g} is for base/large; this {width}-wide model gets "
                    f"it x (768/{width})^2, at most 1e-3 (set lr to choose)")


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
                                             r.problem_type, labels=self.labels, skip_bad_rows=r.skip_bad_rows,
                                             header={"auto": None, "yes": True, "no": False}[r.header])
            self.labels = self.labels or labels
        if split.skipped:
            tqdm.write(f"{path}: skipped {split.skipped} bad rows")
        if path.name.startswith("train") and not split.examples:  # before dev is read against its labels
            raise RobertaError(f"{path} has no training examples{' left' if split.skipped else ''}: give it rows "
                               f"under its header")
        classes = {e.label for e in split.examples} if self.problem_type == "classification" else None
        if path.name.startswith("train") and classes is not None and len(classes) < 2:
            name = self.labels[next(iter(classes))] if self.labels and isinstance(next(iter(classes)), int) else \
                next(iter(classes))
            raise RobertaError(f"{path} holds one class only ({name!r}), so there is nothing to learn and every "
                               f"prediction would be right: give examples of at least two classes")
        return split.examples

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.labels)

    def config_overrides(self) -> dict:
        problem = {"classification": "single_label_classification", "regression": "regression",
                   "multi_label": "multi_label_classification"}[self.problem_type]
        names = (self.glue.names or self.glue.labels) if self.glue and self.labels else self.labels
        id2label = {i: name for i, name in enumerate(names)} if names else {0: "score"}
        return dict(num_labels=self.num_labels, id2label=id2label, problem_type=problem)

    def encode(self, examples) -> list:
        ids = encode_pairs(self.tokenizer, [e.text_a for e in examples], [e.text_b for e in examples], self.recipe.max_len)
        return [dict(ids=i, label=e.label, guid=e.guid) for i, e in zip(ids, examples)]

    def length(self, item) -> int:
        return len(item["ids"])

    def collate(self, items) -> dict:
        ids, mask = pad_batch([it["ids"] for it in items], self.tokenizer.pad_token_id)
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

    def predict(self, model, items, device, batch_size, autocast=None, d=None) -> tuple[list, dict | None]:
        """Predictions (label index, score, or label-index list) and, if labelled, the metrics."""
        logits = forward_all(model, self, items, device, batch_size, autocast, d)["logits"].numpy()
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
        ids, mask = pad_batch([it["ids"] for it in items], self.tokenizer.pad_token_id)
        return dict(input_ids=ids, attention_mask=mask,
                    start_positions=torch.tensor([it["feature"].start for it in items]),
                    end_positions=torch.tensor([it["feature"].end for it in items]))

    def predict(self, model, items, device, batch_size, autocast=None, d=None) -> tuple[dict, dict]:
        out = forward_all(model, self, items, device, batch_size, autocast, d)
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
        return dict(id2label=dict(enumerate("ABCD")))  # the options' letters, as RACE's answers name them

    def encode(self, examples) -> list:
        a = [ex.article for ex in examples for _ in range(4)]
        b = [tasks.race_option_text(ex.question, opt) for ex in examples for opt in ex.options]
        ids = encode_pairs(self.tokenizer, a, b, self.recipe.max_len)
        return [dict(ids=ids[4 * i: 4 * i + 4], label=ex.label, level=ex.level, guid=ex.guid) for i, ex in enumerate(examples)]

    def length(self, item) -> int:
        return max(len(s) for s in item["ids"])

    def collate(self, items) -> dict:
        ids, mask = pad_batch([s for it in items for s in it["ids"]], self.tokenizer.pad_token_id)
        batch = dict(input_ids=ids.view(len(items), 4, -1), attention_mask=mask.view(len(items), 4, -1))
        if items[0]["label"] is not None:
            batch["labels"] = torch.tensor([it["label"] for it in items])
        return batch

    def predict(self, model, items, device, batch_size, autocast=None, d=None) -> tuple[list, dict | None]:
        preds = list(forward_all(model, self, items, device, batch_size, autocast, d)["logits"].argmax(-1).numpy())
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


def forward_all(model, task, items, device, batch_size: int, autocast=None, d: Dist | None = None
                ) -> dict[str, torch.Tensor]:
    """The model's logits for every item, in the items' order, computed in length-grouped batches
    (under the training precision's `autocast`, if given). Per-token logits (SQuAD) from batches of
    different lengths are padded with -inf.

    Under torchrun (`d` of more than one process, the model not sharded) each process computes every
    world-th batch and the processes exchange the results: each gets every logit, computed in the same
    batches as by one process alone."""
    model.eval()
    batches = length_batches([task.length(it) for it in items], batch_size=batch_size)
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    outputs: dict[int, dict[str, torch.Tensor]] = {}  # batch number -> its logits, on the CPU
    with torch.no_grad():
        for j in range(rank, len(batches), world):
            batch = task.collate([items[i] for i in batches[j]])
            with autocast or contextlib.nullcontext():
                out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            outputs[j] = {name: getattr(out, name).float().cpu() for name in ("logits", "start_logits", "end_logits")
                          if getattr(out, name) is not None}
    if world > 1:
        outputs = {j: logits for part in d.all_gather(outputs) for j, logits in part.items()}
    parts: dict[str, list] = {}
    for j in range(len(batches)):
        for name, logits in outputs[j].items():
            parts.setdefault(name, []).append(logits)
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


def open_task_model(model_name, model_class, files: bool = False, **config):
    """A task model and its tokenizer, opened as `roberta.load` opens a model (a name, a directory, an
    archive); which head it starts from is decided in one place, `checkpoint.load_model`. `files`:
    also the content identity of the checkpoint's files (config, weights, tokenizer)."""
    from .hub import opened

    with opened(model_name) as (directory, tokenizer):
        model = load_model(model_class, directory, **config)
        if not files:
            return model, tokenizer
        return model, tokenizer, content_digest(sorted(f for f in directory.rglob("*") if f.is_file() and
                                                       is_checkpoint_file(f.relative_to(directory).parts[0])))


SOURCES = "sources.json"  # what a run trains on: the content identity of its data files and its model


def _check_sources(saved: Path, sources: dict) -> None:
    """A resumed run must read the data and start from the model it started with, by content: the
    same names with other bytes would mix two trainings in one run."""
    if not saved.is_file():
        return  # a run from before sources were recorded
    recorded = read_json(saved)
    names = {"data": "--data (the task's files)", "model": "--model (its checkpoint files)"}
    changed = [what for what in names if recorded.get(what) != sources[what]]
    if changed:
        raise RobertaError(f"{' and '.join(names[what] for what in changed)} differ in content from what the run in "
                           f"{saved.parent} started with; resume with the run's own {' and '.join(changed)}, or start "
                           f"a new run in another --out")


def _split_metrics(task, files: list[Path], items_per_file: list[list], model, device, batch_size, autocast=None,
                   d: Dist | None = None):
    """Predictions and metrics for each file of a split; with several files (MNLI's matched and
    mismatched dev sets) each metric is prefixed by the file's name without 'dev_'/'test_'. Under
    torchrun (`d`) the processes share the batches (`forward_all`) and each gets the results."""
    preds, merged = [], {}
    for path, items in zip(files, items_per_file):
        if not items:
            raise RobertaError(f"{path} has no examples to evaluate")
        p, metrics = task.predict(model, items, device, batch_size, autocast, d)
        preds.append(p)
        if metrics is not None:
            prefix = "" if len(files) == 1 else path.stem.split("_", 1)[-1] + "_"
            merged.update({prefix + k: v for k, v in metrics.items()})
    return preds, merged


def _score_key(task, files: list[Path]) -> str:
    return task.metric if len(files) == 1 else files[0].stem.split("_", 1)[-1] + "_" + task.metric


def _fit_max_len(recipe: Recipe, model) -> Recipe:
    """A model pretrained on shorter inputs than the recipe's max_len takes inputs cut to its length."""
    return recipe if recipe.max_len <= model.config.max_tokens else recipe.replace(max_len=model.config.max_tokens)


def epoch_batches(lengths, recipe: Recipe, epoch: int, parts: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch) so that a resumed run sees the same
    ones; a last batch too small to give every process and micro-step one example is dropped."""
    batches = length_batches(lengths, batch_size=recipe.batch_size, rng=np.random.default_rng([recipe.seed, epoch]))
    return [b for b in batches if len(b) >= parts]


def finetune(task: str, data_dir, model_dir, out_dir, recipe: Recipe | None = None, resume: bool | str = False,
             **overrides) -> dict:
    """Fine-tune `model_dir` on `task` and return the best dev metrics (also in `out_dir/eval.json`)."""
    recipe = recipe or recipe_for(task, **overrides)
    out = Path(out_dir)
    check_output(out, model_dir)  # never into (or over) the model it starts from
    d = setup_distributed(recipe.device)
    recipe, ckpt = prepare_run_dir(recipe, out, "recipe.json", resume, CHANGEABLE_ON_RESUME)
    micro, accum = micro_steps(recipe.batch_size, 0, recipe.update_freq, d.world)
    head_name = recipe.head_name or recipe.task.lower()
    data = load_task(recipe, data_dir, None)
    torch.manual_seed(recipe.seed)  # the new head's initial weights, the same on every process
    model, tokenizer, model_files = open_task_model(
        model_dir, data.model_class, files=True, head_name=head_name, **data.config_overrides(),
        hidden_dropout_prob=recipe.dropout, attention_probs_dropout_prob=recipe.dropout)
    sources = {"data": content_digest([f for split in data.files.values() for f in split]),
               "model": model_files}
    if resume:
        _check_sources(out / SOURCES, sources)
    data.tokenizer = tokenizer
    model = model.to(d.device).train()
    torch.manual_seed(recipe.seed + 1 + d.rank)  # each process its own dropout stream
    data.recipe = _fit_max_len(recipe, model)

    train_examples = data.data["train"][0]
    if recipe.max_train_examples and recipe.max_train_examples < len(train_examples):
        keep = np.sort(np.random.default_rng(recipe.seed).choice(len(train_examples), recipe.max_train_examples,
                                                                 replace=False))
        train_examples = [train_examples[i] for i in keep]
    if not train_examples:
        raise RobertaError(f"{data.files['train'][0]} has no training examples")
    train, dev = data.encode(train_examples), [data.encode(x[: recipe.max_dev_examples]) for x in data.data["dev"]]
    lengths = [data.length(it) for it in train]

    # ---- the plan, from the data actually read
    per_epoch = len(epoch_batches(lengths, recipe, 1, accum * d.world))
    if per_epoch == 0:
        raise RobertaError(f"{len(train)} training examples cannot fill one update of {accum * d.world} "
                           "micro-batches: lower update_freq or use fewer processes")
    total = recipe.total_updates or per_epoch * recipe.max_epochs
    warmup = recipe.warmup_updates if recipe.warmup_updates is not None else round(WARMUP_RATIO * total)
    updates = min(total, per_epoch * recipe.max_epochs)
    lr, lr_note = default_lr(recipe, model)
    pub = published(recipe.task)
    plan = {"rows": len(train_examples), "updates_per_epoch": per_epoch, "epochs": recipe.max_epochs,
            "total_updates": total, "warmup_updates": warmup, "updates": updates, "lr": lr,
            "batch": f"{recipe.batch_size} = {micro} x {accum} micro-steps x {d.world} process(es)",
            "max_len": data.recipe.max_len, "precision": recipe.precision, "device": str(d.device)}

    model = wrap_ddp(model, d)
    optimizer = adamw(model, lr, recipe.adam_betas, recipe.adam_eps, recipe.weight_decay)
    autocast, scaler = precision_context(recipe.precision, d.device)
    check_reproducible(d)
    trainer = load_checkpoint(ckpt, model, optimizer, scaler, d) if ckpt else {}
    step, best, bad_evals = int(trainer.get("step", 0)), trainer.get("best", {"score": -math.inf, "step": 0, "metrics": {}}), \
        int(trainer.get("bad_evals", 0))
    metrics = Metrics(out, d.main)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "recipe.json", recipe.to_json())
        atomic_write(out / SOURCES, json.dumps(sources, indent=2) + "\n")
        metrics.truncate(step)
        if not step:
            metrics.log(step=0, plan=plan)
        published_counts = (f"; the published {pub['total_updates']}/{pub['warmup_updates']} are for the official "
                            "training set (set total_updates, warmup_updates to use them)") if "total_updates" in pub \
            and recipe.total_updates is None else ""
        print(f"fine-tuning {recipe.task} on {len(train_examples)} rows: {per_epoch} updates/epoch of {plan['batch']}, "
              f"{updates} updates ({warmup} warmup, decay to 0 at {total}){published_counts}; {lr_note}; "
              f"{recipe.precision} on {d.device}" + (f"; resuming at update {step}" if step else ""))

    score_key = _score_key(data, data.files["dev"])

    def evaluate_dev(done: int) -> bool:
        """Score the dev set (the processes share its batches, and each gets the score: they all decide on
        stopping); True when the patience ran out."""
        nonlocal best, bad_evals
        _, result = _split_metrics(data, data.files["dev"], dev, unwrap(model), d.device, micro, autocast, d)
        model.train()
        metrics.log(step=done, epoch=-(-done // per_epoch), dev=result)
        score = result[score_key]
        if d.main:
            tqdm.write(f"update {done}: dev {score_key} {score:.4f}")
        if score > best["score"]:
            best, bad_evals = {"score": score, "step": done, "metrics": result}, 0
            if d.main:
                write_dir(out / "model", lambda tmp: unwrap(model).save_pretrained(tmp, tokenizer=tokenizer))
        else:
            bad_evals += 1
        return bool(recipe.patience) and bad_evals >= recipe.patience

    stop = bool(recipe.patience) and bad_evals >= recipe.patience
    bar = tqdm(total=updates, initial=step, desc=f"finetune {recipe.task}", unit="upd", dynamic_ncols=True,
               disable=not d.main)
    window = {"loss": 0.0, "tokens": 0, "n": 0, "time": 0.0}  # time leaves the dev evaluations out
    train_seconds = 0.0
    batches, batches_epoch = None, 0
    while step < updates and not stop:
        epoch, position = divmod(step, per_epoch)
        if batches_epoch != epoch + 1:
            batches, batches_epoch = epoch_batches(lengths, recipe, epoch + 1, accum * d.world), epoch + 1
        index = batches[position]
        parts = np.array_split(index, accum * d.world)[d.rank * accum:(d.rank + 1) * accum]
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, lr, warmup, total))
        loss, grad_norm, tokens = train_step(model, optimizer, scaler, autocast,
                                             [data.collate([train[i] for i in part]) for part in parts],
                                             [len(part) / len(index) for part in parts], d, recipe.clip_norm, step)
        step += 1
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        window = {"loss": window["loss"] + loss, "tokens": window["tokens"] + tokens, "n": window["n"] + 1,
                  "time": window["time"] + seconds}
        bar.update(1)
        if step % recipe.log_every == 0 or step == updates:
            (all_tokens,) = d.all_sum([window["tokens"]])
            entry = {"step": step, "epoch": epoch + 1, "loss": window["loss"] / window["n"],
                     "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": all_tokens / window["time"],
                     "grad_norm": grad_norm}
            metrics.log(**entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
            window = {"loss": 0.0, "tokens": 0, "n": 0, "time": 0.0}
        evaluated = (recipe.eval_every and step % recipe.eval_every == 0) or step % per_epoch == 0 or step == updates
        if evaluated:
            stop = evaluate_dev(step)
        if (recipe.save_every and step % recipe.save_every == 0) or (not recipe.save_every and evaluated) or \
                step == updates or stop:
            save_checkpoint(out, step, model, optimizer, scaler, d, 1, {"best": best, "bad_evals": bad_evals},
                            lambda state, tmp: unwrap(model).save_pretrained(tmp, tokenizer=tokenizer))
    bar.close()
    result = {"task": recipe.task, "head_name": head_name, "metric": score_key, "best_step": best["step"],
              "updates": step, "stopped_early": stop and step < updates, "dev": best["metrics"], "plan": plan,
              "train_seconds": round(train_seconds, 3)}
    if d.main:
        atomic_write(out / "eval.json", json.dumps(result, indent=2) + "\n")
        metrics.plot()
    d.barrier()
    d.close()
    return result


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(task: str, data_dir, model_dir, split: str = "dev", predictions=None, out_file=None,
             batch_size: int = 32, recipe: Recipe | None = None, **overrides) -> dict:
    """Score a fine-tuned model on a split ('dev', or 'test' for predictions only). Writes the metrics
    to `out_file` (JSON) and, with `predictions`, the per-example predictions in the leaderboard's
    format: GLUE `index<TAB>prediction` TSV with label names, SQuAD JSON {id: answer}, RACE
    `id<TAB>answer` letters; one file per data file (MNLI's matched/mismatched get a suffix)."""
    recipe = recipe or recipe_for(task, **overrides)
    for target in (predictions, out_file):  # before any work: where the results go must exist
        if target and not Path(target).parent.is_dir():
            raise RobertaError(f"cannot write {target}: the directory {Path(target).parent} does not exist")
    d = setup_distributed(recipe.device)
    device = d.device
    kind = {"squad": SquadTask, "race": RaceTask}.get(recipe.task, SentenceTask)
    model, tokenizer = open_task_model(model_dir, kind.model_class,
                                       **({"head_name": recipe.head_name} if recipe.head_name else {}))
    head = "qa_outputs." if kind is SquadTask else "classifier."
    if any(k.startswith(head) for k in model.missing_keys):
        raise RobertaError(f"{model_dir} has no trained {recipe.task} head (it would score a random one): evaluate "
                           f"the model/ folder `roberta finetune` wrote, or name the head with --set head_name=NAME")
    model = model.to(device)
    recipe = _fit_max_len(recipe, model)
    data = load_task(recipe, data_dir, tokenizer, splits=(split,), id2label=model.config.id2label)
    if isinstance(data, SentenceTask) and model.config.num_labels != data.num_labels:
        raise RobertaError(f"{model_dir} has {model.config.num_labels} outputs but {recipe.task} needs "
                           f"{data.num_labels}: is this checkpoint fine-tuned on {recipe.task}?")
    files = data.files[split]
    items = [data.encode(examples[: recipe.max_dev_examples]) for examples in data.data[split]]
    preds, metrics = _split_metrics(data, files, items, model, device, batch_size, d=d)
    result = {"task": recipe.task, "split": split, "model": str(model_dir), "metrics": metrics}
    if out_file and d.main:  # under torchrun the processes share the batches; the first writes
        atomic_write(Path(out_file), json.dumps(result, indent=2) + "\n")
    if predictions and d.main:
        for path, its, p in zip(files, items, preds):
            target = Path(predictions)
            if len(files) > 1:
                target = target.with_name(f"{target.stem}-{path.stem.split('_', 1)[-1]}{target.suffix}")
            if isinstance(data, SquadTask):
                atomic_write(target, json.dumps(p, indent=2, ensure_ascii=False) + "\n")
            else:
                header, rows = data.prediction_rows(its, p)
                atomic_write(target, "".join("\t".join(map(str, r)) + "\n" for r in [header] + rows))
    d.close()  # as finetune does: a process group left to interpreter exit can abort the process
    return result

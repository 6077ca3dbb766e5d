"""Benchmark data and scores: readers for GLUE, SQuAD, RACE and the user's own files, and the metrics
each benchmark defines.

Readers return plain lists of examples and nothing else; tokenisation and batching live in
`finetune.py`. A malformed row raises `TaskDataError` naming the file and line, unless the caller asks
for `skip_bad_rows=True`, in which case the row is skipped and counted in the returned `Split.skipped`.
"""
from __future__ import annotations

import collections
import csv
import io
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

from .errors import RobertaError
from .fileio import parse_json, read_json


class TaskDataError(RobertaError):
    """A benchmark or user data file that is missing or not in the expected format."""


# --------------------------------------------------------------------------------------------------
# Examples


@dataclass
class Example:
    """One sentence or sentence pair. `label` is a class index, a float (regression), a list of class
    indices (multi-label), or None (unlabelled test data). `guid` is the id the leaderboard wants."""
    guid: str
    text_a: str
    text_b: str | None = None
    label: int | float | list[int] | None = None


@dataclass
class SquadExample:
    """One SQuAD question. `answers` are the gold texts with their character starts in `context`;
    empty for an unanswerable (v2.0) question."""
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    is_impossible: bool = False


@dataclass
class RaceExample:
    """One RACE question: an article, a question, four options, the answer index (0-3) and the level
    (middle or high school) that RACE reports accuracy for separately."""
    guid: str
    article: str
    question: str
    options: list[str]
    label: int | None
    level: str


@dataclass
class Split:
    """What a reader returns: the examples, where they came from and how many bad rows were skipped."""
    examples: list
    path: Path
    skipped: int = 0


class _Rows:
    """Collects bad rows: raises at the first one, or counts them when skipping was asked for."""

    def __init__(self, path: Path, skip_bad_rows: bool):
        self.path, self.skip, self.skipped = path, skip_bad_rows, 0

    def bad(self, line: int, problem: str) -> None:
        if not self.skip:
            raise TaskDataError(f"{self.path}:{line}: {problem} (fix the row, or pass skip_bad_rows / "
                                f"--skip-bad-rows to skip and count such rows)")
        self.skipped += 1


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise TaskDataError(f"{path} not found: expected {what}")
    return path


# --------------------------------------------------------------------------------------------------
# GLUE


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task keeps its fields. Columns are header names, or positions for CoLA, whose
    train/dev files have no header. `labels` in the order the model's outputs use (MNLI follows the
    published `mnli` head: contradiction, neutral, entailment); None for regression (STS-B). `names`
    are what the classes mean, as the GLUE datasets name them, where the files hold 0 and 1; a
    fine-tuned model saves them as its `id2label`."""
    name: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    metric: str                       # the metric that picks the best checkpoint
    dev_files: tuple[str, ...] = ("dev.tsv",)
    test_files: tuple[str, ...] = ("test.tsv",)
    header: bool = True               # train/dev files; every GLUE test file has a header
    names: tuple[str, ...] | None = None  # default: `labels`

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1


GLUE_TASKS = {t.name: t for t in [
    GlueTask("CoLA", 3, None, 1, ("0", "1"), "mcc", header=False, names=("unacceptable", "acceptable")),
    GlueTask("SST-2", "sentence", None, "label", ("0", "1"), "accuracy", names=("negative", "positive")),
    GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), "accuracy",
             names=("not_equivalent", "equivalent")),
    GlueTask("STS-B", "sentence1", "sentence2", "score", None, "pearson"),
    GlueTask("QQP", "question1", "question2", "is_duplicate", ("0", "1"), "accuracy",
             names=("not_duplicate", "duplicate")),
    GlueTask("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "neutral", "entailment"),
             "accuracy", dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
             test_files=("test_matched.tsv", "test_mismatched.tsv")),
    GlueTask("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), "accuracy"),
    GlueTask("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy"),
    GlueTask("WNLI", "sentence1", "sentence2", "label", ("0", "1"), "accuracy",
             names=("not_entailment", "entailment")),
]}


def glue_task(name: str) -> GlueTask:
    """The GLUE task by name, case-insensitively (`sst2`, `SST-2`, `sts-b` all work)."""
    key = {n.lower().replace("-", ""): n for n in GLUE_TASKS}.get(name.lower().replace("-", ""))
    if key is None:
        raise TaskDataError(f"unknown GLUE task {name!r}: choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def read_glue(task: GlueTask | str, path: str | Path, skip_bad_rows: bool = False) -> Split:
    """Read one GLUE TSV file (train, dev or test) in the layout of `download_glue_data.py`.

    GLUE sentences contain unbalanced quotes, so fields are split on tabs with no quoting at all
    (csv.QUOTE_NONE); a csv reader with default quoting silently merges rows. Test files have no
    label column and give `label=None`.
    """
    task = glue_task(task) if isinstance(task, str) else task
    path = _need_file(Path(path), f"a GLUE {task.name} TSV file from download_glue_data.py")
    rows = _Rows(path, skip_bad_rows)
    is_test = path.name.startswith("test")
    lines = list(csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if is_test or task.header:
        if not lines:
            raise TaskDataError(f"{path} is empty: expected a header line")
        header, body, first = lines[0], lines[1:], 2

        def column(name):
            if name not in header:
                raise TaskDataError(f"{path}:1: no column {name!r} in the header {header}: "
                                    f"is this the {task.name} file?")
            return header.index(name)
        if is_test:
            # Test files: an index column, then the text columns (CoLA/SST-2 name theirs "sentence").
            a = column("sentence" if task.name in ("CoLA", "SST-2") else task.text_a)
            b = None if task.text_b is None else column(task.text_b)
            y = None
        else:
            a = column(task.text_a)
            b = None if task.text_b is None else column(task.text_b)
            y = column(task.label)
        width = len(header)
        guid_col = header.index("index") if "index" in header else header.index("id") if "id" in header else None
    else:
        body, first, a, b, y, width, guid_col = lines, 1, task.text_a, task.text_b, task.label, 4, None

    examples = []
    for n, fields in enumerate(body, start=first):
        if len(fields) != width:
            rows.bad(n, f"expected {width} tab-separated fields, found {len(fields)}")
            continue
        label = None
        if y is not None:
            label = _glue_label(task, fields[y])
            if label is None:
                expected = "a float score in [0, 5]" if task.labels is None else f"one of {list(task.labels)}"
                rows.bad(n, f"label {fields[y]!r} is not {expected}")
                continue
        guid = fields[guid_col] if guid_col is not None else str(n - first)
        examples.append(Example(guid, fields[a], None if b is None else fields[b], label))
    return Split(examples, path, rows.skipped)


def _glue_label(task: GlueTask, text: str) -> int | float | None:
    if task.labels is not None:
        return task.labels.index(text) if text in task.labels else None
    try:
        score = float(text)
    except ValueError:
        return None
    return score if 0.0 <= score <= 5.0 else None


def glue_split_files(task: GlueTask, data_dir: str | Path, split: str) -> list[Path]:
    """The files of a split ('train', 'dev' or 'test') in a `glue_data/<TASK>/` directory."""
    names = {"train": ("train.tsv",), "dev": task.dev_files, "test": task.test_files}[split]
    return [Path(data_dir) / name for name in names]


# --------------------------------------------------------------------------------------------------
# The user's own data: CSV, TSV or JSONL with named columns


PROBLEM_TYPES = ("classification", "regression", "multi_label")


def read_table(path: str | Path, text_columns: list[str], label_column: str | None = "label",
               problem_type: str = "classification", labels: list[str] | None = None,
               label_sep: str = ",", skip_bad_rows: bool = False,
               header: bool | None = None) -> tuple[Split, list[str] | None]:
    """Read a user's labelled file: `.csv` (standard quoting), `.tsv` (tabs, no quoting, like GLUE)
    or `.jsonl` (one object, or one array, a line). One or two `text_columns` make a sentence or a
    sentence pair. Columns are header names, or positions counted from 0 (`"1"`): a CSV/TSV file has
    a header line when `header` says so, or (None) when the columns are given by name.

    Labels: class names for "classification"; numbers for "regression"; for "multi_label", a JSON
    list in JSONL or names joined by `label_sep` in CSV/TSV. Returns the split and the label names
    (sorted as found, unless `labels` fixes them, e.g. the dev file reusing the train file's names).
    """
    path = _need_file(Path(path), "a .csv, .tsv or .jsonl file")
    if problem_type not in PROBLEM_TYPES:
        raise TaskDataError(f"unknown problem type {problem_type!r}: choose one of {', '.join(PROBLEM_TYPES)}")
    if not 1 <= len(text_columns) <= 2:
        raise TaskDataError(f"give one or two text columns, not {len(text_columns)}")
    rows = _Rows(path, skip_bad_rows)
    positional = all(str(c).isdigit() for c in [*text_columns, label_column] if c is not None)
    records = list(_records(path, rows, not positional if header is None else header))
    wanted = list(text_columns) + ([label_column] if label_column else [])

    raw = []
    for n, record in records:
        missing = [c for c in wanted if record.get(c) is None]
        if missing:
            rows.bad(n, f"no value for column(s) {missing} (columns are {sorted(record)})")
            continue
        raw.append((n, record))
    if label_column and problem_type != "regression" and labels is None:
        names = set()
        for _, record in raw:
            names.update(_label_names(record[label_column], problem_type, label_sep))
        labels = sorted(names)

    examples = []
    for n, record in raw:
        label = None
        if label_column:
            value = record[label_column]
            if problem_type == "regression":
                try:
                    label = float(value)
                except (TypeError, ValueError):
                    rows.bad(n, f"label {value!r} is not a number")
                    continue
                if not math.isfinite(label):  # nan or inf would turn every loss after it into nan
                    rows.bad(n, f"label {value!r} is not a finite number")
                    continue
            else:
                names = _label_names(value, problem_type, label_sep)
                unknown = [x for x in names if x not in labels]
                if unknown:
                    rows.bad(n, f"label(s) {unknown} not among the known labels {labels}")
                    continue
                label = labels.index(names[0]) if problem_type == "classification" else sorted(labels.index(x) for x in names)
        texts = [str(record[c]) for c in text_columns]
        guid = str(record.get("id", record.get("idx", n)))
        examples.append(Example(guid, texts[0], texts[1] if len(texts) > 1 else None, label))
    return Split(examples, path, rows.skipped), labels


def _records(path: Path, rows: _Rows, header: bool = True):
    """(line number, dict) for each record of a CSV/TSV/JSONL file; without a header (or for a JSON
    array) the keys are the positions "0", "1", ..."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise TaskDataError(f"{path}: unknown file type {suffix!r}: use .csv, .tsv or .jsonl")
    text = read_utf8(path)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except RobertaError as exc:
                rows.bad(n, str(exc))
                continue
            if isinstance(record, list):
                record = {str(i): v for i, v in enumerate(record)}
            if not isinstance(record, dict):
                rows.bad(n, "expected a JSON object or array")
                continue
            yield n, record
        return
    quoting = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **quoting)
    names = next(reader, None) if header else None
    if header and names is None:
        raise TaskDataError(f"{path} is empty: expected a header line naming the columns")
    for fields in reader:
        n = reader.line_num
        if names is None:
            names = [str(i) for i in range(len(fields))]  # a headerless file: the first row sets the width
        if len(fields) != len(names):
            rows.bad(n, f"expected {len(names)} fields as in the {'header' if header else 'first row'}, "
                        f"found {len(fields)}")
            continue
        yield n, dict(zip(names, fields))


def read_utf8(path: Path) -> str:
    """A text file's contents; bytes that are not UTF-8 are an error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: MRPC's files start with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: byte 0x{data[exc.start]:02x} is not valid UTF-8: save the file "
                            "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _label_names(value, problem_type: str, sep: str) -> list[str]:
    if problem_type == "classification":
        return [str(value)]
    if isinstance(value, list):
        return [str(x) for x in value]
    return [x.strip() for x in str(value).split(sep) if x.strip()]


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0


def read_squad(path: str | Path, skip_bad_rows: bool = False) -> Split:
    """Read a SQuAD v1.1 or v2.0 JSON file (`train-v1.1.json`, `dev-v2.0.json`, ...). Questions whose
    answers do not sit where `answer_start` says are malformed (line = question number)."""
    path = _need_file(Path(path), "a SQuAD JSON file (train-v1.1.json, dev-v2.0.json, ...)")
    try:
        data = read_json(path, limit=1 << 30)["data"]  # SQuAD 2.0's train set is 40 MB
    except (RobertaError, KeyError) as exc:
        raise TaskDataError(f"{path} is not a SQuAD file: expected JSON with a 'data' list ({exc})") from None
    rows = _Rows(path, skip_bad_rows)
    examples, n = [], 0
    for article in data:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                n += 1
                impossible = bool(qa.get("is_impossible", False))
                answers = [(a["text"], int(a["answer_start"])) for a in qa.get("answers", [])]
                if not impossible and not answers:
                    rows.bad(n, f"question {qa.get('id')!r} has no answers and is not marked is_impossible")
                    continue
                if any(context[s:s + len(t)] != t for t, s in answers):
                    rows.bad(n, f"question {qa.get('id')!r}: an answer's text is not at its answer_start")
                    continue
                examples.append(SquadExample(qa["id"], qa["question"], context, answers, impossible))
    return Split(examples, path, rows.skipped)


# --------------------------------------------------------------------------------------------------
# RACE


def read_race(split_dir: str | Path, skip_bad_rows: bool = False) -> Split:
    """Read a RACE split directory (`RACE/train`, `RACE/dev` or `RACE/test`), which holds `middle/`
    and `high/` subdirectories of JSON files, each an article with its questions, options and answers.

    A blank in the question ("... _ .") is filled with each option, as fairseq's preprocessing does;
    otherwise the option follows the question.
    """
    split_dir = Path(split_dir)
    files = sorted(p for level in ("middle", "high") for p in (split_dir / level).glob("*.txt"))
    if not files:
        raise TaskDataError(f"{split_dir} has no middle/*.txt or high/*.txt files: expected a RACE split "
                            f"directory such as RACE/dev")
    skipped, examples = 0, []
    for path in files:
        rows = _Rows(path, skip_bad_rows)
        try:
            doc = read_json(path)
            article, questions, options, answers = doc["article"], doc["questions"], doc["options"], doc["answers"]
        except (RobertaError, KeyError) as exc:
            rows.bad(1, f"not a RACE JSON file with article/questions/options/answers ({exc})")
            skipped += rows.skipped
            continue
        for i, (question, opts, answer) in enumerate(zip(questions, options, answers)):
            if len(opts) != 4 or answer not in ("A", "B", "C", "D"):
                rows.bad(1, f"question {i}: expected 4 options and an answer A-D, got {len(opts)} and {answer!r}")
                continue
            examples.append(RaceExample(f"{path.parent.name}/{path.name}-{i}", article, question, list(opts),
                                        "ABCD".index(answer), path.parent.name))
        skipped += rows.skipped
    return Split(examples, split_dir, skipped)


def race_option_text(question: str, option: str) -> str:
    """The second segment for one option: the question with its blank filled, or question + option."""
    return question.replace("_", option) if "_" in question else f"{question} {option}"


# --------------------------------------------------------------------------------------------------
# Metrics: classification, regression, multi-label


def classification_metrics(labels, preds) -> dict[str, float]:
    """Accuracy, binary F1 (GLUE's MRPC/QQP F1, positive class 1) and Matthews correlation (CoLA)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    out = {"accuracy": float(accuracy_score(labels, preds)),
           "mcc": float(matthews_corrcoef(labels, preds))}
    if set(np.unique(labels)) | set(np.unique(preds)) <= {0, 1}:
        out["f1"] = float(f1_score(labels, preds, zero_division=0))
    else:
        out["macro_f1"] = float(f1_score(labels, preds, average="macro", zero_division=0))
    return out


def regression_metrics(labels, preds) -> dict[str, float]:
    """Pearson and Spearman correlation (STS-B) and mean squared error."""
    labels, preds = np.asarray(labels, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    constant = np.ptp(labels) == 0 or np.ptp(preds) == 0  # correlations are undefined; report 0
    return {"pearson": 0.0 if constant else float(pearsonr(preds, labels)[0]),
            "spearman": 0.0 if constant else float(spearmanr(preds, labels)[0]),
            "mse": float(mean_squared_error(labels, preds))}


def multi_label_metrics(labels, preds) -> dict[str, float]:
    """Micro and macro F1 and exact-match (subset) accuracy over 0/1 indicator matrices [N, C]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return {"micro_f1": float(f1_score(labels, preds, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(labels, preds))}


def race_metrics(labels, preds, levels) -> dict[str, float]:
    """RACE accuracy overall and for its middle- and high-school parts."""
    labels, preds, levels = np.asarray(labels), np.asarray(preds), np.asarray(levels)
    out = {"accuracy": float(accuracy_score(labels, preds))}
    for level in ("middle", "high"):
        part = levels == level
        if part.any():
            out[f"accuracy_{level}"] = float(accuracy_score(labels[part], preds[part]))
    return out


# --------------------------------------------------------------------------------------------------
# SQuAD metrics: the official v1.1/v2.0 evaluation script's normalisation, EM and F1


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (official script)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # A no-answer (empty) on either side scores 1 only when both are empty (v2.0 rule).
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: list[SquadExample], predictions: dict[str, str]) -> dict[str, float]:
    """Exact match and F1 in percent, each the max over the gold answers; an unanswerable question's
    only gold answer is the empty string. For v2.0 data also the HasAns/NoAns breakdown."""
    exact, f1, has_answer = [], [], []
    for ex in examples:
        golds = [t for t, _ in ex.answers if normalize_answer(t)] or [""]
        pred = predictions.get(ex.qid, "")
        exact.append(max(squad_exact(pred, g) for g in golds))
        f1.append(max(squad_f1(pred, g) for g in golds))
        has_answer.append(golds != [""])
    exact, f1, has_answer = np.array(exact), np.array(f1), np.array(has_answer)
    out = {"exact": 100.0 * exact.mean(), "f1": 100.0 * f1.mean(), "total": len(examples)}
    if not has_answer.all():
        for name, part in (("HasAns", has_answer), ("NoAns", ~has_answer)):
            if part.any():
                out[f"{name}_exact"] = 100.0 * exact[part].mean()
                out[f"{name}_f1"] = 100.0 * f1[part].mean()
    return {k: float(v) if k != "total" else v for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# SQuAD features: long contexts in overlapping windows, and best-span decoding back to text


@dataclass
class SquadFeature:
    """One window of one question: `<s> question </s></s> context-window </s>`. `offsets[i]` is the
    (start, end) character span in the context of token i, or None for question/special tokens.
    `start`/`end` are the answer's token positions, or 0 (the `<s>` token) when the window holds no
    answer, which is how unanswerable questions and answer-less windows are trained."""
    example_index: int
    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start: int = 0
    end: int = 0


def squad_features(examples: list[SquadExample], encode_with_offsets, max_len: int = 384,
                   doc_stride: int = 128, max_query_len: int = 64, bos: int = 0, eos: int = 2) -> list[SquadFeature]:
    """Split each context into windows of at most `max_len` tokens, starting `doc_stride` context
    tokens apart (as in the original BERT SQuAD code), so every answer lies whole in some window.

    `encode_with_offsets(text) -> (ids, [(char_start, char_end), ...])` tokenises without special
    tokens; the tokenizer's `encode(text, add_special_tokens=False, return_offsets=True)` does that.
    """
    features = []
    for index, ex in enumerate(examples):
        question = encode_with_offsets(ex.question)[0][:max_query_len]
        ctx_ids, ctx_offsets = encode_with_offsets(ex.context)
        room = max_len - len(question) - 4  # <s> q </s></s> ... </s>
        if room <= 0:
            raise TaskDataError(f"max_len {max_len} leaves no room for the context: raise it above {len(question) + 4}")
        ans = None
        if ex.answers and not ex.is_impossible:
            text, char_start = ex.answers[0]
            char_end = char_start + len(text)
            inside = [i for i, (s, e) in enumerate(ctx_offsets) if s < char_end and e > char_start]
            ans = (inside[0], inside[-1]) if inside else None
        window_start = 0
        while True:
            window_end = min(window_start + room, len(ctx_ids))
            prefix = [bos] + question + [eos, eos]
            ids = prefix + ctx_ids[window_start:window_end] + [eos]
            offsets = [None] * len(prefix) + ctx_offsets[window_start:window_end] + [None]
            feature = SquadFeature(index, ids, offsets)
            if ans is not None and window_start <= ans[0] and ans[1] < window_end:
                feature.start = ans[0] - window_start + len(prefix)
                feature.end = ans[1] - window_start + len(prefix)
            features.append(feature)
            if window_end == len(ctx_ids):
                break
            window_start += min(doc_stride, room)
    return features


def squad_decode(examples: list[SquadExample], features: list[SquadFeature], start_logits, end_logits,
                 n_best: int = 20, max_answer_len: int = 30, version_2: bool = False,
                 null_threshold: float = 0.0) -> dict[str, str]:
    """Best-span decoding: for each question, the highest start+end logit span over all its windows,
    among the top `n_best` starts and ends with end >= start, at most `max_answer_len` tokens, inside
    the context. For v2.0 the answer is empty when the no-answer score (`<s>` start + end, the lowest
    over windows) beats the best span by more than `null_threshold`."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for feature, s_logits, e_logits in zip(features, start_logits, end_logits):
        s_logits, e_logits = np.asarray(s_logits)[: len(feature.input_ids)], np.asarray(e_logits)[: len(feature.input_ids)]
        i = feature.example_index
        null[i] = min(null.get(i, np.inf), float(s_logits[0] + e_logits[0]))
        starts = np.argsort(s_logits)[::-1][:n_best]
        ends = np.argsort(e_logits)[::-1][:n_best]
        for s in starts:
            if feature.offsets[s] is None:
                continue
            for e in ends:
                if feature.offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(s_logits[s] + e_logits[e])
                if i not in best or score > best[i][0]:
                    context = examples[i].context
                    best[i] = (score, context[feature.offsets[s][0]: feature.offsets[e][1]])
    predictions = {}
    for i, ex in enumerate(examples):
        score, text = best.get(i, (-np.inf, ""))
        if version_2 and null.get(i, -np.inf) - score > null_threshold:
            text = ""
        predictions[ex.qid] = text
    return predictions

"""The `roberta` command: a thin layer over the library API.

Each subcommand parses its arguments and calls one library function; all the work lives in the
library modules. Errors a user can cause are `RobertaError`s, printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import finetune
from .errors import RobertaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roberta", description="RoBERTa: load, use, train, fine-tune, compress.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands are added below, one compact block each.

    # finetune / evaluate: GLUE tasks, squad, race, or custom (your own train/dev .csv/.tsv/.jsonl)
    def task_args(p):
        p.add_argument("--task", required=True, help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, squad, race or custom")
        p.add_argument("--data", required=True, help="the task's data directory, e.g. glue_data/MNLI")
        p.add_argument("--model", required=True, help="checkpoint directory (pretrained for finetune, fine-tuned for evaluate)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe setting, e.g. --set lr=2e-5")
        p.add_argument("--text-columns", nargs="+", help="custom: one or two text column names")
        p.add_argument("--label-column", help="custom: the label column name")
        p.add_argument("--problem-type", choices=["classification", "regression", "multi_label"], help="custom")
        p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip and count malformed rows")
        p.add_argument("--max-dev-examples", type=int)
        p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

    def overrides(args, names):
        given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        return {**given, **finetune.parse_settings(args.set)}

    common = ["text_columns", "label_column", "problem_type", "skip_bad_rows", "max_dev_examples", "device"]
    p = sub.add_parser("finetune", help="fine-tune on a task with its published recipe")
    task_args(p)
    p.add_argument("--out", required=True, help="output directory: best checkpoint, metrics.jsonl, curves.png, eval.json")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-train-examples", type=int, help="train on a random subset of this size")
    p.add_argument("--eval-every", type=int, help="updates between dev evaluations (default: each epoch)")
    p.add_argument("--head-name", help="name of the saved head (default: the task name in lower case)")
    p.set_defaults(func=lambda a: print(json.dumps(finetune.finetune(a.task, a.data, a.model, a.out, **overrides(
        a, common + ["lr", "batch_size", "max_epochs", "max_train_examples", "eval_every", "head_name"])), indent=2)))
    p = sub.add_parser("evaluate", help="score a fine-tuned model; optionally write leaderboard predictions")
    task_args(p)
    p.add_argument("--split", default="dev", choices=["dev", "test", "train"])
    p.add_argument("--out", help="write the metrics here as JSON")
    p.add_argument("--predictions", help="write per-example predictions here in the leaderboard's format")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=lambda a: print(json.dumps(finetune.evaluate(
        a.task, a.data, a.model, a.split, a.predictions, a.out, a.batch_size, **overrides(a, common)), indent=2)))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except RobertaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `roberta` command: a thin layer over the library API.

Each subcommand parses its arguments and calls one library function; all the work lives in the
library modules. Errors a user can cause are `RobertaError`s, printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import RobertaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roberta", description="RoBERTa: load, use, train, fine-tune, compress.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands are added below, one compact block each.

    p = sub.add_parser("convert", help="convert a checkpoint between the fairseq and Hugging Face layouts")
    p.add_argument("src", help="checkpoint directory (Hugging Face, fairseq or this project's) or model.pt")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=["hf", "fairseq"], default="hf", help="target layout (default: hf)")
    p.add_argument("--fairseq-layout", choices=["current", "2019"], default="current",
                   help="key layout when writing fairseq (default: current)")
    p.set_defaults(func=_convert)

    # finetune / evaluate: GLUE tasks, squad, race, or custom (your own train/dev .csv/.tsv/.jsonl)
    p = sub.add_parser("finetune", help="fine-tune on a task with its published recipe")
    _task_args(p)
    p.add_argument("--out", required=True, help="output directory: best checkpoint, metrics.jsonl, curves.png, eval.json")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-train-examples", type=int, help="train on a random subset of this size")
    p.add_argument("--eval-every", type=int, help="updates between dev evaluations (default: each epoch)")
    p.add_argument("--head-name", help="name of the saved head (default: the task name in lower case)")
    p.set_defaults(func=_finetune)
    p = sub.add_parser("evaluate", help="score a fine-tuned model; optionally write leaderboard predictions")
    _task_args(p)
    p.add_argument("--split", default="dev", choices=["dev", "test", "train"])
    p.add_argument("--out", help="write the metrics here as JSON (default: eval_<split>.json beside the model)")
    p.add_argument("--predictions", help="write per-example predictions here in the leaderboard's format")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_evaluate)
    return parser


def _convert(args) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, layout=args.fairseq_layout)
    print(f"wrote {out}")
    return 0


def _task_args(p: argparse.ArgumentParser) -> None:
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


def _recipe_overrides(args, names: list[str]) -> dict:
    """Recipe settings from the flags the user gave, then from --set (which wins)."""
    from .finetune import parse_settings

    names += ["text_columns", "label_column", "problem_type", "skip_bad_rows", "max_dev_examples", "device"]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return {**given, **parse_settings(args.set)}


def _finetune(args) -> int:
    from .finetune import finetune

    names = ["lr", "batch_size", "max_epochs", "max_train_examples", "eval_every", "head_name"]
    print(json.dumps(finetune(args.task, args.data, args.model, args.out, **_recipe_overrides(args, names)), indent=2))
    return 0


def _evaluate(args) -> int:
    from .finetune import evaluate

    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    out = args.out or model_dir / f"eval_{args.split}.json"
    result = evaluate(args.task, args.data, args.model, args.split, args.predictions, out, args.batch_size,
                      **_recipe_overrides(args, []))
    print(json.dumps(result, indent=2))
    return 0


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

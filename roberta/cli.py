"""The `roberta` command: a thin layer over the library API.

Each subcommand parses its arguments and calls one library function; all the work lives in the
library modules. Errors a user can cause are `RobertaError`s, printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import sys

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
    return parser


def _convert(args) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, layout=args.fairseq_layout)
    print(f"wrote {out}")
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

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

    # -- pretraining: preprocess, pretrain, demo
    p = sub.add_parser("preprocess", help="tokenize plain-text files into memory-mapped training shards")
    p.add_argument("inputs", nargs="+", help="text files or directories of them")
    p.add_argument("--out", required=True, help="new directory for the shards, vocabulary and meta.json")
    p.add_argument("--vocab", help="an existing tokenizer directory (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the BPE to train (default 8192)")
    p.add_argument("--doc-per-file", action="store_true", help="one document per file (default: blank-line blocks)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores)")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("pretrain", help="masked-LM pretraining (run under torchrun for several processes)")
    p.add_argument("--preset", choices=["tiny", "small", "base", "large"], help="settings to start from (default small)")
    p.add_argument("--data", help="a directory made by `roberta preprocess`")
    p.add_argument("--out", required=True, help="run directory: config, metrics, checkpoints, final model")
    p.add_argument("--init-from", help="continue pretraining from this checkpoint directory")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest (or the given) checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. lr=3e-4")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("demo", help="train a tokenizer and a small RoBERTa on built-in text, then fine-tune it")
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps (default 1200)")
    p.set_defaults(func=_demo)
    return parser


def _convert(args) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, layout=args.fairseq_layout)
    print(f"wrote {out}")
    return 0


def _preprocess(args):
    from .data import preprocess

    meta = preprocess(args.inputs, args.out, vocab=args.vocab, vocab_size=args.vocab_size,
                      doc_per_file=args.doc_per_file, valid_fraction=args.valid_fraction, workers=args.workers)
    for split, shards in meta["shards"].items():
        print(f"{split}: {sum(s['tokens'] for s in shards):,} tokens, {sum(s['documents'] for s in shards):,} "
              f"documents in {len(shards)} shard(s)")
    print(f"wrote {args.out}")


def _pretrain(args):
    import json
    from pathlib import Path

    from .pretrain import PretrainConfig, pretrain

    saved = Path(args.out) / "pretrain.json"
    if args.resume and args.preset is None and saved.exists():
        cfg = PretrainConfig.from_dict(json.loads(saved.read_text()))
    else:
        cfg = PretrainConfig.preset(args.preset or "small")
    for key, flag in (("data", args.data), ("init_from", args.init_from)):
        if flag:
            cfg = cfg.set(key, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise RobertaError(f"--set {item}: expected KEY=VALUE, e.g. --set lr=3e-4")
        cfg = cfg.set(key.strip(), value.strip())
    pretrain(cfg, args.out, resume=args.resume)


def _demo(args):
    from .demo import run_demo

    run_demo(args.out, steps=args.steps)


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

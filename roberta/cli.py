"""The `roberta` command: a thin layer over the library API.

Each subcommand parses its arguments and calls one library function; all the work lives in the
library modules. Errors a user can cause are `RobertaError`s, printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import RobertaError, RobertaWarning


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error: ...` line (and exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def format_help(self):
        if callable(self.epilog):  # settings lists that need torch are built only when asked for
            self.epilog = self.epilog()
        return super().format_help()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, unless the help text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        if isinstance(action, argparse._AppendAction) and not action.default and "default" not in text:
            return f"{text} (repeatable; default: none)".strip()
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


MAX_THREADS = 1024  # past any machine's cores; thread creation failed at 20,000 and crashed at 100,000


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS} (this machine has {os.cpu_count()} "
                                         f"cores), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="roberta", description="RoBERTa: load, use, train, fine-tune, compress.", formatter_class=_HelpFormatter,
        epilog="exit status: 0 success, 2 bad input (a one-line 'error: ...' says what and how to fix it), "
               "1 unexpected failure (a bug: please report the traceback), 130 interrupted.")
    parser.add_argument("--version", action="version", version=_version_line(__version__))
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
    p.add_argument("--vocab-size", type=_positive_int, default=8192, help="size of the BPE to train (default 8192)")
    p.add_argument("--doc-per-file", action="store_true", help="one document per file (default: blank-line blocks)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    p.add_argument("--workers", type=_positive_int, help="tokenizing processes (default: all cores)")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("pretrain", help="masked-LM pretraining (run under torchrun for several processes)",
                       epilog=_pretrain_help)
    p.add_argument("--preset", choices=["tiny", "small", "base", "large"],
                   help="settings to start from (default small)")
    p.add_argument("--data", help="a directory made by `roberta preprocess` (default: the preset's, or the resumed run's)")
    p.add_argument("--out", required=True, help="run directory: config, metrics, checkpoints, final model")
    p.add_argument("--init-from", help="continue pretraining from this model: a name, directory or archive "
                   "(default: from scratch)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest (or the given) checkpoint (default: a new run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. lr=3e-4")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("demo", help="train a tokenizer and a small RoBERTa on built-in text, then fine-tune it")
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--steps", type=int, default=3000, help="pretraining steps (default 3000)")
    p.set_defaults(func=_demo)

    # compress / decompress: lossless compressed checkpoints (roberta/compress.py)
    for name, help_text in (("compress", "store a checkpoint's weights losslessly compressed as model.rbz"),
                            ("decompress", "turn a compressed checkpoint back into model.safetensors")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", help="checkpoint directory")
        p.add_argument("dst", help="output directory (the other files are copied there)")
        p.add_argument("--threads", type=_thread_count, help="threads to use (default: all cores)")
        p.add_argument("--json", action="store_true", help="print the path, sizes and ratio as JSON")
        p.set_defaults(func=_compress)
    _add_hub_commands(sub)

    # finetune / evaluate: GLUE tasks, squad, race, or custom (your own train/dev .csv/.tsv/.jsonl)
    p = sub.add_parser("finetune", help="fine-tune on a task with its published recipe (torchrun for several processes)",
                       epilog=_recipe_help)
    _task_args(p)
    p.add_argument("--out", required=True, help="run directory: recipe.json, metrics.jsonl, curves.png, eval.json, "
                   "model/ (the best checkpoint), checkpoints/")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest (or the given) checkpoint (default: a new run)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's published one, adapted to "
                   "the model's size)")
    p.add_argument("--batch-size", type=int, help="examples per update (default: the task's recipe)")
    p.add_argument("--max-epochs", type=int, help="passes over the training set (default: the task's recipe)")
    p.add_argument("--max-train-examples", type=int, help="train on a random subset of this size (default: all)")
    p.add_argument("--eval-every", type=int, help="updates between dev evaluations (default: each epoch)")
    p.add_argument("--head-name", help="name of the saved head (default: the task name in lower case)")
    p.set_defaults(func=_finetune)
    p = sub.add_parser("evaluate", help="score a fine-tuned model; optionally write leaderboard predictions",
                       epilog=_recipe_help)
    _task_args(p)
    p.add_argument("--split", default="dev", choices=["dev", "test", "train"], help="the split to score")
    p.add_argument("--out", help="write the metrics here as JSON (default: eval_<split>.json beside the model)")
    p.add_argument("--predictions", help="write per-example predictions here in the leaderboard's format "
                   "(default: none written)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    p.set_defaults(func=_evaluate)
    _add_reproduce(sub)
    _explain(sub)
    for name in COMPUTING:
        sub.choices[name].add_argument("--threads", type=_thread_count, help="CPU threads for the model's math "
                                       "(default: all cores; waiting threads sleep, so a core another program "
                                       "keeps busy costs only its share)")
    return parser


# Commands that compute with the model, each taking --threads (compress/decompress have their own).
COMPUTING = ("pretrain", "finetune", "evaluate", "demo", "fill-mask", "features", "predict", "tag", "answer",
             "export", "serve", "zero-shot", "rerank")


def _explain(sub) -> None:
    """Each subcommand's --help starts with what it does and shows each option's default."""
    for action in sub._choices_actions:
        command = sub.choices[action.dest]
        command.description = command.description or action.help
        command.formatter_class = _HelpFormatter


def _pretrain_help() -> str:
    from .pretrain import PretrainConfig

    return PretrainConfig.help_text()


def _recipe_help() -> str:
    from .finetune import Recipe

    return Recipe.help_text()


def _version_line(version: str) -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version as installed

    try:  # the installed torch's version, read without importing torch (seconds)
        torch_version = installed("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"roberta {version} (torch {torch_version}, Python {platform.python_version()})"


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
              f"documents in {_count(len(shards), 'shard')}")
    print(f"wrote {args.out}")


def _pretrain(args):
    from .pretrain import PretrainConfig, pretrain
    from .train import read_settings

    saved = Path(args.out) / "pretrain.json"
    flags = {key: value for key, value in (("data", args.data), ("init_from", args.init_from)) if value}
    if args.resume and saved.is_file():  # the run's own settings; what is given again must agree with them
        cfg = read_settings(PretrainConfig, saved)
        if args.preset:  # the preset names the architecture; its other settings are the run's
            flags["model"] = PretrainConfig.preset(args.preset).model
    else:
        cfg = PretrainConfig.preset(args.preset or "small")
    pretrain(cfg.replace(**flags).with_sets(args.set), args.out, resume=args.resume)


def _demo(args):
    from .demo import run_demo

    run_demo(args.out, steps=args.steps)

def _compress(args) -> int:
    from . import compress

    from .checkpoint import model_path

    convert = compress.compress_checkpoint if args.command == "compress" else compress.decompress_checkpoint
    out = convert(args.src, args.dst, args.threads)
    def weights(directory: Path) -> int:  # the weight files' bytes, whatever their layout (ZipNN's included)
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and not p.name.endswith(".json")
                   and (".safetensors" in p.name or p.name.endswith((".bin", ".pt", ".rbz", ".znn"))))

    before, after = weights(model_path(args.src, note=False)), weights(out.parent)
    ratio = after / before if before else None
    _print(args, {"path": str(out), "bytes_before": before, "bytes_after": after, "ratio": ratio},
           f"wrote {out}: {after / 2**20:.2f} MiB, from {before / 2**20:.2f} MiB of weights"
           + (f" ({ratio:.1%} of the size)" if ratio is not None else ""))
    return 0


# ---- using a model: encode, decode, fill-mask, features, predict, download, info ------------------
# Inputs are the TEXT arguments, or one per line of stdin when there are none; a TAB inside an input
# separates the sentences of a pair. --json prints one JSON value per input, for programs.


def _add_hub_commands(sub) -> None:
    def command(name, func, help, text="TEXT", weights=True, json=True, model_required=True):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("-m", "--model", required=model_required, help="a path, a Hub id (org/name or org/name@revision, "
                       "e.g. FacebookAI/roberta-base) or a fairseq release (roberta.base, roberta.large, roberta.large.mnli)"
                       + ("" if model_required else " (default: none)"))
        if json:
            p.add_argument("--json", action="store_true", help="print JSON, one value per input")
        _source_args(p)
        if weights:
            p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
            p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                           help="auto (default: the fastest mode this machine runs, said on stderr and recorded in "
                           "a job's job.json; `roberta info --device` shows the choice), fp32 (exact float32), "
                           "bf16, int8 (CPU); see benchmarks/RESULTS.md")
        if text:
            p.add_argument("text", nargs="*", metavar=text, help="inputs (default: one per line of stdin)")
        p.set_defaults(func=func)
        return p

    command("encode", _encode, "print the token ids of each input text", weights=False)
    command("decode", _decode, "print the text of a sequence of ids (arguments), or of each stdin line",
            text="ID", weights=False)
    p = command("fill-mask", _fill_mask, "predict the words at <mask> in each input text")
    p.add_argument("--topk", type=_positive_int, default=5, help="candidates per mask (default 5)")
    def input_options(p, field="text", pair_field=None, pair: str | None = "the second sentence of a pair"):
        """-i and how its lines read; `pair`: what a second text is (None: inputs are single texts)."""
        p.add_argument("-i", "--input", help="read the inputs from this file, one per line (default: the "
                       "arguments, or stdin), as it streams in")
        text = f"text (a TAB separates {pair}), tsv (two columns)" if pair else "text"
        p.add_argument("--format", choices=["text", "tsv", "jsonl"] if pair else ["text", "jsonl"],
                       help=f"input lines: {text} or jsonl (default: from the suffix, "
                       + (".tsv or .jsonl, else text)" if pair else ".jsonl, else text)"))
        p.add_argument("--field", default=field, help=f"jsonl: the field holding the text (default {field})")
        if pair:
            p.add_argument("--pair-field", default=pair_field, help=f"jsonl: the field holding {pair} (default: "
                           + (f"{pair_field})" if pair_field else "none, single sentences)"))

    def job_options(p, what):
        input_options(p)
        p.add_argument("--allow-empty", action="store_true",
                       help="read a blank line as the empty text (default: a blank line is an error naming it, "
                       "since row i of the output is line i of the input)")
        p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's limit")
        p.add_argument("--window", type=int, help="read inputs longer than the model in overlapping windows of this "
                       "many tokens (default with --stride: the model's limit)")
        p.add_argument("--stride", type=int, help="tokens shared by neighbouring windows (default with --window: half)")
        p.add_argument("--shard-rows", type=_positive_int, default=10000, help="rows per shard of a sharded job (default 10000)")
        p.add_argument("--resume", action="store_true", help="continue the sharded job in --out after a crash")
        p.add_argument("--overwrite", action="store_true", help="start the sharded job in --out over, deleting its "
                       "shards (only a job's directory: one holding job.json)")
        p.add_argument("--batch-tokens", type=_positive_int, default=4096, help="padded tokens per batch (default 4096)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command("features", _features, "write one vector per input (or per token): a .npy or .jsonl file, or a "
                "directory of .npy shards written as the input streams in (resumable, runs under torchrun)")
    p.add_argument("-o", "--out", required=True, help="output: a .npy file (one row per input), a .jsonl file, or "
                   "a directory for shards (features-NNNNN.npy + index.json)")
    p.add_argument("--pool", choices=["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                      "none"], default=None,
                   help="default: the model's own pooling (a sentence-transformers directory's, normalised if it "
                   "says so), else the <s> vector; cls, mean, ... over tokens, or none: every token (.jsonl only)")
    p.add_argument("--layer", type=int, default=-1, help="layer to read, 0 = embeddings (default: last)")
    job_options(p, "features")
    p = command("predict", _predict, "classify each input (a TAB separates a sentence pair) with a head; with -o, "
                "into a directory of .npy shards of probabilities")
    p.add_argument("--head", help="classification head name, e.g. mnli (see `roberta info`; default: the only one)")
    p.add_argument("-o", "--out", help="a directory for shards (predict-NNNNN.npy + index.json; default: print)")
    p.add_argument("--pool", choices=["mean", "max"], default="mean",
                   help="how the windows of a long input combine their logits (default mean)")
    job_options(p, "predict")
    p = command("tag", _tag, "find the entities in each input text with a token-classification checkpoint")
    p.add_argument("--aggregation", choices=["none", "simple", "first", "max", "average"], default="simple",
                   help="how tokens become entities, as in transformers' pipeline (default simple)")
    p.add_argument("--stride", type=int, help="tag texts longer than the model in windows overlapping by this "
                   "many tokens (default: refuse them)")
    input_options(p, pair=None)
    p = command("zero-shot", _zero_shot, "classify each input text into candidate labels with an NLI head "
                "(transformers' zero-shot-classification pipeline)")
    p.add_argument("--labels", required=True, help="the candidate labels, comma-separated")
    p.add_argument("--template", default="This example is {}.", help="the hypothesis; {} is the label")
    p.add_argument("--multi-label", action="store_true", help="score each label on its own (several may be true)")
    p.add_argument("--head", help="the NLI head (default: the model's main or only one, or mnli)")
    p = command("rerank", _rerank, "rank the passages (TEXT, or stdin lines) by relevance to --query with a "
                "cross-encoder (sentence-transformers' CrossEncoder.rank)", text="PASSAGE")
    p.add_argument("--query", required=True, help="the query")
    p.add_argument("--top-k", type=_positive_int, help="print only the best K (default: all)")
    p.add_argument("--head", help="the one-output head (default: the model's main or only one)")
    p = command("answer", _answer, "answer each question from its context with a question-answering checkpoint",
                text="QUESTION")
    p.add_argument("--context", help="the context for every question (default: each input is QUESTION<TAB>CONTEXT)")
    p.add_argument("--context-file", help="read the context for every question from this UTF-8 file (default: from each input)")
    p.add_argument("--topk", type=_positive_int, default=1, help="answers per question (default 1)")
    p.add_argument("--no-answer", action="store_true", help="allow the empty answer (SQuAD 2.0)")
    p.add_argument("--null-threshold", type=float,
                   help="with --no-answer: how much the empty answer's score must beat the best span's (default 0)")
    p.add_argument("--max-answer-len", type=_positive_int, default=15, help="longest answer in tokens (default 15)")
    p.add_argument("--max-seq-len", type=int, help="tokens per window (default: the smaller of the model's and 384)")
    p.add_argument("--doc-stride", type=int, help="tokens shared by neighbouring windows of a long context "
                   "(default: the smaller of half a window and 128)")
    input_options(p, field="question", pair_field="context", pair="a question's context")
    p = sub.add_parser("export", help="write the encoder and its heads (classifiers, tagger or reader) as ONNX (dynamic batch and length)")
    p.add_argument("-m", "--model", required=True, help="a name or a path, as for the other commands")
    p.add_argument("--onnx", required=True, metavar="DIR", help="new directory for model.onnx, onnx.json and the tokenizer")
    _source_args(p)
    p.set_defaults(func=_export)
    p = sub.add_parser("download", help="download models into the cache (no NAME: list the fairseq releases)")
    p.add_argument("names", nargs="*", metavar="NAME", help="Hub ids (org/name[@revision]) or fairseq release names")
    p.add_argument("--json", action="store_true", help="print JSON")
    _source_args(p)
    p.set_defaults(func=_download)
    p = command("info", _info, "show what a checkpoint holds: config, heads, parameters, dtype, size",
                text=None, weights=False, model_required=False)
    p.add_argument("--device", nargs="?", const="auto", metavar="DEVICE", dest="show_device",
                   help="also show the device and the precision `auto` picks there, and why (-m optional; default: not shown)")
    p = command("serve", _serve, "serve the model over HTTP on text-embeddings-inference's API (embed, predict, "
                "rerank, ...; fill-mask and zero-shot too) with dynamic batching",
                text=None, json=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="real tokens in one forward pass (default 8192)")
    p.add_argument("--max-batch-requests", type=int, default=128,
                   help="inputs in one forward pass (default 128; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="a batch closes when no input has come for this long, or its budgets are full "
                        "(default 2; at most 10 such waits per batch)")
    p.add_argument("--max-queue", type=int, default=2048, help="inputs waiting before requests get 429 (default 2048)")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs in one request (default 64; 413 past it)")
    p.add_argument("--max-input-tokens", type=int,
                   help="tokens in one input (default: the model's limit; 413 past it unless the request truncates)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20, help="request body size (default 2 MiB)")
    p.add_argument("--max-response-bytes", type=int, default=64 * 2**20,
                   help="an answer's size (/fill-mask, /embed_all), estimated before any work; 422 past it (default 64 MiB)")
    p.add_argument("--read-timeout", type=float, default=15.0,
                   help="seconds a request's head, then its body, may take to arrive; slower connections are "
                        "closed (default 15)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before an unanswered request gets 503 (default 30)")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="pooling of /v1/embeddings and the default of /embed (default cls: the <s> vector)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default $ROBERTA_API_KEY; unset: no key)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def _source_args(p) -> None:
    """Where models come from: the caches, a mirror, offline mode (see roberta/download.py)."""
    p.add_argument("--offline", action="store_const", const=True,
                   help="never download (default: off, unless HF_HUB_OFFLINE=1 or ROBERTA_OFFLINE=1)")
    p.add_argument("--cache-dir", help="cache for Hub repositories and fairseq releases (default: the Hugging Face "
                   "cache, $HF_HOME/hub, for Hub ids; $ROBERTA_CACHE or ~/.cache/roberta for releases)")
    p.add_argument("--base-url", help="a mirror to download from (default: $HF_ENDPOINT or the Hugging Face Hub for Hub "
                   "ids, $ROBERTA_BASE_URL or the official location for fairseq releases)")


def _inputs(args, skip_blank: bool = False):
    """Each input as its sentences (one, or a pair), one per TEXT argument or per line of --input or
    stdin, read as needed. A blank line is an error naming it (rows must stay aligned with lines),
    unless --allow-empty; encode and decode skip blank lines (`skip_blank`)."""
    from .jobs import input_format, open_lines, read_inputs

    source = getattr(args, "input", None)
    if args.text and source:
        raise RobertaError("give the inputs as TEXT arguments or with --input, not both")
    if args.text:
        lines = (text.encode("utf-8", "surrogateescape") for text in args.text)
        name = "argument"
    elif source is None and (sys.stdin is None or sys.stdin.isatty()):  # None: stdin was closed (<&-)
        raise RobertaError(f"give the inputs as arguments or pipe them on stdin, e.g. echo 'Hello world!' | roberta {args.command} -m roberta.base")
    else:
        lines, name = open_lines(source), source or "stdin"
        if skip_blank:
            lines = (line for line in lines if line.strip())
    pairs = hasattr(args, "pair_field")  # commands without --pair-field take single texts: a .tsv is their text
    format = input_format(source, getattr(args, "format", None), pairs) if not args.text else "text"
    return read_inputs(lines, format, getattr(args, "field", "text"), getattr(args, "pair_field", None),
                       getattr(args, "allow_empty", None), name=name)


def _source(args) -> str:
    """What the inputs' errors call where they came from: argument, the --input file, or stdin."""
    return "argument" if args.text else getattr(args, "input", None) or "stdin"


def _texts(args, skip_blank: bool = False):
    """`_inputs` as strings, the sentences of a pair joined by a TAB."""
    return ("\t".join(sentences) for sentences in _inputs(args, skip_blank))


def _where(args, number: int) -> str:
    """What an error calls the input numbered `number` (from 1): argument N, or FILE/stdin line N."""
    return f"argument {number}" if args.text else f"{_source(args)} line {number}"


def _each(args, inputs, run, show, named: bool = False, size: int = 32) -> None:
    """`run(chunk, first)` on chunks of `size` inputs (`first`: the first one's number, from 1), then
    `show(input, result)` for each result, in input order. A refused input stops the command with an
    error naming it (`named`: run's errors name it already), after the outputs of every input before it:
    a chunk the library refuses is run again one input at a time, up to the refused one."""
    from .errors import InputError
    from .jobs import chunks

    number = 0  # the inputs shown so far
    for chunk in chunks(inputs, size, partial_before_error=True):
        try:
            results = run(chunk, number + 1)
        except InputError:
            results = []
            for item in chunk:
                try:
                    results += run([item], number + len(results) + 1)
                except InputError as exc:
                    for done, result in zip(chunk, results):
                        show(done, result)
                    raise exc if named else InputError(f"{_where(args, number + len(results) + 1)}: {exc}") from None
        for item, result in zip(chunk, results):
            show(item, result)
        number += len(chunk)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _print(args, value, text: str) -> None:
    print(json.dumps(value, ensure_ascii=False) if args.json else text)


def _first_process() -> bool:
    """Whether this process prints the command's result: under torchrun only the first does."""
    return int(os.environ.get("RANK", "0")) == 0


def _load(args):
    from .device import resolve_device
    from .hub import load

    device = resolve_device(args.device)
    hub = load(args.model, device=device, cache_dir=args.cache_dir, offline=args.offline, base_url=args.base_url,
                precision=args.precision, inference_only=True)
    exact = "" if hub.precision == "fp32" else "; --precision fp32 for the exact float32 numbers"
    note = f"ran on {device} in {hub.precision} ({hub.precision_reason}){exact}"
    if sys.stderr.isatty():  # a person at a terminal hears it first
        print(note.replace("ran on", "running on", 1), file=sys.stderr)
    elif args.precision == "auto":  # what `auto` chose changes the numbers: said once the command succeeded,
        args.precision_note = note  # so that an error stays the one line on stderr
    return hub


def _encode(args):
    from .hub import encode, load_tokenizer

    tokenizer = load_tokenizer(args.model, cache_dir=args.cache_dir, offline=args.offline, base_url=args.base_url)
    for sentences in _inputs(args, skip_blank=True):
        ids = encode(tokenizer, *sentences).tolist()
        _print(args, ids, " ".join(map(str, ids)))


def _decode(args):
    from .hub import decode, load_tokenizer

    tokenizer = load_tokenizer(args.model, cache_dir=args.cache_dir, offline=args.offline, base_url=args.base_url)
    for line in [" ".join(args.text)] if args.text else _texts(args, skip_blank=True):
        try:
            ids = [int(i) for i in line.replace(",", " ").strip("[] ").split()]
        except ValueError:
            raise RobertaError(f"decode takes token ids separated by spaces or commas, got {line!r}") from None
        text = decode(tokenizer, ids)
        _print(args, text, text if isinstance(text, str) else "\t".join(text))


def _fill_mask(args):
    hub = _load(args)
    if not hub.has_lm_head():  # as the server's 409: predictions from a random head are noise
        raise RobertaError(f"{args.model} has no masked-LM head (lm_head.*), so fill-mask would predict at random; "
                           "use a checkpoint saved with its LM head")

    def show(text, result):
        per_mask = result if text.count("<mask>") > 1 else [result]
        _print(args, result, "\n".join([text] + [f"  {c['score']:.4f}  {c['token_str']!r:<16} {c['sequence']}"
                                                 for mask in per_mask for c in mask]))

    _each(args, _texts(args), lambda texts, _: hub.fill_mask(texts, topk=args.topk, as_dicts=True), show)


def _check_job_options(args) -> None:
    """Options of features and predict that cannot be meant together, refused before any work."""
    if args.truncate and (args.window is not None or args.stride is not None):
        raise RobertaError("--truncate cuts a long input at the model's limit, and --window/--stride read all of it "
                           "in windows: give one of them")
    if args.out is not None and Path(args.out).suffix in (".npy", ".jsonl") and (args.resume or args.overwrite):
        raise RobertaError(f"--resume and --overwrite are for a sharded job's directory; {args.out} is one file, "
                           "written whole each run: leave them out, or give a directory as --out")


def _features(args):
    from .hub import write_features

    _check_job_options(args)
    if Path(args.out).suffix in (".npy", ".jsonl"):
        if not Path(args.out).parent.is_dir():  # before the model loads or any input is read
            raise RobertaError(f"cannot write {args.out}: the directory {Path(args.out).parent} does not exist; "
                               "create it first")
        hub = _load(args)
        count = 0

        def texts():  # streamed: the rows go to the file as they are computed
            nonlocal count
            for count, text in enumerate(_texts(args), 1):
                yield text

        shape = write_features(hub, texts(), args.out, pool=args.pool, layer=args.layer, truncate=args.truncate,
                               batch_tokens=args.batch_tokens, window=args.window, stride=args.stride,
                               name=_source(args))
        _print(args, {"path": args.out, "inputs": count, "shape": shape},
               f"wrote {_count(count, 'input')} to {args.out} (vectors of {shape[-1]})")
        return
    _job(args, "features")


def _job(args, kind: str):
    """A sharded, streaming job into the directory --out (see roberta/jobs.py)."""
    import os

    from . import jobs

    jobs.prepare_output(args.out, args.resume, args.overwrite, remove=False)  # before the model loads
    if args.text:
        raise RobertaError("a sharded job reads --input or stdin; write TEXT arguments to a .npy or .jsonl file")
    if args.device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if torch.cuda.is_available():  # under torchrun: one GPU per process
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    hub = _load(args)
    pool, head = "cls", None
    if kind == "features":
        pool = args.pool or _own_pool(hub)
    else:
        head = _head(args, hub)
    index = jobs.run(hub, kind, args.input, args.out, format=args.format, field=args.field,
                     pair_field=args.pair_field, allow_empty=args.allow_empty, pool=pool,
                     layer=getattr(args, "layer", -1), head=head,
                     truncate=args.truncate, window=args.window, stride=args.stride,
                     window_pool=args.pool if kind == "predict" else "mean", shard_rows=args.shard_rows,
                     batch_tokens=args.batch_tokens, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.no_progress,
                     model_name=str(args.model))
    if _first_process():
        _print(args, {"path": args.out, "inputs": index["rows"], "shards": len(index["shards"]),
                      "width": index["width"]},
               f"wrote {_count(index['rows'], 'input')} to {args.out} in {_count(len(index['shards']), 'shard')} "
               f"(rows of {index['width']})")


def _own_pool(hub) -> str:
    """The pooling a sharded job uses when --pool is left out: the model's own where shards can give it."""
    own = hub.pooling
    if own is None:
        return "cls"
    if own.mode not in ("cls", "mean") or own.normalize or own.max_tokens is not None:
        raise RobertaError(f"this sentence-transformers model pools with {own.mode}"
                           f"{', normalised' if own.normalize else ''}{', cut at its max_seq_length' if own.max_tokens else ''}, "
                           "which sharded jobs do not give: write a .npy or .jsonl file, or choose --pool cls or mean")
    return own.mode


def _predict(args):
    from . import jobs

    _check_job_options(args)
    if args.out is not None:
        return _job(args, "predict")
    hub = _load(args)
    head = _head(args, hub)
    names = hub.labels(head)  # a fine-tuned classifier's id2label, else class indices
    windowed = args.window is not None or args.stride is not None
    scores = hub.model.config.classification_heads[head] == 1  # a regression or a cross-encoder: its score
    if not args.json:  # a header naming the columns: the label, each class's probability, the input
        classes = names or [str(i) for i in range(hub.model.config.classification_heads[head])]
        print("score\tinput" if scores else f"label\t{' '.join(classes)}\tinput")

    def run(batch, first):  # a line of a file or stdin is named here; an argument by `_each`
        tokens = jobs.tokenize(hub, batch, args.truncate, windowed, first_line=None if args.text else first,
                               name=_source(args))
        return jobs.prediction_rows(hub, tokens, head, args.batch_tokens, args.window, args.stride, args.pool).tolist()

    def show(sentences, row):
        if scores:
            return _print(args, {"score": row[0]}, f"{row[0]:.4f}\t{chr(9).join(sentences)}")
        index = max(range(len(row)), key=row.__getitem__)
        label = names[index] if names else index
        value = {"label": label, "index": index, "probabilities": row}
        _print(args, {**value, "labels": names} if names else value,
               f"{label}\t{' '.join(f'{p:.4f}' for p in row)}\t{chr(9).join(sentences)}")

    _each(args, _inputs(args), run, show, named=not args.text)


def _head(args, hub) -> str:
    """--head, or the model's only classification head."""
    from .model import find_head

    heads = sorted(hub.model.config.classification_heads)
    if args.head is not None:
        if find_head(args.head, heads) is None:
            raise RobertaError(f"this model has no head named {args.head!r}: "
                               f"{'it has ' + ', '.join(heads) if heads else 'it has none, fine-tune one first'}")
        return find_head(args.head, heads)
    if len(heads) != 1:
        raise RobertaError(f"this model has {'no classification head' if not heads else 'heads ' + ', '.join(heads)}; "
                           f"{'fine-tune one first' if not heads else 'choose one with --head'}")
    return heads[0]


def _zero_shot(args):
    hub = _load(args)
    _each(args, _texts(args),
          lambda texts, _: [hub.zero_shot(text, args.labels, hypothesis_template=args.template,
                                          multi_label=args.multi_label, head=args.head) for text in texts],
          lambda text, result: _print(args, result, "\n".join(
              [text] + [f"  {score:.4f}  {label}" for label, score in zip(result["labels"], result["scores"])])),
          size=1)  # each text is one batch of its pairs already: printed as soon as it is scored


def _rerank(args):
    hub = _load(args)
    texts = list(_texts(args))
    ranks = hub.rerank(args.query, texts, top_k=args.top_k, head=args.head)
    if args.json:
        return print(json.dumps(ranks))
    for rank in ranks:
        print(f"{rank['corpus_id']}\t{rank['score']:.4f}\t{texts[rank['corpus_id']]}")


def _tag(args):
    hub = _load(args)
    label = "entity" if args.aggregation == "none" else "entity_group"
    _each(args, _texts(args), lambda texts, _: hub.tag(texts, aggregation=args.aggregation, stride=args.stride),
          lambda text, entities: _print(args, entities, "\n".join(
              [text] + [f"  {e[label]:<10} {e['score']:.4f}  {e['start']}-{e['end']}  {text[e['start']:e['end']]}"
                        for e in entities])))


def _answer(args):
    if args.context is not None and args.context_file is not None:
        raise RobertaError("give --context or --context-file, not both")
    if args.null_threshold is not None and not args.no_answer:
        raise RobertaError("--null-threshold weighs the empty answer, which only --no-answer allows: add --no-answer, "
                           "or leave --null-threshold out")
    context = args.context
    if args.context_file is not None:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RobertaError(f"cannot read --context-file {args.context_file}: {exc}") from None
    if context is not None:  # the one context for all: each input is a question alone
        args.pair_field = None
    hub = _load(args)

    def pairs():  # (question, context) of each input, checked as it is read
        for number, sentences in enumerate(_inputs(args), 1):
            if context is None and len(sentences) < 2:
                raise RobertaError(f"{_where(args, number)} has no context: give QUESTION<TAB>CONTEXT, JSONL with a "
                                   "context field (--pair-field), or --context")
            if context is not None and len(sentences) > 1:
                raise RobertaError(f"{_where(args, number)} has a context after a TAB, and --context gives another: "
                                   "drop one")
            yield sentences[0], context if context is not None else sentences[1]

    def show(pair, found):
        found = found if isinstance(found, list) else [found]
        _print(args, found, "\n".join([pair[0]] + [f"  {a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']}"
                                                   for a in found]))

    _each(args, pairs(), lambda chunk, _: hub.answer(
        [q for q, _ in chunk], [c for _, c in chunk], topk=args.topk, no_answer=args.no_answer,
        null_threshold=args.null_threshold or 0.0, max_answer_len=args.max_answer_len, max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride), show)


def _export(args):
    from .export import export_onnx

    print(f"wrote {export_onnx(args.model, args.onnx, cache_dir=args.cache_dir, offline=args.offline)}")


def _download(args):
    from . import download
    from .hub import resolve

    if not args.names:
        if not args.json:
            print("fairseq releases (cached: downloaded, works offline; not cached: `roberta download NAME` fetches "
                  "it); any Hub id, e.g. FacebookAI/roberta-base, downloads the same way")
        for name in download.MODELS:
            cached = download.is_cached(name, args.cache_dir)
            _print(args, {"name": name, "cached": cached, "path": str(download.model_dir(name, args.cache_dir))},
                   f"  {name:<24} {'cached' if cached else 'not cached'}")
    for name in args.names:
        if name not in download.MODELS and not download.parse_hub_id(name):
            raise RobertaError(f"{name!r} is neither a Hub id (org/name[@revision]) nor a fairseq release "
                               f"({', '.join(download.MODELS)})")
        path = resolve(name, args.cache_dir, args.offline, args.base_url)
        _print(args, {"name": name, "path": str(path)}, str(path))


def _info(args):
    from .hub import describe

    if args.show_device:
        _device_info(args)
    if not args.model:
        if not args.show_device:
            raise RobertaError("info needs -m MODEL (or --device to describe this machine)")
        return
    info = describe(args.model, cache_dir=args.cache_dir, offline=args.offline, base_url=args.base_url)
    c = info["config"]
    heads = "; ".join(f"{t['name']} ({t['task']}, {t['classes']} outputs{': ' + ', '.join(t['labels']) if t['labels'] else ''})"
                      for t in info["tasks"]) or "none"
    lines = [f"path        {info['path']} ({info['format']})"]
    if info["repository"]:
        lines.append(f"repository  {info['repository']} at revision {info['revision']}")
    lines += [
        f"config      {c['num_hidden_layers']} layers x {c['hidden_size']}, {c['num_attention_heads']} heads, "
        f"FFN {c['intermediate_size']}, vocabulary {c['vocab_size']}, max {info['max_tokens']} tokens",
        f"heads       {heads}"]
    if info["pooling"]:
        p = info["pooling"]
        limit = f", max {p['max_tokens']} tokens" if p["max_tokens"] else ""
        lines.append(f"pooling     {p['mode']}{', normalised' if p['normalize'] else ''}{limit} (sentence-transformers)")
    if info["cross_encoder"]:
        c = info["cross_encoder"]
        limit = f", max {c['max_tokens']} tokens" if c["max_tokens"] else ""
        lines.append(f"scores      {c['activation']} of one output{limit} (a sentence-transformers CrossEncoder)")
    lines += [f"parameters  {info['parameters']:,}", f"dtype       {info['dtype']}",
              f"size        {info['size_bytes'] / 2**20:.1f} MiB in {len(info['files'])} files"]
    lines += [f"  {size / 2**20:10.2f} MiB  {name}" for name, size in info["files"].items()]
    _print(args, info, "\n".join(lines))


def _device_info(args):
    import torch

    from .device import resolve_device
    from . import kernels, runtime
    from .inference import BF16_FLAGS, INT8_FLAGS, cpu_flags, cpu_name, resolve_precision

    device = resolve_device(args.show_device)
    precision, why = resolve_precision("auto", device)
    flags = sorted(cpu_flags().intersection(BF16_FLAGS + INT8_FLAGS + ("avx512f", "avx2", "amx_int8")))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {"device": str(device), "cpu": cpu_name(), "cpu_flags": flags, "gpu": gpu,
            "precision": precision, "reason": why, "kernels_mode": kernels.mode(), "mkl_paths": runtime.mkl_paths()}
    info["kernels"] = kernels.report() if device.type == "cpu" and kernels.mode() != "default" else []
    _print(args, info, "\n".join([f"device      {device}" + (f" ({gpu})" if gpu else ""),
                                   f"cpu         {info['cpu']}; {' '.join(flags) or 'no AVX2/AVX-512'}",
                                   f"precision   auto -> {precision} ({why})",
                                   "mkl         " + ("code path by instruction set, on any vendor's CPU"
                                                     if info["mkl_paths"] == "isa" else
                                                     "its own choice of code path (generic on a CPU not Intel's)")]
                                  + [f"kernel      {kernels.describe(row)}" for row in info["kernels"]]
                                  + ([f"kernels     F.linear everywhere ({kernels.ENV}=default)"]
                                     if kernels.mode() == "default" else [])))


def _serve(args):
    import os

    from .serve import API_KEY_ENV, ServeSettings, listen, serve

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    settings = ServeSettings(max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                             max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_inputs=args.max_inputs,
                             max_input_tokens=args.max_input_tokens, max_body_bytes=args.max_body_bytes,
                             max_response_bytes=args.max_response_bytes, read_timeout_s=args.read_timeout,
                             timeout_s=args.timeout, pooling=args.pooling, api_key=api_key)
    sock = listen(args.host, args.port)  # before loading: a busy port fails at once
    hub = _load(args)
    serve(hub, sock, settings, model_name=str(args.model), precision=hub.precision, access_log=args.access_log)


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, squad, race or custom")
    p.add_argument("--data", required=True, help="the task's data directory, e.g. glue_data/MNLI")
    p.add_argument("--model", required=True, help="a model name, directory or archive (pretrained for finetune, "
                   "fine-tuned for evaluate: the model/ folder finetune wrote)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe setting, e.g. --set lr=2e-5")
    p.add_argument("--text-columns", nargs="+", help="custom: one or two text columns, by name or by position "
                   "0, 1, ... for a file without a header (default: text)")
    p.add_argument("--label-column", help="custom: the label column, by name or position (default: label)")
    p.add_argument("--problem-type", choices=["classification", "regression", "multi_label"],
                   help="custom: the kind of label (default: classification)")
    p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip and count malformed rows")
    p.add_argument("--max-dev-examples", type=int, help="score at most this many dev examples (default: all)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto, cuda when available)")


_RECIPE_FLAGS = ["text_columns", "label_column", "problem_type", "skip_bad_rows", "max_dev_examples", "device"]


def _recipe(args, names: list[str]):
    """The task's recipe with the flags the user gave, then --set (which wins)."""
    from .finetune import recipe_for

    names += _RECIPE_FLAGS
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return recipe_for(args.task, **given).with_sets(args.set)


def _finetune(args) -> int:
    from .finetune import finetune

    names = ["lr", "batch_size", "max_epochs", "max_train_examples", "eval_every", "head_name"]
    saved = Path(args.out) / "recipe.json"
    if args.resume and saved.is_file():  # the run's own recipe; what is given again must agree with it
        from .finetune import Recipe, task_name
        from .train import read_settings

        given = {n: getattr(args, n) for n in names + _RECIPE_FLAGS if getattr(args, n, None) is not None}
        recipe = read_settings(Recipe, saved).replace(task=task_name(args.task), **given).with_sets(args.set)
    else:
        recipe = _recipe(args, names)
    result = finetune(args.task, args.data, args.model, args.out, recipe=recipe, resume=args.resume)
    if _first_process():
        print(json.dumps(result, indent=2))
    return 0


def _evaluate(args) -> int:
    from .finetune import evaluate

    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    out = args.out or model_dir / f"eval_{args.split}.json"
    recipe = _recipe(args, [])
    result = evaluate(args.task, args.data, args.model, args.split, args.predictions, out, args.batch_size,
                      recipe=recipe)
    if _first_process():
        print(json.dumps(result, indent=2))
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's fine-tuning protocol: a grid of settings, 5 seeds, the median "
                       "of the best setting beside the published number")
    p.add_argument("tasks", nargs="+", metavar="TASK", help="glue, squad, race, or task names (MNLI, RTE, ...)")
    p.add_argument("--model", required=True, help="the pretrained model: a name, directory or archive")
    p.add_argument("--data", required=True, help="the folder that holds each task's data: glue_data's MNLI/, SST-2/, "
                   "..., and squad/, RACE/")
    p.add_argument("--out", required=True, help="sweep directory: OUT/<TASK>/<setting>-seed<N>/ run directories, "
                   "table.md, table.json, scores.png")
    p.add_argument("--grid", default="paper", help="paper, fairseq (its README's per-task settings), or a JSON/YAML "
                   "file in the layout of roberta.reproduce.PAPER")
    p.add_argument("--mnli-model", help="start the MNLI-initialised tasks (large: RTE, STS-B, MRPC) from this "
                   "fine-tuned MNLI model (default: the sweep's own MNLI runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe setting every run takes "
                   "besides the protocol's, e.g. --set precision=bf16")
    p.add_argument("--device", default="auto", help="auto (every GPU, else the CPU), cpu or cuda")
    p.add_argument("--jobs", type=_positive_int, help="runs at a time (default: one per GPU; 1 on the CPU)")
    p.add_argument("--threads", type=_thread_count, help="CPU threads per run (default: the cores / --jobs)")
    p.add_argument("--print-commands", action="store_true", help="list the `roberta finetune` commands of the runs "
                   "not done (for a cluster scheduler) and run nothing")
    p.add_argument("--collect", action="store_true", help="write the table from what the run directories hold; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    b = p.add_argument_group("budget", "cut the protocol for a quick look (the table lists every cut)")
    b.add_argument("--seeds", type=_positive_int, help="the first N of the protocol's seeds (default: all five)")
    b.add_argument("--lr", type=_number_list(float), help="keep the settings with these learning rates, e.g. 2e-5,3e-5 (default: all the grid's)")
    b.add_argument("--batch-size", type=_number_list(int), help="keep the settings with these batch sizes, e.g. 32 (default: all the grid's)")
    b.add_argument("--data-fraction", type=float, help="train on this fraction of each task's training rows (default: all)")
    p.set_defaults(func=_reproduce)


def _number_list(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return parse


def _reproduce(args) -> int:
    from .reproduce import Budget, markdown, reproduce

    budget = Budget(args.seeds, args.lr, args.batch_size, args.data_fraction)
    extra = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RobertaError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set precision=bf16")
        extra[key.strip()] = value.strip()
    result = reproduce(args.tasks, args.model, args.data, args.out, args.grid, budget, args.device, args.mnli_model,
                       args.jobs, args.threads, args.print_commands, args.collect, progress=not args.no_progress,
                       extra=extra)
    print("\n".join(result) if args.print_commands else markdown(result), end="\n" if args.print_commands else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. The one place where a user's mistake becomes `error: ...` and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    with warnings.catch_warnings():
        warnings.simplefilter("always", RobertaWarning)
        warnings.showwarning = _show_warning
        try:
            for i, arg in enumerate(argv):
                _check_utf8(arg, f"argument {i + 1}")
            if isinstance(sys.stdin, io.TextIOWrapper):  # bad bytes on stdin are an error, never U+FFFD
                sys.stdin.reconfigure(encoding="utf-8", errors="strict")
            args = build_parser().parse_args(argv)
            if args.command in COMPUTING and args.threads:
                import torch

                torch.set_num_threads(args.threads)
            stdout = sys.stdout
            if isinstance(stdout, io.TextIOWrapper):  # a real file or pipe (not a test's capture)
                sys.stdout = _Stdout(stdout)
            try:
                status = args.func(args) or 0
                sys.stdout.flush()
            finally:
                sys.stdout = stdout
            if status == 0 and getattr(args, "precision_note", None):
                print(args.precision_note, file=sys.stderr)
            return status
        except RobertaError as exc:
            return _fail(str(exc))
        except UnicodeDecodeError as exc:
            return _fail(f"the input is not valid UTF-8 ({exc.reason} at byte {exc.object[exc.start:exc.start + 1]!r}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8")
        except BrokenPipeError:
            # The reader went away (`roberta fill-mask ... | head -1`): stop quietly, as Unix tools do.
            _discard(sys.stdout.fileno())
            return 141  # what a shell reports for a process ended by SIGPIPE
        except _OutputError as exc:  # stdout on a full disk, /dev/full, EIO: what is left for it is dropped
            _discard(exc.fileno)
            return _fail(f"cannot write the output: {exc.strerror}")
        except OSError as exc:
            if exc.filename is None:
                raise
            return _fail(f"{exc.filename}: {exc.strerror}")  # a path that cannot be read or written, a full disk
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def _discard(fileno: int) -> None:
    """Point the output at /dev/null: what is left in its buffer cannot be written, and the interpreter's
    last flush must not fail a second time."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), fileno)


class _OutputError(OSError):
    """Writing to stdout failed (not a closed pipe: that ends the command quietly)."""

    def __init__(self, exc: OSError, fileno: int):
        super().__init__(exc.errno, exc.strerror)
        self.fileno = fileno


class _Stdout:
    """sys.stdout for the length of a command, its failures to write told apart from other OSErrors."""

    def __init__(self, stream):
        self._stream = stream

    def _do(self, method, *args):
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc, self._stream.fileno()) from None

    def write(self, text):
        return self._do("write", text)

    def flush(self):
        return self._do("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
    return 2


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # the OS decoded undecodable bytes as lone surrogates
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise RobertaError(f"{what} is not valid UTF-8 (byte {bad!r} in {text.encode('utf-8', 'surrogateescape')!r}); "
                           "pass UTF-8 text") from None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, RobertaWarning):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


if __name__ == "__main__":
    sys.exit(main())

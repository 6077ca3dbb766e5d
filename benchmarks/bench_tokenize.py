"""Tokenisation throughput, this project against transformers' fast tokenizer, on the same texts.

Texts: every SST-2 train sentence, RTE premise and hypothesis, and corpus line (natural lengths).
Ours: `RobertaTokenizer.encode_batch(texts)`; transformers: `RobertaTokenizer(texts)` (v5: the
`tokenizers`-backed fast tokenizer), both from the same vocab.json/merges.txt. Passes alternate; the
median is reported, with the ids compared for equality and each side's peak memory from a child process.

    PYTHONPATH=. python benchmarks/bench_tokenize.py
"""
from __future__ import annotations

import argparse
import json
import time

from common import DATA, child_memory, corpus_lines, median, run_child, table, tsv_column

SIDES = ["transformers", "ours"]


def texts() -> list[str]:
    # WikiText writes rare words as the literal `<unk>`, which transformers parses as the special token
    # and ours, as fairseq, as text: spelled without brackets, both sides read the same characters.
    return (tsv_column(DATA / "glue" / "SST-2" / "train.tsv", "sentence")
            + tsv_column(DATA / "glue" / "RTE" / "train.tsv", "sentence1", "sentence2")
            + [line.replace("<unk>", "unk") for line in corpus_lines()])


def load(side: str):
    """A function from a list of texts to their id lists."""
    if side == "transformers":
        import transformers

        tokenizer = transformers.RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
        return lambda batch: tokenizer(batch)["input_ids"]
    from roberta.tokenizer import RobertaTokenizer

    return RobertaTokenizer.from_pretrained(DATA / "roberta-bpe").encode_batch


def child(side: str) -> None:
    corpus = texts()
    child_memory(lambda: load(side), lambda encode: encode(corpus))


def main() -> None:
    corpus = texts()
    encoders = {side: load(side) for side in SIDES}
    ids = {side: encode(corpus) for side, encode in encoders.items()}  # warm-up and the equality check
    tokens = sum(map(len, ids["ours"]))
    print(f"{len(corpus)} texts, {tokens} tokens; identical ids: {ids['ours'] == ids['transformers']}", flush=True)
    seconds = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side, encode in encoders.items():
            t = time.perf_counter()
            encode(corpus)
            seconds[side].append(time.perf_counter() - t)
    memory = {side: run_child(__file__, side) for side in SIDES}
    reference = tokens / median(seconds["transformers"])
    rows = [[side, tokens / median(seconds[side]), tokens / median(seconds[side]) / reference,
             memory[side]["peak_mib"], memory[side]["run_added_mib"]] for side in SIDES]
    print(table(["side", "tokens/s", "x transformers", "peak RSS MiB (load + run)", "MiB added by the run"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", metavar="SIDE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args.child) if args.child else main()

"""Tagging and answering many inputs: in batches (what `roberta tag` / `roberta answer` do from a pipe)
against one input at a time, and tagging against transformers' token-classification pipeline.

A base-size tagger (9 labels) and reader with random weights, the same weights in transformers (saved by
this project's save_pretrained, read by from_pretrained). Inputs: the first SST-2 dev sentences; for
answering, one question about each of them. Rows, timed in turn within one process (passes
interleaved, so that the machine's drift reaches every row), the median pass reported:
- ours, batched: `spans.tag_many` / `spans.answer_many` on all inputs;
- ours, one at a time: `spans.tag` / `spans.answer` per input (what the commands did before);
- transformers: `pipeline("token-classification", batch_size=32)` on all inputs (tagging only:
  transformers 5 has no question-answering pipeline).
fp32 throughout, as loaded (no inference-only preparation), the same thread count for all.

    PYTHONPATH=. python benchmarks/bench_spans.py --repeats 5
"""
from __future__ import annotations

import argparse
import tempfile
import time

import roberta  # noqa: F401  (before torch: the runtime settings the commands run with)
import torch

from common import DATA, cpu_line, median, table, tsv_column


def main() -> None:
    import transformers

    from roberta import RobertaConfig, RobertaForQuestionAnswering, RobertaForTokenClassification, spans
    from roberta.tokenizer import RobertaTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = tsv_column(DATA / "glue" / "SST-2" / "dev.tsv", "sentence")[:args.inputs]
    questions = [("What is this review about?", text) for text in texts[:args.questions]]
    bpe = DATA / "roberta-bpe"
    tokenizer = RobertaTokenizer.from_pretrained(bpe)
    config = RobertaConfig.base(num_hidden_layers=args.layers)
    tagger = RobertaForTokenClassification(RobertaConfig.base(num_hidden_layers=args.layers, num_labels=9)).eval()
    reader = RobertaForQuestionAnswering(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tagger.save_pretrained(tmp, tokenizer=tokenizer)
        hf_tokenizer = transformers.RobertaTokenizerFast.from_pretrained(str(bpe))
        hf_tokenizer.model_max_length = 512  # the folder has no tokenizer_config.json to say so
        theirs = transformers.pipeline("token-classification", model=transformers.RobertaForTokenClassification
                                       .from_pretrained(tmp).eval(), tokenizer=hf_tokenizer,
                                       aggregation_strategy="simple", batch_size=32, device="cpu")
    rows = {
        "tag, ours batched": lambda: spans.tag_many(tagger, tokenizer, texts),
        "tag, ours one at a time": lambda: [spans.tag(tagger, tokenizer, t) for t in texts],
        "tag, transformers pipeline (batch 32)": lambda: theirs(texts),
        "answer, ours batched": lambda: spans.answer_many(reader, tokenizer, questions),
        "answer, ours one at a time": lambda: [spans.answer(reader, tokenizer, q, c) for q, c in questions],
    }
    print(cpu_line())
    print(f"{len(texts)} SST-2 dev sentences to tag, {len(questions)} questions; {args.layers} layers, "
          f"{args.threads} threads, fp32")
    with torch.inference_mode():
        for run in rows.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in rows}
        for repeat in range(args.repeats):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                  flush=True)
    out = []
    for name, spent in times.items():
        task = name.split(",")[0]
        count = len(texts) if task == "tag" else len(questions)
        batched = median(times[f"{task}, ours batched"])
        out.append([name, f"{median(spent):.2f}", f"{count / median(spent):.1f}", f"{median(spent) / batched:.2f}"])
    print(table(["row", "seconds (median)", "inputs/s", "x ours batched (time)"], out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=128, help="sentences to tag")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 is base size; fewer for a quick try")
    args = parser.parse_args()
    main()

"""Fine-tuning throughput: `roberta finetune` against transformers' Trainer, same model, data, settings.

    python benchmarks/bench_finetune.py [--model small] [--rows 512] [--passes 2] [--threads 2]

One model (a preset, random weights saved once, loaded by both), SST-2 training sentences tokenized
once with the real RoBERTa BPE, batch 32 grouped by length (both sides: Trainer's group_by_length),
AdamW (lr 1e-5, betas 0.9/0.98, eps 1e-6, weight decay 0.1), linear schedule, dropout 0.1, fp32 on
the CPU. Each pass trains one epoch; the passes of the two sides are interleaved so that other load on
the machine hits both alike. Throughput is real (non-padding) tokens per second of training: ours from
eval.json's train_seconds (the updates, batching included, dev evaluation left out), Trainer's from
its train_runtime (no evaluation either). Prints one JSON line per pass and
a summary with the ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DATA, ROOT, median, tsv_column

sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def prepare(root: Path, preset: str, rows: int) -> tuple[Path, Path, int]:
    import torch

    from roberta.model import RobertaConfig, RobertaForMaskedLM
    from roberta.tokenizer import RobertaTokenizer

    tok = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    torch.manual_seed(0)
    model_dir = root / "model"
    RobertaForMaskedLM(getattr(RobertaConfig, preset)()).save_pretrained(model_dir, tokenizer=tok)
    sentences = tsv_column(DATA / "glue" / "SST-2" / "train.tsv", "sentence")[:rows]
    labels = [line.split("\t")[1] for line in (DATA / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[1:rows + 1]]
    data = root / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for s, y in zip(sentences, labels):
            f.write(json.dumps({"text": s, "label": y}) + "\n")
    (data / "dev.jsonl").write_text("".join(json.dumps({"text": s, "label": y}) + "\n"
                                            for s, y in zip(sentences[:32], labels[:32])))
    tokens = sum(len(ids) for ids in tok.encode_batch(sentences, max_length=512))
    return model_dir, data, tokens


def theirs(model_dir: Path, data: Path, out: Path) -> dict:
    import torch
    from transformers import RobertaForSequenceClassification, Trainer, TrainingArguments
    from transformers import logging as hf_logging

    from roberta.tokenizer import RobertaTokenizer

    hf_logging.set_verbosity_error()
    tok = RobertaTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    names = sorted({r["label"] for r in records})
    ids = tok.encode_batch([r["text"] for r in records], max_length=512)
    dataset = [{"input_ids": i, "attention_mask": [1] * len(i), "labels": names.index(r["label"])}
               for i, r in zip(ids, records)]

    class Padder:  # pads as DataCollatorWithPadding does (which wants a transformers tokenizer)
        def __call__(self, features):
            T = max(len(f["input_ids"]) for f in features)
            return {"input_ids": torch.tensor([f["input_ids"] + [1] * (T - len(f["input_ids"])) for f in features]),
                    "attention_mask": torch.tensor([f["attention_mask"] + [0] * (T - len(f["attention_mask"]))
                                                    for f in features]),
                    "labels": torch.tensor([f["labels"] for f in features])}

    model = RobertaForSequenceClassification.from_pretrained(model_dir, num_labels=2, hidden_dropout_prob=0.1,
                                                             attention_probs_dropout_prob=0.1)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=32, num_train_epochs=1,
                             learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
                             weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=0, train_sampling_strategy="group_by_length",
                             save_strategy="no", eval_strategy="no", report_to=[],
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Padder())
    metrics = trainer.train().metrics
    return {"updates": trainer.state.global_step, "seconds": metrics["train_runtime"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)  # one pass, in a child
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.side:
        root = Path(args.root)
        out = Path(tempfile.mkdtemp(dir=root))
        os.rmdir(out)
        if args.side == "ours":
            from roberta.finetune import finetune

            finetune("custom", root / "data", root / "model", out, lr=1e-5, batch_size=32, max_epochs=1,
                     dropout=0.1, log_every=1, warmup_updates=0, device="cpu")
            result = json.loads((out / "eval.json").read_text())
            print(json.dumps({"updates": result["updates"], "seconds": result["train_seconds"]}))
        else:
            print(json.dumps(theirs(root / "model", root / "data", out)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        _, _, tokens = prepare(root, args.model, args.rows)
        results = {"ours": [], "theirs": []}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        for p in range(args.passes):
            for side in ("ours", "theirs"):
                run = subprocess.run([sys.executable, __file__, "--side", side, "--root", str(root), "--threads",
                                      str(args.threads)], env=env, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"error: the {side} pass failed:\n{run.stderr[-3000:]}")
                line = json.loads(run.stdout.strip().splitlines()[-1])
                results[side].append(tokens / line["seconds"])
                print(json.dumps({"pass": p, "side": side, "updates": line["updates"],
                                  "tokens_per_s": round(tokens / line["seconds"], 1)}), flush=True)
        summary = {"model": args.model, "rows": args.rows, "real_tokens_per_epoch": tokens,
                   "ours_tokens_per_s": round(median(results["ours"]), 1),
                   "trainer_tokens_per_s": round(median(results["theirs"]), 1),
                   "ratio": round(median(results["ours"]) / median(results["theirs"]), 2),
                   "cpu": cpu_name(), "threads": args.threads, "load": os.getloadavg()}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

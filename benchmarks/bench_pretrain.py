"""Masked-LM pretraining steps, this project against transformers, base size, sequence length 128.

Inputs (`--inputs`): `packed` (default, RoBERTa's full-sentence training): corpus lines are tokenized,
joined with `</s>` and cut into 128-token sequences `<s> ... </s>`, so neither side has padding; `lines`
(line-by-line training, as transformers' run_mlm.py --line_by_line): one corpus line per sequence at
its natural length, cut at 128 tokens; transformers' collator pads each micro-batch to its longest
sequence, ours drops the padding. Tokens per second count real tokens only. An optimizer step is what large-batch pretraining does: `--accum`
micro-batches of `--micro` sequences, each masked, run forward and backward (gradients accumulate), then
gradient clipping at 1.0 and one fused AdamW update (transformers' Trainer default), in train mode with
dropout. transformers' side masks each micro-batch with `DataCollatorForLanguageModeling(mlm_probability=
0.15)` and trains `RobertaForMaskedLM` (LM head on all positions); ours does what `roberta/pretrain.py`
does: `data.mask_tokens` + `data.collate`, the model's labels-only LM head, the loss weighted by masked
tokens, and pretrain.py's AdamW parameter groups. Masking time counts on both sides. Steps alternate
between the sides; the median optimizer step is reported. Equal loss (and gradients) is checked on the
same collator-masked batch with dropout off. bf16 rows run both sides under
`torch.autocast(dtype=bfloat16)`. Peak memory comes from each row's own child process (one optimizer
step of two micro-batches). `--profile` prints where the time of one of our micro-steps goes.

    PYTHONPATH=. python benchmarks/bench_pretrain.py   # base, micro-batch 8 x 128, 4 per step, 2 timed steps
On a GPU, `--device cuda --peak-tflops 989` (H100 bf16 dense) adds model FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import numpy as np
import torch

from common import DATA, child_memory, corpus_lines, median, run_child, table

LENGTH = 128
SIDES = ["transformers-fp32", "ours-fp32", "transformers-bf16", "ours-bf16"]


def training_sequences(n: int) -> list[list[int]]:
    return packed_sequences(n) if args.inputs == "packed" else line_sequences(n)


def line_sequences(n: int) -> list[list[int]]:
    """One corpus line per sequence, `<s> line </s>`, cut at 128 tokens: line-by-line MLM training."""
    from roberta.tokenizer import RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    lines = corpus_lines()
    if len(lines) < n:
        raise SystemExit("error: not enough corpus lines for that many sequences; lower --steps or --accum")
    return [[0] + ids[:LENGTH - 2] + [2] for ids in tokenizer.encode_batch(lines[:n], add_special_tokens=False)]


def packed_sequences(n: int) -> list[list[int]]:
    from roberta.tokenizer import RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(corpus_lines()[: 40 * n], add_special_tokens=False):
        stream += ids + [tokenizer.eos_token_id]
    body = LENGTH - 2
    sequences = [[0] + stream[i:i + body] + [2] for i in range(0, len(stream) - body, body)][:n]
    if len(sequences) < n:
        raise SystemExit("error: not enough corpus text for that many sequences; lower --steps or --accum")
    return sequences


class Side:
    """One row: a model, its optimizer, and how it masks and runs a micro-batch."""

    def __init__(self, name: str, path: str, device: str):
        self.name, self.device = name, device
        self.ours = name.startswith("ours")
        if self.ours:
            from roberta import RobertaForMaskedLM
            from roberta.data import Masking

            self.model = RobertaForMaskedLM.from_pretrained(path)
            self.masking = Masking(mask_id=50264, special_ids=(0, 1, 2, 3, 50264), vocab_size=50265)
            params = list(self.model.parameters())  # as pretrain.py: no weight decay on 1-d parameters
            groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        else:
            import transformers

            self.model = transformers.RobertaForMaskedLM.from_pretrained(path)
            tokenizer = transformers.RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
            self.collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
            groups = self.model.parameters()
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=True)
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                         if name.endswith("bf16") else contextlib.nullcontext())

    def batch(self, sequences: list[list[int]], first: int) -> dict[str, torch.Tensor]:
        if self.ours:
            from roberta.data import collate, mask_tokens, sample_rng

            return collate([mask_tokens(np.array(s), self.masking, sample_rng(0, 0, first + i))
                            for i, s in enumerate(sequences)], self.masking.pad_id)
        masked = self.collator([{"input_ids": s} for s in sequences])
        # transformers attends to every position unless told: its padding needs the collator's mask
        return {"input_ids": masked["input_ids"], "attention_mask": masked["attention_mask"], "labels": masked["labels"]}

    def prepare(self, micro_batches: list[list[list[int]]], first: int) -> list[dict[str, torch.Tensor]]:
        """Mask every micro-batch of a step; the step's masked-token count weighs each micro-batch's loss."""
        batches = [self.batch(seqs, first + m * len(seqs)) for m, seqs in enumerate(micro_batches)]
        self.n_masked = sum(int(b["labels"].ne(-100).sum()) for b in batches)
        return batches

    def micro_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward and backward of one micro-batch; returns its loss times its share of the masked tokens."""
        share = int(batch["labels"].ne(-100).sum()) / self.n_masked
        with self.autocast:
            loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
        (loss * share).backward()
        return loss.item() * share

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, micro_batches: list[list[list[int]]], first: int) -> float:
        loss = sum(self.micro_step(batch) for batch in self.prepare(micro_batches, first))
        self.update()
        return loss


def split(sequences, micro: int):
    return [sequences[i:i + micro] for i in range(0, len(sequences), micro)]


def child(side: str, path: str) -> None:
    torch.set_num_threads(args.threads)
    sequences = training_sequences(2 * args.micro)
    child_memory(lambda: Side(side, path, "cpu"), lambda s: s.step(split(sequences, args.micro), 0))


def profile(path: str) -> None:
    """Where one of our fp32 micro-steps (forward + backward) and one optimizer update spend their time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    side = Side("ours-fp32", path, "cpu")
    sequences = training_sequences(2 * args.micro)
    side.step(split(sequences[:args.micro], args.micro), 0)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step(split(sequences[args.micro:], args.micro), args.micro)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def model_flops_per_token(config, masked_fraction: float) -> float:
    """Training FLOPs the model needs per token: 6 x weights used (LM head on masked tokens) + attention."""
    H, L, F, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    encoder = L * (4 * H * H + 2 * H * F)
    head = H * H + masked_fraction * V * H
    return 6 * (encoder + head) + 12 * L * LENGTH * H


def main() -> None:
    import transformers

    from roberta import RobertaConfig, RobertaForMaskedLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    per_step = args.micro * args.accum
    sequences = training_sequences(per_step * (args.steps + 1))
    tmp = tempfile.mkdtemp(prefix="bench_pretrain_")
    config = RobertaConfig.base(num_hidden_layers=args.layers)
    RobertaForMaskedLM(config).save_pretrained(tmp)
    if args.profile:
        return profile(tmp)
    # Tokens are real tokens: padding that transformers' collator adds to a micro-batch is not counted.
    step_tokens = [sum(map(len, sequences[i * per_step:(i + 1) * per_step])) for i in range(args.steps + 1)]
    padded = sum(args.micro * max(map(len, seqs)) for seqs in split(sequences[per_step:], args.micro))
    print(f"{args.inputs} inputs: micro-batch {args.micro} x up to {LENGTH}, {args.accum} micro-batches per optimizer "
          f"step ({sum(step_tokens[1:]) / args.steps:.0f} tokens on average; transformers' padded batches hold "
          f"{sum(step_tokens[1:]) / padded:.0%} real tokens), {args.layers} layers, {args.threads} threads, "
          f"device {args.device}", flush=True)

    # Equal loss (and gradients) on the same collator-masked batch, dropout off
    collator = transformers.DataCollatorForLanguageModeling(
        transformers.RobertaTokenizer.from_pretrained(DATA / "roberta-bpe"), mlm_probability=0.15)
    same = {k: v.to(args.device) for k, v in collator([{"input_ids": s} for s in sequences[:args.micro]]).items()
            if k in ("input_ids", "attention_mask", "labels")}
    losses, grads = {}, {}
    for name in ("transformers-fp32", "ours-fp32"):
        model = Side(name, tmp, args.device).model.eval()
        loss = model(**same).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    grad_diff = max((grads["ours-fp32"][n] - g).abs().max().item() for n, g in grads["transformers-fp32"].items())
    print(f"same masked batch, no dropout: loss transformers {losses['transformers-fp32']:.6f} ours "
          f"{losses['ours-fp32']:.6f}, max gradient difference {grad_diff:.2e}", flush=True)
    del grads, model

    names = [s for s in SIDES if args.bf16 or s.endswith("fp32")]
    sides = {name: Side(name, tmp, args.device) for name in names}
    # Sides alternate micro-batch by micro-batch, so that the load of a shared machine falls on all of
    # them alike; wall-clock and CPU seconds (process_time: time other jobs take is not counted) per side.
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    train_loss = {name: [] for name in names}

    def timed(name, work):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        result = work()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall[name][-1] += time.perf_counter() - t
        cpu[name][-1] += time.process_time() - c
        return result

    for i in range(args.steps + 1):  # step 0 is a warm-up of one micro-batch per side
        chunk = sequences[i * per_step:(i + 1) * per_step]
        micro_batches = split(chunk[:args.micro] if i == 0 else chunk, args.micro)
        for name in names:
            wall[name].append(0.0)
            cpu[name].append(0.0)
        batches = {name: timed(name, lambda: sides[name].prepare(micro_batches, i * per_step)) for name in names}
        losses = {name: 0.0 for name in names}
        for m in range(len(micro_batches)):
            for name in names:
                losses[name] += timed(name, lambda: sides[name].micro_step(batches[name][m]))
        for name in names:
            timed(name, sides[name].update)
            train_loss[name].append(losses[name])
        if i == 0:
            for name in names:
                wall[name].pop(), cpu[name].pop(), train_loss[name].pop()
            continue
        tokens = step_tokens[i]
        print(f"step {i}/{args.steps} tokens/s (wall, per CPU second): " + ", ".join(
            f"{s} {tokens / wall[s][-1]:.1f}, {tokens / cpu[s][-1]:.1f} (loss {train_loss[s][-1]:.3f})"
            for s in names), flush=True)
    del sides

    memory = {}
    if args.device == "cpu":
        memory = {name: run_child(__file__, name, tmp, "--threads", str(args.threads), "--micro", str(args.micro),
                                   "--inputs", args.inputs)
                  for name in names}
    rows = []
    tokens = step_tokens[1:]
    for name in names:  # speeds are medians over steps of tokens per second; ratios compare the same steps
        reference = name.replace("ours", "transformers")
        speed = median([t / w for t, w in zip(tokens, wall[name])])
        row = [name, speed, median([r / w for r, w in zip(wall[reference], wall[name])]),
               median([t / c for t, c in zip(tokens, cpu[name])]),
               median([r / c for r, c in zip(cpu[reference], cpu[name])]), " / ".join(f"{x:.3f}" for x in train_loss[name]),
               memory.get(name, {}).get("peak_mib", "-"), memory.get(name, {}).get("run_added_mib", "-")]
        if args.peak_tflops:
            row.append(f"{speed * model_flops_per_token(config, 0.15) / (args.peak_tflops * 1e12):.1%}")
        rows.append(row)
    headers = ["row", "tokens/s (wall)", "x transformers (wall)", "tokens per CPU second",
               "x transformers (CPU time)", "train loss per step", "peak RSS MiB (load + run)",
               "MiB added by the run"]
    print(table(headers + (["MFU"] if args.peak_tflops else []), rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per side (plus a warm-up)")
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", choices=["packed", "lines"], default="packed",
                        help="packed: corpus text cut into full 128-token sequences (no padding anywhere); "
                             "lines: one corpus line per sequence, natural length (transformers pads each "
                             "micro-batch to its longest)")
    parser.add_argument("--layers", type=int, default=12, help="12 is base size; fewer for a quick try")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 rows only")
    parser.add_argument("--profile", action="store_true", help="profile one of our fp32 micro-steps instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, to report MFU")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(*args.child) if args.child else main()

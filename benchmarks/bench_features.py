"""Feature extraction, this project against transformers, base size, on natural-length sentences.

Both models hold the same weights (ours saved with save_pretrained, theirs loaded with from_pretrained),
run in eval mode on the same token ids with the same thread count. transformers gets each batch of 32
padded to its longest member, as `tokenizer(batch, padding=True)` gives it. Our rows:
- "same batches": the same padded batches of 32 through `model(ids, mask)` (padding dropped inside);
- "bucketed": `inference.extract_features_batched` over the whole set (sorted by length, token budget);
- "bf16" / "int8": the same, after `inference.reduce_precision`.
Throughput counts real tokens only, for every row; timings are interleaved passes, median reported.
Peak memory is each row's own child process (VmHWM), so one model's memory never hides another's.

    PYTHONPATH=. python benchmarks/bench_features.py            # base size, 64 sentences, 2 repeats
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from common import child_memory, median, natural_sentences, run_child, table

BATCH = 32


def load(side: str, path: str):
    """The model a row runs, in eval mode, and how it turns a list of id lists into feature tensors."""
    from roberta.inference import extract_features_batched, pad_batch, reduce_precision

    if side == "transformers":
        import transformers

        model = transformers.RobertaModel.from_pretrained(path, add_pooling_layer=False).eval()

        def run(sequences):
            out = []
            for i in range(0, len(sequences), BATCH):
                ids, mask = pad_batch(sequences[i:i + BATCH], pad_id=1)
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                out += [h[: int(m.sum())] for h, m in zip(hidden, mask)]
            return out
        return run

    from roberta import RobertaModel

    mode, batching = side.split("-")
    model = reduce_precision(RobertaModel.from_pretrained(path).eval(), mode)
    if batching == "bucketed":
        return lambda sequences: extract_features_batched(model, sequences, batch_tokens=args.batch_tokens)

    def run(sequences):
        out = []
        for i in range(0, len(sequences), BATCH):
            ids, mask = pad_batch(sequences[i:i + BATCH], pad_id=1)
            hidden = model(ids, mask).last_hidden_state.float()
            out += [h[: int(m.sum())] for h, m in zip(hidden, mask)]
        return out
    return run


SIDES = ["transformers", "fp32-same", "fp32-bucketed", "bf16-same", "bf16-bucketed", "int8-same"]


def child(side: str, path: str, ids_file: str) -> None:
    """One row alone in this process: load, run once, report peak memory."""
    torch.set_num_threads(args.threads)
    with open(ids_file) as f:
        sequences = json.load(f)
    with torch.inference_mode():
        child_memory(lambda: load(side, path), lambda run: run(sequences))


def main() -> None:
    from roberta import RobertaConfig, RobertaModel
    from roberta.tokenizer import RobertaTokenizer
    from common import DATA

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
    sequences = tokenizer.encode_batch(natural_sentences(args.sentences), max_length=args.max_length)
    real = sum(map(len, sequences))
    padded = sum(len(sequences[i:i + BATCH]) * max(map(len, sequences[i:i + BATCH]))
                 for i in range(0, len(sequences), BATCH))
    tmp = tempfile.mkdtemp(prefix="bench_features_")
    config = RobertaConfig.base(num_hidden_layers=args.layers)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp)
    ids_file = f"{tmp}/ids.json"
    with open(ids_file, "w") as f:
        json.dump(sequences, f)
    print(f"{len(sequences)} sentences, {real} real tokens, {padded} once padded in batches of {BATCH}; "
          f"(truncated at {args.max_length}); {args.layers} layers, {args.threads} threads", flush=True)

    runs = {side: load(side, tmp) for side in SIDES}
    seconds = {side: [] for side in SIDES}
    outputs = {}
    with torch.inference_mode():
        for side, run in runs.items():  # warm-up, and the outputs compared below
            outputs[side] = run(sequences)
        for repeat in range(args.repeats):
            for side, run in runs.items():
                t = time.perf_counter()
                run(sequences)
                seconds[side].append(time.perf_counter() - t)
            print(f"repeat {repeat + 1}/{args.repeats}: " +
                  ", ".join(f"{s} {real / seconds[s][-1]:.0f}" for s in SIDES), flush=True)

    reference = outputs["transformers"]
    reference_fp32 = outputs["fp32-same"]
    memory = {side: run_child(__file__, side, tmp, ids_file, "--threads", str(args.threads),
                             "--batch-tokens", str(args.batch_tokens)) for side in SIDES}
    base_speed = real / median(seconds["transformers"])
    rows = []
    for side in SIDES:
        a = torch.cat(outputs[side]).double()
        diff = (a - torch.cat(reference).double()).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(a, torch.cat(reference_fp32).double(), dim=-1)
        speed = real / median(seconds[side])
        rows.append([side, speed, speed / base_speed, memory[side]["peak_mib"], memory[side]["run_added_mib"],
                     diff, f"{cos.min().item():.6f}", f"{cos.mean().item():.6f}"])
    print(table(["row", "tokens/s", "x transformers", "peak RSS MiB (load + run)", "MiB added by the run",
                 "max abs diff vs transformers", "min cosine vs fp32", "mean cosine vs fp32"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128, help="truncate longer inputs (corpus lines)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="12 is base size; fewer for a quick try")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="token budget of a bucketed batch")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "MODEL", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(*args.child) if args.child else main()

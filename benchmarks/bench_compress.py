"""roberta.compress against ZipNN, in one run, on the same tensors and the same number of threads.

Kinds of weights (all base-size: 12 layers x 768, vocabulary 50265, unless --layers says otherwise):
  fp16-exact fp32  trained-like fp32 weights rounded through fp16, as the released roberta-base is
  fp32             the same weights with full mantissas
  bf16             the same weights cast to bf16
  self-trained     a RobertaForMaskedLM (small preset) trained here for --steps steps on wikitext-2

"Trained-like" weights are normal with a per-tensor scale and a log-normal per-row scale (trained
matrices have rows of different norms), LayerNorm weights near 1 and small biases: their exponent
statistics are what a compressor sees. ZipNN gets a copy of each tensor because it rewrites its input.

    PYTHONPATH=. python benchmarks/bench_compress.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from roberta import compress

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "wikitext2-valid.txt"
BPE = ROOT.parent / "shared" / "data" / "roberta-bpe"


def base_shapes(layers: int, hidden=768, vocab=50265, ffn=3072, positions=514) -> dict[str, tuple]:
    shapes = {"embeddings.word_embeddings.weight": (vocab, hidden),
              "embeddings.position_embeddings.weight": (positions, hidden),
              "embeddings.token_type_embeddings.weight": (1, hidden),
              "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ffn, hidden), (ffn,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (hidden, ffn), (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (hidden,), (hidden,)
    return shapes


def trained_like(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in base_shapes(layers).items():
        if "LayerNorm.weight" in name:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            scale = float(torch.empty(1).uniform_(0.02, 0.08, generator=g))
            rows = torch.exp(0.3 * torch.randn(shape[0], 1, generator=g))
            t = torch.randn(shape, generator=g) * rows * scale
        weights[name] = t
    return weights


def self_trained(steps: int, cache: Path) -> dict[str, torch.Tensor]:
    """A small RobertaForMaskedLM trained with masked-LM loss on wikitext-2 (cached between runs)."""
    from roberta import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    file = cache / f"self-trained-{steps}" / "model.safetensors"
    if not file.exists():
        tok = RobertaTokenizer.from_pretrained(BPE)
        lines = [line for line in CORPUS.read_text().splitlines() if len(line) > 80]
        ids = torch.tensor([i for ids in tok.encode_batch(lines[:2000]) for i in ids])
        torch.manual_seed(0)
        model = RobertaForMaskedLM(RobertaConfig.small(hidden_dropout_prob=0.1)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        batch, length = 8, 128
        for step in range(steps):
            starts = torch.randint(0, ids.numel() - length, (batch,))
            x = torch.stack([ids[s:s + length] for s in starts])
            labels = torch.full_like(x, -100)
            mask = torch.rand(x.shape) < 0.15
            labels[mask] = x[mask]
            x = x.masked_fill(mask, tok.mask_token_id)
            loss = model(x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"  self-trained step {step} loss {loss.item():.3f}", flush=True)
        model.save_pretrained(file.parent)
    from safetensors.torch import load_file
    return load_file(str(file))


class Ours:
    name = "roberta"

    def __init__(self, threads):
        self.threads = threads

    def compress(self, t):
        return compress.compress_tensor(t, self.threads)

    def decompress(self, blob):
        return compress.decompress_tensor(blob, self.threads)


class ZipNN:
    name = "zipnn"

    def __init__(self, threads):
        from zipnn import ZipNN as Codec

        self.codec = Codec(input_format="torch", threads=threads)

    def compress(self, t):
        return self.codec.compress(t.clone())  # ZipNN rewrites the tensor it compresses

    def decompress(self, blob):
        return self.codec.decompress(blob)


def timed(fn, items: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    out = {k: fn(v) for k, v in items.items()}
    return time.perf_counter() - start, out


def measure(codecs, tensors, repeats):
    """Median time of `repeats` rounds, the codecs taking turns within each round, so that load from
    other processes on the machine falls on both alike. Medians, not minimums: on a shared machine the
    minimum rewards whichever codec happened to run while the other jobs slept."""
    blobs, times = {}, {c.name: ([], []) for c in codecs}
    for _ in range(repeats):
        for c in codecs:
            seconds, blobs[c.name] = timed(c.compress, tensors)
            times[c.name][0].append(seconds)
            seconds, out = timed(c.decompress, blobs[c.name])
            times[c.name][1].append(seconds)
            if not all(same_bits(out[k], t) for k, t in tensors.items()):
                raise SystemExit(f"{c.name} did not give back the exact tensors")
    return {c.name: (sum(map(len, blobs[c.name].values())), *map(statistics.median, times[c.name])) for c in codecs}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="training steps of the self-trained checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="rounds timed; the median of each codec counts")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/roberta-bench-compress"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = trained_like(args.layers)
    kinds = {"fp16-exact fp32": {k: t.half().float() for k, t in fp32.items()}, "fp32": fp32,
             "bf16": {k: t.bfloat16() for k, t in fp32.items()}}
    kinds["self-trained fp32"] = self_trained(args.steps, args.cache)

    codecs = [Ours(args.threads), ZipNN(args.threads)]
    rows = []
    print(f"threads={args.threads}, chunk={compress.CHUNK_ELEMENTS} elements, zstd level {compress.ZSTD_LEVEL}, "
          f"reassembly in {'numpy' if compress._planes is None else 'C'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| weights | MB | codec | size ratio | compress MB/s | decompress MB/s |")
    print("|---|---:|---|---:|---:|---:|")
    for kind, tensors in kinds.items():
        raw = sum(t.numel() * t.element_size() for t in tensors.values())
        result = {}
        for codec, (size, t_c, t_d) in measure(codecs, tensors, args.repeats).items():
            result[codec] = {"ratio": size / raw, "compress_MBps": raw / t_c / 1e6, "decompress_MBps": raw / t_d / 1e6}
            r = result[codec]
            print(f"| {kind} | {raw / 1e6:.0f} | {codec} | {100 * r['ratio']:.2f}% | {r['compress_MBps']:.0f} "
                  f"| {r['decompress_MBps']:.0f} |", flush=True)
        ours, theirs = result["roberta"], result["zipnn"]
        rows.append({"weights": kind, "MB": raw / 1e6, **{f"{c}_{k}": v for c in result for k, v in result[c].items()},
                     "size_vs_zipnn": ours["ratio"] / theirs["ratio"],
                     "decompress_speed_vs_zipnn": ours["decompress_MBps"] / theirs["decompress_MBps"],
                     "compress_speed_vs_zipnn": ours["compress_MBps"] / theirs["compress_MBps"]})
    print("\n| weights | size ours/zipnn | decompress speed ours/zipnn | compress speed ours/zipnn |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['weights']} | {row['size_vs_zipnn']:.4f} | {row['decompress_speed_vs_zipnn']:.2f}x "
              f"| {row['compress_speed_vs_zipnn']:.2f}x |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

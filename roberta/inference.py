"""Fast inference over many inputs: length bucketing, padding-free batches, reduced precision.

A batch padded to its longest member wastes work on every pad; the encoder already drops padding before
its dense layers (`model.Unpadded`), and sorting inputs by length makes the remaining waste (attention
on the re-padded batch) vanish too, since neighbours in sorted order have nearly equal lengths. Results
come back in the caller's order and equal the one-at-a-time results (float32: within float rounding).

Reduced precision is opt-in and changes numbers, by an amount `benchmarks/bench_features.py` measures:
- "bf16": weights and activations in bfloat16 (LayerNorm, softmax and GELU accumulate in float32 inside
  PyTorch's kernels). On CPUs with AMX or AVX-512 BF16, and on GPUs, matmuls run several times faster.
- "int8": dynamic quantisation of the Linear layers (int8 weights, activations quantised per batch).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from .errors import RobertaError

PRECISIONS = ("fp32", "bf16", "int8")


def reduce_precision(model: nn.Module, precision: str) -> nn.Module:
    """Convert `model` in place for inference in "fp32" (unchanged), "bf16" or "int8"; returns it."""
    if precision not in PRECISIONS:
        raise RobertaError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    model.eval()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        if next(model.parameters()).device.type != "cpu":
            raise RobertaError("int8 dynamic quantisation runs on CPU only; move the model with .cpu() first")
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, not yet gone
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length; each batch holds at most `batch_tokens` tokens once padded."""
    if batch_tokens < 1:
        raise RobertaError(f"batch_tokens must be positive, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # ascending order: the newcomer is the longest, so the padded size is (count + 1) * its length
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and the attention mask (1 for tokens)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def extract_features_batched(model: nn.Module, sequences: Sequence[Sequence[int]], batch_tokens: int = 4096,
                             progress: bool = False) -> list[torch.Tensor]:
    """Last-layer features, one float32 [length, hidden] tensor per sequence of token ids, in input order.

    `model` is any of this project's models (its encoder is used), in any precision `reduce_precision`
    makes. Sequences are sorted by length and batched under `batch_tokens` padded tokens.
    """
    if not sequences:
        return []
    if any(len(s) == 0 for s in sequences):
        raise RobertaError("an input sequence is empty; every input needs at least one token (<s> ... </s>)")
    encoder = model.encoder_model
    device = encoder.embeddings.word_embeddings.weight.device
    lengths = [len(s) for s in sequences]
    features: list[torch.Tensor | None] = [None] * len(sequences)
    batches = length_batches(lengths, batch_tokens)
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
        ids, mask = pad_batch([sequences[i] for i in batch], encoder.config.pad_token_id, device)
        x, _ = encoder.forward_unpadded(ids, mask)  # [real tokens, H], sequence after sequence
        for i, f in zip(batch, x.float().split([lengths[i] for i in batch])):
            features[i] = f
    return features  # type: ignore[return-value]

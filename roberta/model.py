"""The RoBERTa model, top to bottom in one file.

RoBERTa (Liu et al., 2019) is BERT's architecture trained better: a post-LayerNorm Transformer encoder
over byte-level BPE tokens, with learned absolute positions. Module and parameter names follow the Hugging
Face checkpoints one to one (`roberta.encoder.layer.0.attention.self.query.weight`, ...), so their files
load without renaming; fairseq's names are mapped in `checkpoint.py`.

Two details make RoBERTa differ from BERT in ways that change numbers:
- positions are offset by the padding index: padding keeps position `pad_token_id` (1) and real tokens
  count up from pad + 1 (2), so the table has max_tokens + 2 rows (514 for 512 tokens). Positions are
  counted over non-pad tokens, so left and right padding give the same result;
- there is no next-sentence task and no pooler in the published MLM and classification models.

Speed without changing results: padded positions are dropped before every dense layer (they are gathered
into one [tokens, hidden] matrix, `Unpadded`), attention runs on the packed tokens where a kernel for it
exists (a GPU in half precision: PyTorch's variable-length flash attention; float32 inference on an
x86 CPU with AVX2 or AVX-512: this project's, csrc/kernels.c) and otherwise through PyTorch's scaled_dot_product_attention
on groups of similar length, and the masked-LM head is computed only where a loss is needed. `Padded` is
the plain layout the fast one is tested against, and what the ONNX export traces.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import RobertaError
from .fileio import atomic_write, read_json


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class RobertaConfig:
    """Hyper-parameters; field names and JSON are those of a Hugging Face RoBERTa `config.json`."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514  # 512 tokens + the padding offset of 2
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    classifier_dropout: float | None = None
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None  # "regression", "single_label_classification", "multi_label_classification"
    # Our additions (Hugging Face ignores unknown keys): the name of the main classification head, and
    # further named heads on the same encoder, as fairseq's `register_classification_head` makes them.
    head_name: str | None = None
    classification_heads: dict[str, int] = field(default_factory=dict)
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        """Check every field when the config is built (from code, a config.json or a preset), so that
        a wrong type, an impossible value or an absurd size is a one-line error before any allocation."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            _check_int(name, getattr(self, name), 1, _LIMITS.get(name))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            _check_int(name, getattr(self, name), 0, self.vocab_size - 1)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None or name != "classifier_dropout":
                _check_float(name, value, "a probability in [0, 1)", lambda x: 0 <= x < 1)
        _check_float("initializer_range", self.initializer_range, "a finite number >= 0",
                     lambda x: 0 <= x < math.inf)
        _check_float("layer_norm_eps", self.layer_norm_eps, "a small positive number such as 1e-5",
                     lambda x: 0 < x < 1)
        if self.hidden_act != "gelu":
            raise RobertaError(f"hidden_act {self.hidden_act!r} is not supported; RoBERTa uses 'gelu'")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise RobertaError(f"problem_type {self.problem_type!r} is not one of regression, "
                               "single_label_classification, multi_label_classification")
        if self.head_name is not None and not isinstance(self.head_name, str):
            raise RobertaError(f"head_name must be a string, got {self.head_name!r}")
        if self.hidden_size % self.num_attention_heads:
            raise RobertaError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; choose sizes that divide"
            )
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise RobertaError(f"max_position_embeddings must exceed pad_token_id + 1 = {self.pad_token_id + 1}")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise RobertaError(f"id2label must map class ids to names, e.g. {{\"0\": \"negative\", \"1\": "
                                   f"\"positive\"}}; got a {type(self.id2label).__name__}")
            try:
                id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise RobertaError(f"id2label keys must be class ids 0, 1, ...; got {list(self.id2label)[:4]}") from None
            unnamed = [v for v in self.id2label.values() if not isinstance(v, str)]
            if unnamed:
                raise RobertaError(f"id2label must name each class with a string; got {repr(unnamed[0])[:40]}: write e.g. "
                                   f"{{\"0\": \"negative\", \"1\": \"positive\"}}")
            if sorted(id2label) != list(range(len(id2label))):
                raise RobertaError(f"id2label must number its classes 0 to {len(id2label) - 1}; got ids "
                                   f"{sorted(id2label)[:8]}")
            self.id2label = id2label
            self.num_labels = len(self.id2label)
            if self.id2label == {i: f"LABEL_{i}" for i in range(self.num_labels)}:
                self.id2label = None  # the default names carry nothing
        if not isinstance(self.classification_heads, dict):
            raise RobertaError("classification_heads must map head names to class counts, e.g. {\"mnli\": 3}")
        for name, classes in self.classification_heads.items():
            _check_int(f"classification_heads[{name!r}]", classes, 1, _LIMITS["num_labels"])
        if not isinstance(self.pruned_heads, dict):
            raise RobertaError("pruned_heads must map layer indices to lists of head indices")
        try:
            self.pruned_heads = {int(k): sorted(int(h) for h in v) for k, v in self.pruned_heads.items()}
        except (TypeError, ValueError):
            raise RobertaError("pruned_heads must map layer indices to lists of head indices") from None
        if any(not 0 <= k < self.num_hidden_layers or any(not 0 <= h < self.num_attention_heads for h in v)
               for k, v in self.pruned_heads.items()):
            raise RobertaError(f"pruned_heads names layers or heads the model does not have "
                               f"({self.num_hidden_layers} layers of {self.num_attention_heads} heads)")
        parameters = self.estimated_parameters()
        if parameters > _MAX_PARAMETERS:
            raise RobertaError(f"this config describes a model of about {parameters:.2g} parameters "
                               f"({4 * parameters / 1e12:.0f} TB in fp32), beyond any machine; check its sizes "
                               f"({self.num_hidden_layers} layers x {self.hidden_size}, FFN {self.intermediate_size}, "
                               f"vocabulary {self.vocab_size}, positions {self.max_position_embeddings})")

    def estimated_parameters(self) -> int:
        """Parameters of the masked-LM model with its classification heads, from the sizes alone."""
        h, f = self.hidden_size, self.intermediate_size
        layer = 4 * h * h + 2 * h * f + 9 * h + f
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size + 2) * h
        heads = sum(h * h + h * classes for classes in [self.num_labels, *self.classification_heads.values()])
        return self.num_hidden_layers * layer + embeddings + h * h + self.vocab_size + heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (512 for the published models)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    # Presets -----------------------------------------------------------------------------------------
    @classmethod
    def base(cls, **overrides) -> "RobertaConfig":
        """roberta.base: 12 layers x 768, 12 heads, FFN 3072 (125M parameters)."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides) -> "RobertaConfig":
        """roberta.large: 24 layers x 1024, 16 heads, FFN 4096 (355M parameters)."""
        return cls(**{"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, **overrides})

    @classmethod
    def small(cls, **overrides) -> "RobertaConfig":
        """A laptop-sized model: 4 layers x 256, 4 heads, FFN 1024."""
        return cls(**{"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "intermediate_size": 1024, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "RobertaConfig":
        """For tests: 2 layers x 64, 2 heads, FFN 128."""
        return cls(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "intermediate_size": 128, **overrides})

    # JSON round trip ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("num_labels")
        d["id2label"] = {str(i): name for i, name in self.labels().items()}
        d["label2id"] = {name: i for i, name in self.labels().items()}
        d["pruned_heads"] = {str(k): v for k, v in self.pruned_heads.items()}
        d["model_type"] = "roberta"
        d["position_embedding_type"] = "absolute"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RobertaConfig":
        if d.get("model_type", "roberta") not in ("roberta", "xlm-roberta", "camembert"):
            raise RobertaError(f"config is for model_type {d['model_type']!r}, not RoBERTa")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise RobertaError(f"position_embedding_type {d['position_embedding_type']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}  # Hugging Face writes many keys we do not use
        if "id2label" not in d and "num_labels" in d:
            kwargs["num_labels"] = int(d["num_labels"])
        return cls(**kwargs)

    def labels(self) -> dict[int, str]:
        return self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobertaConfig":
        if not os.path.exists(path):
            raise RobertaError(f"{path} does not exist: a checkpoint directory needs a config.json")
        d = read_json(path, limit=1 << 24)
        try:
            return cls.from_dict(d)
        except TypeError as exc:
            raise RobertaError(f"{path} has a field of the wrong type ({exc})") from None


# Bounds on sizes: far above any published model (large: 24 layers x 1024, a 50K vocabulary), low
# enough that a typo or a hostile config.json is refused at once instead of allocating for minutes.
_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024,
           "intermediate_size": 1 << 18, "max_position_embeddings": 1 << 20, "type_vocab_size": 1 << 10,
           "num_labels": 1 << 20}
_MAX_PARAMETERS = 10 ** 12


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if type(value) is not int:  # bool is an int to Python, and "64" or 64.0 is a mistake in a config
        raise RobertaError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); "
                           "write it without quotes or decimals")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high:,}" if high is not None else f">= {low}"
        raise RobertaError(f"{name} is {value:,}, which is out of range: it must be {bound}")


def _check_float(name: str, value, what: str, ok) -> None:
    if type(value) not in (int, float) or not ok(value):
        raise RobertaError(f"{name} must be {what}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class ModelOutput:
    """What a forward pass returns; fields a head does not produce stay None."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    pooler_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# Padding: the encoder works on the real tokens only


@functools.cache
def _varlen_attn():
    """torch.nn.attention.varlen's attention on packed sequences with cumulative lengths, no re-padding
    (CUDA only); None on an older PyTorch. Imported at first use: it imports torch._dynamo, which
    would add 1.7 s to the start of every command."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


try:  # this project's attention on packed sequences for CPU inference (csrc/kernels.c; x86, AVX2 or AVX-512)
    from . import _kernels
    # the C kernels use the instruction sets PyTorch may use here (ATEN_CPU_CAPABILITY caps both)
    _kernels.set_isa(torch.backends.cpu.get_cpu_capability())
    _attend_cpu = _kernels.attend if _kernels.attend_available() else None
    _add_norm_cpu = _kernels.add_norm
except (ImportError, AttributeError):  # not built, or built from older sources: PyTorch's attention on length
    _attend_cpu = _add_norm_cpu = None  # groups, and its LayerNorm, instead (`pip install -e .` rebuilds it)


def packed_attention_available(qkv: torch.Tensor, attention: "RobertaSelfAttention") -> bool:
    """Whether attention can run on the packed tokens without re-padding: PyTorch's variable-length flash
    attention on a GPU in half precision, or this project's C kernel for float32 inference on CPU (no
    autograd through it, and heads a multiple of 16 wide). Neither drops attention weights in training.
    bf16 inference on CPU takes the C kernel too, widened to float32, where that measured faster than
    PyTorch's bf16 attention on this machine (`kernels.widen_bf16_attention`; e.g. with AMX it may not)."""
    if attention.training and attention.dropout_p > 0:
        return False
    if qkv.is_cuda:
        return qkv.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None
    if (_attend_cpu is None or qkv.device.type != "cpu" or attention.head_dim % 16
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return False
    return qkv.dtype == torch.float32 or (qkv.dtype == torch.bfloat16 and kernels.widen_bf16_attention(
        attention.num_heads, attention.head_dim))


class Unpadded:
    """Where the real tokens of a padded [B, T] batch are, to move between [B, T, H] and [N, H].

    Dense layers and LayerNorm treat tokens independently, so they run on the N real tokens only.
    Attention needs whole sequences: it runs on the packed tokens (`cu_seqlens`, `max_length`) with
    PyTorch's variable-length flash attention on a GPU in half precision, and with this project's C
    kernel in float32 inference on CPU (`packed_attention_available`); elsewhere `attend` gathers them
    into sub-batches of similar length (`_length_groups`, made when first needed), so a batch mixing
    10- and 500-token inputs does not pay 500-token attention for all.

    Everything here is computed on the host from a CPU copy of the mask, then moved to `device`: built
    when the batch is built (`inference.extract_features_batched` does), the forward pass never waits
    for the GPU to answer a question about shapes. (Given a mask on the GPU, it costs one copy here.)
    """

    def __init__(self, attention_mask: torch.Tensor, device: torch.device | str | None = None):
        host = attention_mask.detach().to("cpu").bool()
        device = attention_mask.device if device is None else torch.device(device)
        self.batch, self.length = host.shape
        self.mask = attention_mask.to(device, non_blocking=True).bool()
        self.has_padding = not bool(host.all())
        lengths = host.sum(1)
        self.max_length = int(lengths.max()) if self.batch else 0
        self.cu_seqlens_host = F.pad(lengths.cumsum(0), (1, 0))  # int64, what the CPU kernel reads
        self.cu_seqlens = self.cu_seqlens_host.to(device, torch.int32, non_blocking=True)
        self.index = None
        if self.has_padding:
            self.index = host.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
        self._lengths, self._device = lengths, device

    @functools.cached_property
    def _grouped(self):
        """`_length_groups`, made at the first attention that needs it (the packed kernels do not)."""
        return self._length_groups(self._lengths, self._device)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.batch * self.length, *x.shape[2:])
        return x.index_select(0, self.index) if self.has_padding else x

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_padding:
            out = x.new_zeros(self.batch * self.length, *x.shape[1:])
            x = out.index_copy(0, self.index, x)
        return x.view(self.batch, self.length, *x.shape[1:])

    def _length_groups(self, lengths: torch.Tensor, device):
        """Sub-batches of sequences sorted by length: (gather [b * T] rows, b, T, mask or None, keep [n]).

        A group's longest sequence is at most 1.5 times its shortest plus 16 tokens: padding inside a
        group wastes attention work, and each group costs a few extra operations.
        """
        starts = lengths.cumsum(0) - lengths  # row of each sequence's first token in [N, H]
        sizes = lengths.tolist()
        order = [i for i in sorted(range(self.batch), key=sizes.__getitem__) if sizes[i] > 0]
        members: list[list[int]] = []
        for i in order:
            if members and sizes[i] <= 1.5 * sizes[members[-1][0]] + 16:
                members[-1].append(i)
            else:
                members.append([i])
        groups, placed = [], []
        move = lambda t: t.to(device, non_blocking=True)
        for seqs in members:
            T = sizes[seqs[-1]]
            seqs = torch.tensor(seqs)
            positions = torch.arange(T)
            real = positions < lengths[seqs, None]  # [b, T]
            # padded slots read row 0: a finite value the mask hides from every query
            gather = torch.where(real, starts[seqs, None] + positions, 0).flatten()
            mask = None if bool(real.all()) else move(real[:, None, None, :])
            keep = real.flatten().nonzero().squeeze(1)
            groups.append((move(gather), len(seqs), T, mask, move(keep)))
            placed.append(gather.index_select(0, keep))
        placed = torch.cat(placed)
        restore = torch.empty_like(placed)
        restore[placed] = torch.arange(len(placed))
        return groups, move(restore)

    def attend(self, qkv: torch.Tensor, attention: "RobertaSelfAttention") -> torch.Tensor:
        """Self-attention of every sequence; `qkv` [N, 3 * inner] and the result [N, inner] are real tokens."""
        if packed_attention_available(qkv, attention):
            return attention.packed(qkv, self)
        if not self.has_padding:
            y = attention.attention(qkv.view(self.batch, self.length, -1), None)
            return y.reshape(self.batch * self.length, -1)
        outputs = []
        groups, restore = self._grouped
        for gather, b, T, mask, keep in groups:
            y = attention.attention(qkv.index_select(0, gather).view(b, T, -1), mask)
            outputs.append(y.reshape(-1, y.shape[-1]).index_select(0, keep))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return y.index_select(0, restore)


class Padded:
    """The plain layout: every position of the [B, T] batch, attention masked at padded keys.

    It is what `export --onnx` traces (no shapes that depend on the data) and the reference the tests
    hold the padding-free path to. Outputs at padded positions are zeros, as `Unpadded` gives them.
    """

    def __init__(self, attention_mask: torch.Tensor, device: torch.device | str | None = None):
        self.batch, self.length = attention_mask.shape
        device = attention_mask.device if device is None else device
        self.mask = attention_mask.to(device, non_blocking=True).bool()

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.length, *x.shape[2:])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(self.batch, self.length, *x.shape[1:])
        return torch.where(self.mask.view(self.batch, self.length, *[1] * (x.dim() - 2)), x, 0.0)

    def attend(self, qkv: torch.Tensor, attention: "RobertaSelfAttention") -> torch.Tensor:
        y = attention.attention(qkv.view(self.batch, self.length, -1), self.mask[:, None, None, :])
        return y.reshape(self.batch * self.length, -1)


# ----------------------------------------------------------------------------------------------------
# The encoder


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoints) whose float32 CPU inference runs on the GEMM measured
    fastest on this machine for its shape (`kernels.linear`); with autograd it is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class _KeepScaled(torch.autograd.Function):
    """x * keep / (1 - p), keeping only the boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with the mask drawn faster on CPU: torch's CPU dropout draws a float per element
    (bernoulli_, ~5 ns each here, a tenth of a base training step); 31-bit random integers compared
    with p * 2^31 are three times cheaper and keep each element with probability 1 - p to within 2^-31.
    Same generator, so seeding and exact resumption work as before."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= round(p * 2**31)  # random_: [0, 2^31)
    return _KeepScaled.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout through `dropout` above (no weights, so checkpoints do not change)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def gelu(y: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as fairseq and transformers use. Without autograd (inference) it overwrites y,
    a fresh matmul output: a [tokens, 3072] buffer fewer to allocate and fill per layer, about 3% of a
    base forward pass on CPU (benchmarks/bench_features.py)."""
    return F.gelu(y) if torch.is_grad_enabled() else torch.ops.aten.gelu_(y)


def add(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """y + residual, into y (a fresh matmul output) when no backward pass needs it, as `gelu`."""
    return y + residual if torch.is_grad_enabled() else y.add_(residual)


def add_norm(y: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """norm(y + residual): the residual connection and the LayerNorm after it that close each sublayer.
    In float32 inference on CPU, one pass per row in this project's C kernel (csrc/kernels.c), into y
    (a fresh matmul output), where PyTorch makes three over the whole tensor (the sum, then LayerNorm's
    moments, then its normalisation): 48 ms of a base pass over 128 SST-2 sentences in fp32 against
    PyTorch's 64, 39 against 50 in int8 (benchmarks/bench_passes.py, 2-core Intel Ice Lake). Its sums
    run in a fixed order, so it gives the same bits on every CPU, within float rounding of PyTorch's."""
    n = y.shape[-1]
    if (_add_norm_cpu is None or torch.is_grad_enabled() or y.dtype != torch.float32 or y.device.type != "cpu"
            or not y.is_contiguous() or residual.shape != y.shape or norm.weight is None or norm.bias is None
            or norm.weight.dtype != torch.float32 or tuple(norm.normalized_shape) != (n,) or kernels.tracing()):
        return norm(add(y, residual))
    # the parameters as copies: a numpy view of a tensor's storage makes it fixed-size, and FSDP frees the
    # storage of each unsharded parameter after the forward pass by resizing it
    _add_norm_cpu(y.detach().numpy(), residual.detach().contiguous().numpy(), y.numel() // n, n,
                  norm.weight.detach().clone().numpy(), norm.bias.detach().clone().numpy(), norm.eps,
                  torch.get_num_threads())
    return y


def first_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The `<s>` vector of each sequence: its first real token, so left padding changes nothing."""
    first = attention_mask.int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def create_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Position of each token counted over non-pad tokens, starting at padding_idx + 1; pads keep padding_idx."""
    mask = input_ids.ne(padding_idx).long()
    return torch.cumsum(mask, dim=1) * mask + padding_idx


class RobertaEmbeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=config.pad_token_id)
        # One segment row, kept for checkpoint compatibility: RoBERTa has no segments, fairseq none at all.
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids=None, token_type_ids=None):
        if position_ids is None:
            position_ids = create_position_ids(input_ids, self.padding_idx)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class RobertaSelfAttention(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        inner = self.num_heads * self.head_dim
        self.query = Linear(config.hidden_size, inner)
        self.key = Linear(config.hidden_size, inner)
        self.value = Linear(config.hidden_size, inner)
        self.dropout_p = config.attention_probs_dropout_prob

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side, [N, 3 * inner]: one matmul on the concatenated weights."""
        if "qkv" in self._modules:  # int8 models (inference.py) hold one quantised projection instead
            return self.qkv(x)
        return kernels.linear(x, *self.fused_qkv())

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The [3 * inner, H] weight and [3 * inner] bias of q, k and v together.

        Made on every call (a copy of 3 H^2 weights per layer, small beside the matmul itself): a copy
        kept between calls would go stale when an optimizer updates the weights in place without a
        trace (fused AdamW does not even bump the version counters). int8 models fuse them once.
        """
        return (torch.cat([self.query.weight, self.key.weight, self.value.weight]),
                torch.cat([self.query.bias, self.key.bias, self.value.bias]))

    def forward(self, x: torch.Tensor, layout: "Unpadded | Padded") -> torch.Tensor:
        return layout.attend(self.project_qkv(x), self)  # x: [N, H] real tokens

    def attention(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv: [B, T, 3 * inner] -> [B, T, inner]; mask [B, 1, 1, T] is True for real keys."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, h, T, d]
        if self.training and self.dropout_p > 0 and qkv.device.type == "cpu":
            # What SDPA does on CPU when it drops attention (its math path), with the faster dropout.
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = dropout(scores.softmax(-1), self.dropout_p, True) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)

    def packed(self, qkv: torch.Tensor, layout: "Unpadded") -> torch.Tensor:
        """qkv: [N, 3 * inner] of sequences laid end to end (`layout.cu_seqlens` [B + 1]) -> [N, inner]."""
        inner = self.num_heads * self.head_dim
        if qkv.is_cuda:
            q, k, v = qkv.view(-1, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, h, d]
            y = _varlen_attn()(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_length, layout.max_length)
            return y.reshape(-1, inner)
        dtype = qkv.dtype  # bf16 is widened for the kernel, which is float32 (`packed_attention_available`)
        qkv = qkv.detach().float().contiguous()
        y = qkv.new_empty(qkv.shape[0], inner)
        _attend_cpu(qkv.numpy(), qkv.shape[0], layout.cu_seqlens_host.numpy(), layout.batch, self.num_heads,
                    self.head_dim, y.numpy(), torch.get_num_threads())
        return y.to(dtype)


class RobertaSelfOutput(nn.Module):
    def __init__(self, config: RobertaConfig, inner: int):
        super().__init__()
        self.dense = Linear(inner, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, y, residual):
        return add_norm(self.dropout(self.dense(y)), residual, self.LayerNorm)  # post-LayerNorm, as in BERT


class RobertaAttention(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.self = RobertaSelfAttention(config)
        self.output = RobertaSelfOutput(config, config.hidden_size)

    def forward(self, x, layout):
        return self.output(self.self(x, layout), x)

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Remove attention heads (by index among those still present) from q, k, v and the output."""
        heads = sorted(set(heads))
        attn = self.self
        if any(h < 0 or h >= attn.num_heads for h in heads):
            raise RobertaError(f"cannot prune heads {heads}: this layer has heads 0..{attn.num_heads - 1}")
        keep = torch.tensor([h for h in range(attn.num_heads) if h not in heads], dtype=torch.long)
        index = (keep[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
        for name in ("query", "key", "value"):
            setattr(attn, name, _select_linear(getattr(attn, name), index, dim=0))
        self.output.dense = _select_linear(self.output.dense, index, dim=1)
        attn.num_heads = len(keep)


def _select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias.detach()
    if dim == 0:
        bias = bias.index_select(0, index.to(bias.device)).clone()
    new = Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    new.bias.data.copy_(bias)
    return new


class RobertaIntermediate(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise RobertaError(f"hidden_act {config.hidden_act!r} is not supported; RoBERTa uses 'gelu'")
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return gelu(self.dense(x))


class RobertaOutput(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return add_norm(self.dropout(self.dense(h)), residual, self.LayerNorm)


class RobertaLayer(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attention = RobertaAttention(config)
        self.intermediate = RobertaIntermediate(config)
        self.output = RobertaOutput(config)

    def forward(self, x, layout):
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class RobertaEncoder(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.layer = nn.ModuleList(RobertaLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, layout, output_hidden_states=False):
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states


class RobertaPooler(nn.Module):
    """dense + tanh on `<s>`; only the multiple-choice model uses it, as in transformers."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, first):
        return torch.tanh(self.dense(first))


# ----------------------------------------------------------------------------------------------------
# Shared behaviour of every model class: init, checkpoints, resizing, pruning, freezing


class RobertaPreTrainedModel(nn.Module):
    config: RobertaConfig

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation (fairseq's init_bert_params): N(0, 0.02) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RobertaLMHead):
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        self.apply(self._init_weights)
        if isinstance(self, RobertaModel):  # the task models' inner RobertaModel has done it already
            for layer_index, heads in self.config.pruned_heads.items():
                self.encoder.layer[layer_index].attention.prune_heads(heads)

    @property
    def encoder_model(self) -> "RobertaModel":
        return self if isinstance(self, RobertaModel) else self.roberta

    # Checkpoints -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **config_overrides):
        """Load from a Hugging Face directory, a directory this project saved, or a fairseq checkpoint."""
        from .checkpoint import load_model

        return load_model(cls, path, **config_overrides)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json and model.safetensors (and the tokenizer files, if given) atomically."""
        from .checkpoint import save_model

        save_model(self, path, tokenizer=tokenizer)

    # Generic operations ------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; tied weights (the MLM decoder) count once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def freeze(self, *prefixes: str) -> "RobertaPreTrainedModel":
        """Stop gradients for parameters whose names start with any prefix (all of them if none given).

        e.g. `model.freeze("roberta.embeddings", "roberta.encoder.layer.0.")`.
        """
        matched = False
        for name, p in self.named_parameters():
            if not prefixes or any(name.startswith(pre) for pre in prefixes):
                p.requires_grad_(False)
                matched = True
        if not matched:
            raise RobertaError(f"no parameter name starts with {prefixes}; see model.named_parameters()")
        return self

    def unfreeze(self) -> "RobertaPreTrainedModel":
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder_model.embeddings.word_embeddings

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows are initialised, the tied MLM decoder and bias follow."""
        old = self.get_input_embeddings()
        if new_num_tokens <= self.config.pad_token_id:
            raise RobertaError(f"vocabulary of {new_num_tokens} tokens cannot hold the pad id {self.config.pad_token_id}")
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        self._init_weights(new)
        n = min(old.num_embeddings, new_num_tokens)
        with torch.no_grad():
            new.weight[:n] = old.weight[:n]
        new.weight.requires_grad_(old.weight.requires_grad)
        self.encoder_model.embeddings.word_embeddings = new
        lm_head = getattr(self, "lm_head", None)
        if lm_head is not None:
            bias = torch.zeros(new_num_tokens, device=lm_head.bias.device, dtype=lm_head.bias.dtype)
            bias[:n] = lm_head.bias.detach()[:n]
            lm_head.bias = nn.Parameter(bias)
        self.config.vocab_size = new_num_tokens
        return new

    def prune_heads(self, heads_to_prune: dict[int, list[int]]) -> None:
        """Remove attention heads: {layer: [head indices as in the original model]}."""
        layers = self.encoder_model.encoder.layer
        for layer_index, heads in heads_to_prune.items():
            layer_index = int(layer_index)
            if not 0 <= layer_index < len(layers):
                raise RobertaError(f"cannot prune layer {layer_index}: the model has layers 0..{len(layers) - 1}")
            already = set(self.config.pruned_heads.get(layer_index, []))
            new = sorted(set(heads) - already)
            # indices among the heads still present
            remaining = [h for h in range(self.config.num_attention_heads) if h not in already]
            missing = [h for h in new if h not in remaining]
            if missing:
                raise RobertaError(f"cannot prune heads {missing} of layer {layer_index}: it has heads 0..{self.config.num_attention_heads - 1}")
            layers[layer_index].attention.prune_heads([remaining.index(h) for h in new])
            self.config.pruned_heads[layer_index] = sorted(already | set(new))

    def gradient_checkpointing_enable(self) -> None:
        self.encoder_model.encoder.gradient_checkpointing = True

    def _mask(self, input_ids, attention_mask):
        return input_ids.ne(self.config.pad_token_id) if attention_mask is None else attention_mask

    def _layout(self, input_ids, attention_mask, layout):
        """The layout the caller built on the host, else one made from the mask: a head reads its
        mask (`layout.mask`, on the device) from the same layout the encoder ran on."""
        return layout or self.encoder_model.layout(self._mask(input_ids, attention_mask))

    def _encode(self, input_ids, layout, position_ids=None, token_type_ids=None, output_hidden_states=False):
        return self.encoder_model(input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                                  output_hidden_states=output_hidden_states, layout=layout)


class RobertaModel(RobertaPreTrainedModel):
    """The bare encoder: token ids in, one vector per token out."""

    def __init__(self, config: RobertaConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = RobertaEmbeddings(config)
        self.encoder = RobertaEncoder(config)
        self.pooler = RobertaPooler(config) if add_pooling_layer else None
        self.padding_free = True  # see layout()
        self.post_init()

    def check_inputs(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise RobertaError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise RobertaError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        n = input_ids.shape[1]
        if n > self.config.max_tokens:
            raise RobertaError(
                f"input has {n} tokens but this model takes at most {self.config.max_tokens}; "
                "truncate the input or split it into several")
        # Token ids are checked where reading them costs nothing: on the CPU, outside tracing. On a GPU
        # this would stall the forward pass until the ids arrive; an id out of range fails there in the
        # embedding lookup instead (the hub and the inference helpers check ids on the host).
        if input_ids.numel() and input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise RobertaError(
                    f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}; "
                    "use the tokenizer that belongs to this model")

    def layout(self, attention_mask: torch.Tensor, device: torch.device | str | None = None) -> Unpadded | Padded:
        """How the encoder lays out this batch: padding-free (`Unpadded`), or every position (`Padded`)
        when `padding_free` is off, as the ONNX export and the reference tests have it.

        Made from a mask on the host and placed on `device` (by default where the mask is) when the
        batch is built, as the hub does, the forward pass has no question to ask the device."""
        return (Unpadded if self.padding_free else Padded)(attention_mask, device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None,
                output_hidden_states=False, layout: Unpadded | Padded | None = None) -> ModelOutput:
        """attention_mask: 1 for tokens, 0 for padding; by default every non-pad token (fairseq's rule).
        layout: `self.layout(mask, device)` made when the batch was built (on the host), so that the
        forward pass has nothing to ask the device; it replaces `attention_mask`. By default it is
        made here from the mask (on a GPU, at the cost of one copy of the mask to the host).

        Outputs at padded positions are zeros (they are never computed).
        """
        self.check_inputs(input_ids)
        layout = self._layout(input_ids, attention_mask, layout)
        x = layout.unpad(self.embeddings(input_ids, position_ids, token_type_ids))
        x, hidden = self.encoder(x, layout, output_hidden_states)
        last = layout.pad(x)
        hidden_states = tuple(layout.pad(h) for h in hidden) if hidden is not None else None
        pooled = self.pooler(first_token(last, layout.mask)) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=last, hidden_states=hidden_states, pooler_output=pooled)

    def forward_unpadded(self, input_ids, attention_mask=None, layout: "Unpadded | None" = None):
        """Encoder output for the real tokens only, [N, H], and the `Unpadded` that places them (given a
        `Padded` layout, every position: [B * T, H])."""
        self.check_inputs(input_ids)
        layout = layout or Unpadded(self._mask(input_ids, attention_mask))
        x, _ = self.encoder(layout.unpad(self.embeddings(input_ids)), layout)
        return x, layout


# ----------------------------------------------------------------------------------------------------
# Heads


class RobertaLMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, features, decoder_weight):
        x = self.layer_norm(F.gelu(self.dense(features)))
        return kernels.linear(x, decoder_weight, self.bias)


class RobertaClassificationHead(nn.Module):
    """Sentence-level head on `<s>`: dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: RobertaConfig, num_labels: int):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.out_proj = Linear(config.hidden_size, num_labels)

    def forward(self, first):
        x = self.dropout(first)
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class _NamedHeads:
    """Several classification heads on one encoder, by name, as fairseq's RoBERTa has them."""

    classification_heads: nn.ModuleDict

    def register_classification_head(self, name: str, num_classes: int) -> RobertaClassificationHead:
        if not name or not isinstance(name, str) or "." in name:
            raise RobertaError(f"head name {name!r} must be a non-empty string without dots")
        existing = self.classification_heads[name] if name in self.classification_heads else None
        if existing is not None and existing.out_proj.out_features == num_classes:
            return existing
        head = RobertaClassificationHead(self.config, num_classes)
        head.apply(self._init_weights)
        ref = self.get_input_embeddings().weight
        head.to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.classification_heads[name] = head
        self.config.classification_heads[name] = num_classes
        return head

    def classify(self, input_ids, attention_mask=None, head: str | None = None,
                 layout: Unpadded | Padded | None = None) -> torch.Tensor:
        """Logits of a named classification head on `<s>`."""
        module = self._head(head)
        layout = self._layout(input_ids, attention_mask, layout)
        return module(first_token(self._encode(input_ids, layout).last_hidden_state, layout.mask))

    def _head(self, name):
        found = find_head(name, self.classification_heads)
        if found is None:
            known = ", ".join(self.classification_heads) or "none"
            raise RobertaError(f"no classification head named {name!r} (this model has: {known}); "
                               "register one with register_classification_head(name, num_classes)")
        return self.classification_heads[found]


def find_head(name: str | None, heads) -> str | None:
    """The head in `heads` that `name` means: its own name, or the same letters in another case and
    without hyphens or underscores (`sst2`, `SST-2` and `sst-2` are one task); None where none is."""
    if name is None or name in heads:
        return name
    key = lambda text: re.sub(r"[-_]", "", str(text).lower())
    found = [head for head in heads if key(head) == key(name)]
    return found[0] if len(found) == 1 else None


def _classification_loss(config: RobertaConfig, logits, labels):
    problem = config.problem_type
    if problem is None:
        problem = "regression" if logits.shape[-1] == 1 else (
            "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class RobertaForMaskedLM(RobertaPreTrainedModel, _NamedHeads):
    """The pretraining model: encoder + masked-LM head, and optional named classification heads.

    With `labels` (-100 where no prediction is wanted) the LM head runs only on the labelled
    positions: `.loss` is their mean cross-entropy and `.logits` is [num_labelled, vocab].
    Without labels `.logits` is [batch, length, vocab].
    """

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(config)
        self.classification_heads = nn.ModuleDict(
            {name: RobertaClassificationHead(config, n) for name, n in config.classification_heads.items()})
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, token_type_ids=None,
                output_hidden_states=False, layout: Unpadded | Padded | None = None) -> ModelOutput:
        decoder = self.roberta.embeddings.word_embeddings.weight
        layout = self._layout(input_ids, attention_mask, layout)
        if labels is None:
            out = self._encode(input_ids, layout, position_ids, token_type_ids, output_hidden_states)
            out.logits = self.lm_head(out.last_hidden_state, decoder)
            return out
        # Choosing the labelled tokens makes a shape from the data: on a GPU the one wait of a training
        # step (the alternative, the 50K-way head on every token, costs several times the LM head).
        if output_hidden_states or position_ids is not None or token_type_ids is not None:
            out = self._encode(input_ids, layout, position_ids, token_type_ids, output_hidden_states)
            selected = labels.ne(-100)
            features = out.last_hidden_state[selected]
            targets = labels[selected]
        else:
            # The fast path: real tokens only, and the 50K-way projection only where there is a label.
            x, _ = self.roberta.forward_unpadded(input_ids, layout=layout)
            targets = layout.unpad(labels.unsqueeze(-1)).squeeze(-1)
            selected = targets.ne(-100)
            features, targets = x[selected], targets[selected]
            out = ModelOutput()
        out.logits = self.lm_head(features, decoder)
        out.loss = F.cross_entropy(out.logits.float(), targets) if targets.numel() else out.logits.sum() * 0.0
        return out


class RobertaForSequenceClassification(RobertaPreTrainedModel, _NamedHeads):
    """Classification or regression (num_labels == 1) on `<s>`; more named heads can be added."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config, config.num_labels)
        self.classification_heads = nn.ModuleDict(
            {name: RobertaClassificationHead(config, n) for name, n in config.classification_heads.items()})
        self.post_init()

    def _head(self, name):
        if name is None or find_head(name, [self.config.head_name]) is not None:
            return self.classifier
        return super()._head(name)

    def forward(self, input_ids, attention_mask=None, labels=None, head: str | None = None,
                position_ids=None, token_type_ids=None, output_hidden_states=False,
                layout: Unpadded | Padded | None = None) -> ModelOutput:
        layout = self._layout(input_ids, attention_mask, layout)
        out = self._encode(input_ids, layout, position_ids, token_type_ids, output_hidden_states)
        out.logits = self._head(head)(first_token(out.last_hidden_state, layout.mask))
        if labels is not None:
            out.loss = _classification_loss(self.config, out.logits, labels)
        return out


class RobertaForTokenClassification(RobertaPreTrainedModel):
    """A label per token (tagging, NER): dropout -> linear on every token."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, token_type_ids=None,
                output_hidden_states=False, layout: Unpadded | Padded | None = None) -> ModelOutput:
        layout = self._layout(input_ids, attention_mask, layout)
        out = self._encode(input_ids, layout, position_ids, token_type_ids, output_hidden_states)
        out.logits = self.classifier(self.dropout(out.last_hidden_state))
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        return out


class RobertaForQuestionAnswering(RobertaPreTrainedModel):
    """Extractive QA (SQuAD): a start and an end score for every token."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = dataclasses.replace(config, num_labels=2, id2label=None) if config.num_labels != 2 else config
        self.roberta = RobertaModel(self.config, add_pooling_layer=False)
        self.qa_outputs = Linear(self.config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, start_positions=None, end_positions=None,
                position_ids=None, token_type_ids=None, output_hidden_states=False,
                layout: Unpadded | Padded | None = None) -> ModelOutput:
        layout = self._layout(input_ids, attention_mask, layout)
        out = self._encode(input_ids, layout, position_ids, token_type_ids, output_hidden_states)
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)
        # padding can never be an answer: its scores are the lowest number, not whatever pads compute to
        is_pad = ~layout.mask
        lowest = torch.finfo(start.dtype).min
        start, end = start.masked_fill(is_pad, lowest), end.masked_fill(is_pad, lowest)
        out.start_logits, out.end_logits = start.contiguous(), end.contiguous()
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]
            # positions outside the input are ignored, as in transformers
            s = start_positions.clamp(0, T)
            e = end_positions.clamp(0, T)
            out.loss = (F.cross_entropy(start, s, ignore_index=T) + F.cross_entropy(end, e, ignore_index=T)) / 2
        return out


class RobertaForMultipleChoice(RobertaPreTrainedModel):
    """RACE/SWAG-style: input [batch, choices, length]; one score per choice from the pooled `<s>`."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config)  # with the pooler, as transformers' model
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=False,
                layout: Unpadded | Padded | None = None) -> ModelOutput:
        """layout: made from the [batch * choices, length] mask, the choices as rows."""
        B, C, T = input_ids.shape
        flat_ids = input_ids.reshape(B * C, T)
        flat_mask = attention_mask.reshape(B * C, T) if attention_mask is not None else None
        layout = self._layout(flat_ids, flat_mask, layout)
        out = self._encode(flat_ids, layout, output_hidden_states=output_hidden_states)
        out.logits = self.classifier(self.dropout(out.pooler_output)).view(B, C)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits, labels)
        return out

"""Reading and writing checkpoints: Hugging Face directories, fairseq `model.pt`, and our own.

What this project writes is a Hugging Face directory (config.json + model.safetensors + tokenizer files),
so transformers' RoBERTa classes load it, and it loads theirs. fairseq checkpoints are imported from both
key layouts: the current one (`encoder.sentence_encoder.*`, separate q/k/v projections) and the 2019
release (`decoder.sentence_encoder.*`, one fused `in_proj_weight`), classification heads included.

A pickle never runs code here: `.bin` files go through `torch.load(weights_only=True)`, and fairseq's
`model.pt` (which pickles argparse or omegaconf objects that weights-only loading refuses) through a
restricted unpickler that builds tensors and inert placeholders and refuses every other callable.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import copy
import fnmatch
import json
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.overrides import TorchFunctionMode

from .errors import RobertaError, RobertaWarning
from .fileio import check_output, default_mode, read_json, replace_dir
from .model import (RobertaConfig, RobertaForMaskedLM, RobertaForQuestionAnswering, RobertaForTokenClassification,
                    RobertaModel, RobertaPreTrainedModel)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
FAIRSEQ_NAME = "model.pt"
FAIRSEQ_DICT = "dict.txt"

# The files that make up a checkpoint (any layout this project or its peers write). Writing a checkpoint
# into a directory replaces all of them, so none of an earlier checkpoint's files can be read with the
# new ones (a stale model.rbz or config.json winning over what was just written); other files there,
# such as a training run's metrics, are kept.
CHECKPOINT_FILES = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.rbz",
    "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "dict.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "modules.json",
    "config_sentence_transformers.json", "sentence_bert_config.json", "[0-9]_*",
)


def is_checkpoint_file(name: str) -> bool:
    """Whether a file or folder of this name belongs to a checkpoint (see CHECKPOINT_FILES)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)


def keep_beside_checkpoint(name: str) -> bool:
    """What `replace_dir` carries over when a checkpoint replaces another: everything else."""
    return not is_checkpoint_file(name)


WEIGHT_FILES_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.rbz",
                         "*.znn")


def check_checkpoint_output(dst: str | os.PathLike, src: str | os.PathLike) -> Path:
    """`check_output`, and a directory that is there and not empty must be a checkpoint (it holds weights):
    a written checkpoint replaces another's files, and never lands among a user's own (a config.json of
    theirs replaced, the new files mixed in with theirs)."""
    dst = check_output(dst, src)
    names = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    if names and not any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in WEIGHT_FILES_PATTERNS):
        raise RobertaError(f"the output {dst} is a directory that holds no checkpoint (it has {names[0]}"
                           f"{', ...' if len(names) > 1 else ''}): write into a new or empty directory, or into a "
                           "checkpoint directory to replace")
    return dst


# What the tensors of a RoBERTa state dict are called (any other tensor in a file is not read).
_MODEL_PREFIXES = ("roberta.", "embeddings.", "encoder.", "pooler.", "lm_head.", "classifier.",
                   "classification_heads.", "qa_outputs.")

# Parameters a checkpoint may lack because they belong to a head that is created fresh for a task.
_NEW_HEAD_PREFIXES = ("classifier.", "qa_outputs.", "roberta.pooler.", "pooler.", "lm_head.")


# ----------------------------------------------------------------------------------------------------
# Reading


# A directory this project writes that is not a model, known by the file its command leaves there.
_RUNS = {"pretrain.json": "a pretraining run", "recipe.json": "a fine-tuning run"}
_NOT_MODELS = {**_RUNS, "job.json": "the output of a sharded features/predict job",
               "meta.json": "a preprocessed corpus (give it to `roberta pretrain --data`)"}


def model_path(path: str | os.PathLike, note: bool = True) -> Path:
    """`path`, or the `model/` folder of the training run `path` is (with a note on stderr), so that a
    run directory works wherever a model is expected."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and not (path / FAIRSEQ_NAME).exists():
        kind = next((kind for marker, kind in _RUNS.items() if (path / marker).is_file()), None)
        if kind and (path / "model" / CONFIG_NAME).is_file():
            if note:
                print(f"note: {path} is {kind}; using its model, {path / 'model'}", file=sys.stderr)
            return path / "model"
    return path


def not_a_model(path: Path) -> RobertaError:
    """The error for a directory that holds no model: what it is, and which path to give instead."""
    kind = next((kind for marker, kind in _NOT_MODELS.items() if (path / marker).is_file()), None)
    if kind in _RUNS.values():
        steps = sorted((p for p in (path / "checkpoints").glob("step-*") if (p / CONFIG_NAME).is_file()),
                       key=lambda p: int(p.name.removeprefix("step-")) if p.name[5:].isdigit() else -1)
        latest = f"pass its latest checkpoint, {steps[-1]}, or " if steps else ""
        return RobertaError(f"{path} is {kind} that has not written its model/ yet: {latest}finish the run "
                            f"with --resume, then pass {path / 'model'}")
    what = f"{path} is {kind}, not a model" if kind else \
        f"{path} is not a model: it has neither config.json (Hugging Face) nor model.pt (fairseq)"
    inner = [p for p in sorted(path.iterdir()) if p.is_dir() and ((p / CONFIG_NAME).is_file() or (p / FAIRSEQ_NAME).is_file())]
    return RobertaError(f"{what}; pass {'the model inside it, ' + str(inner[0]) if inner else 'a checkpoint directory'}")


def read_checkpoint(path: str | os.PathLike) -> tuple[RobertaConfig, dict[str, torch.Tensor]]:
    """Config and state dict (Hugging Face names, `roberta.` prefix) from any layout we read."""
    path = model_path(path)
    if not path.exists():
        raise RobertaError(f"{path} does not exist; give a checkpoint directory (Hugging Face or fairseq)")
    if path.is_file():
        if path.suffix == ".pt":
            return read_fairseq(path)
        raise RobertaError(f"{path} is a file; give the checkpoint directory that holds config.json or model.pt")
    if (path / CONFIG_NAME).exists():
        config = RobertaConfig.load(path / CONFIG_NAME)
        state = _with_prefix(_read_hf_weights(path, config))
        check_weights(config, state, str(path))
        return config, state
    if (path / FAIRSEQ_NAME).exists():
        return read_fairseq(path / FAIRSEQ_NAME)
    raise not_a_model(path)


# The weight files of a Hugging Face directory, in order of preference: plain, sharded (an index names
# the shards), ZipNN-compressed in either of its layouts (roberta/znn.py), then pickled.
# (ZipNN's sharded repositories keep model.safetensors.index.json, its weight_map naming the .znn shards.)
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json", SAFETENSORS_NAME + ".znn",
                "model.znn.safetensors", PYTORCH_NAME, PYTORCH_NAME + ".index.json")


def _read_hf_weights(path: Path, config: RobertaConfig) -> dict[str, torch.Tensor]:
    from . import compress  # imported here: compress reads checkpoints through this module

    compressed = path / compress.COMPRESSED_WEIGHTS_NAME
    if compressed.exists():
        # Sizes are checked against the config from the headers, before anything is decoded, and
        # only the tensors a model has are decoded.
        shapes = {name: spec for name, spec in compress.tensor_shapes(compressed).items()
                  if name.startswith(_MODEL_PREFIXES)}
        check_weights(config, _with_prefix({name: torch.empty(shape, dtype=dtype, device="meta")
                                            for name, (dtype, shape) in shapes.items()}), str(path))
        return compress.load_file(compressed, names=list(shapes))
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if file is None:
        raise RobertaError(f"{path} has config.json but no weights ({SAFETENSORS_NAME} or its sharded index, "
                           f"{compress.COMPRESSED_WEIGHTS_NAME}, ZipNN's {SAFETENSORS_NAME}.znn or "
                           f"model.znn.safetensors, or {PYTORCH_NAME})")
    if not file.name.endswith(".index.json"):
        return read_weight_file(file, config)
    state: dict[str, torch.Tensor] = {}
    weight_map = read_index(file)
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise RobertaError(f"{file} names the shard {shard}, which is missing; download or copy it too")
        state.update(read_weight_file(path / shard, config, shard=True))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise RobertaError(f"{file} places {absent[0]} in {weight_map[absent[0]]}, which does not hold it; "
                           f"the shards do not belong to this index")
    return state


def read_index(file: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> shard file (beside the index)."""
    weight_map = read_json(file, kind=dict).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and not v.startswith(".") for v in weight_map.values()):
        raise RobertaError(f"{file} has no weight_map of tensor names to shard files beside it")
    return weight_map


def read_weight_file(file: Path, config: RobertaConfig | None = None, shard: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors (ZipNN's per-tensor layout included), a whole-file
    ZipNN `.znn`, or a weights-only pickle. With `config`, what a ZipNN file declares (its tensors'
    shapes, its decompressed size) is checked against it before anything is decoded (a `shard`, one
    of several files, only for its shapes' sizes, since it holds some of the layers)."""
    from . import znn
    from safetensors import safe_open
    from safetensors.torch import load as load_safetensors_bytes

    try:
        if file.name.endswith(".znn"):
            data = znn.decompress_whole_file(file, weights_bound(config) if config is not None else None)
            return load_safetensors_bytes(data) if file.name.endswith(".safetensors.znn") else _load_pickle(file, data)
        if file.name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata()
                if config is not None and znn.METADATA_KEY in (metadata or {}):
                    compressed = znn.compressed_tensors(metadata, weights_bound(config), str(file))
                    shapes = {name: compressed.get(name) or (torch.float32, f.get_slice(name).get_shape())
                              for name in f.keys() if name.startswith(_MODEL_PREFIXES)}
                    with warnings.catch_warnings():  # the check after loading says them once
                        warnings.simplefilter("ignore", RobertaWarning)
                        if not shard:
                            check_weights(copy.deepcopy(config), _with_prefix({
                                name: torch.empty(shape, dtype=dtype, device="meta")
                                for name, (dtype, shape) in shapes.items()}), str(file))
            return znn.decompress_tensors(load_safetensors(str(file)), metadata, str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobertaError(f"{file} is truncated or corrupted ({exc}); download or copy it again") from None
    except MemoryError:
        raise RobertaError(f"{file} does not fit in this machine's memory (or the memory limit set for this "
                           f"process); free memory or raise the limit") from None
    return _load_pickle(file)


def weights_bound(config: RobertaConfig) -> int:
    """The most bytes the weights a config describes can take in one file: every parameter as float64,
    with room for the file's header and heads the config does not list."""
    return 8 * parameter_count(config) + (64 << 20)


def parameter_count(config: RobertaConfig) -> int:
    """The masked LM's parameters, counted without allocating them."""
    return on_meta(RobertaForMaskedLM, config).num_parameters()


class _NoInitOnMeta(TorchFunctionMode):
    """`nn.init.normal_` of a meta tensor returns it untouched: a meta tensor holds no values, and
    PyTorch's meta `normal_` imports torch._dynamo on first use (about 2 s, in every process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def on_meta(cls, config: RobertaConfig):
    """`cls(config)` on the meta device: shapes only, no memory and no random init (for weights a
    file replaces, or to count them)."""
    with torch.device("meta"), _NoInitOnMeta():
        return cls(config)


def _load_pickle(file: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data) if data is not None else file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RobertaError(f"{file} was refused: it holds more than tensors ({str(exc).splitlines()[0]}); "
                           "only weights are loaded from pickles") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RobertaError(f"{file} is truncated or corrupted ({exc}); download or copy it again") from None
    if not isinstance(state, dict):
        raise RobertaError(f"{file} does not hold a state dict")
    return state


def check_weights(config: RobertaConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """The config must describe the weights it came with, checked before anything is built: sizes read
    from the tensors (layers, hidden size, vocabulary, positions, FFN, classification heads) win over
    what config.json claims, so a config saying 10^7 layers or 10^10 classes is refused at once, not
    allocated. Weights must be floating point; NaN or infinite values give a warning."""
    def expect(key: str, shape: tuple[int, ...], fields: str) -> None:
        tensor = state.get(key)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise RobertaError(f"{source}: config.json says {fields} = {', '.join(map(str, shape))} but the weights "
                               f"hold {key} of shape {list(tensor.shape)}; the config does not belong to these "
                               "weights: restore the checkpoint's own config.json")

    c = config
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise RobertaError(f"{source}: {key} is not a tensor; the file is not a RoBERTa checkpoint")
        if not tensor.is_floating_point() and not key.endswith(("position_ids", "token_type_ids")):
            raise RobertaError(f"{source}: tensor {key} is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                               "but model weights are floating point; the file is corrupted or not a RoBERTa "
                               "checkpoint")
    expect("roberta.embeddings.word_embeddings.weight", (c.vocab_size, c.hidden_size), "vocab_size, hidden_size")
    expect("roberta.embeddings.position_embeddings.weight", (c.max_position_embeddings, c.hidden_size),
           "max_position_embeddings, hidden_size")
    expect("roberta.embeddings.token_type_embeddings.weight", (c.type_vocab_size, c.hidden_size),
           "type_vocab_size, hidden_size")
    expect("roberta.encoder.layer.0.intermediate.dense.weight", (c.intermediate_size, c.hidden_size),
           "intermediate_size, hidden_size")
    layers = {int(k.split(".")[3]) for k in state if k.startswith("roberta.encoder.layer.") and k.split(".")[3].isdigit()}
    if layers and layers != set(range(c.num_hidden_layers)):
        have = f"{max(layers) + 1} layers (0 to {max(layers)})" if layers == set(range(max(layers) + 1)) else f"{len(layers)} layers"
        raise RobertaError(f"{source}: config.json says num_hidden_layers = {c.num_hidden_layers:,} but the weights "
                           f"hold {have}; restore the checkpoint's own config.json")
    heads = {k.split(".")[1]: t.shape[0] for k, t in state.items()
             if k.startswith("classification_heads.") and k.endswith(".out_proj.weight") and t.dim() == 2}
    for name, classes in list(c.classification_heads.items()):
        if name not in heads:
            _warn(f"{source}: config.json lists a classification head {name!r} that the weights lack; it is left out")
        elif heads[name] != classes:
            _warn(f"{source}: config.json gives head {name!r} {classes:,} classes but its weights have "
                  f"{heads[name]}; the weights' count is used")
    c.classification_heads = heads
    bad = [k for k, t in state.items() if t.is_floating_point() and not t.is_meta and not _finite(t)]
    if bad:
        _warn(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); the model's outputs "
              "will be NaN: the checkpoint is damaged or training diverged")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`. A NaN or an infinity makes the sum of its part NaN or infinite,
    so a finite sum clears the part in one reduction, without a mask (several times faster: base's
    weights in a fraction of a second); only a part whose sum is not finite (a bad value, or finite
    values summing past the float range) is checked element by element, in bounded scratch memory."""
    for part in tensor.reshape(-1).split(1 << 22):
        total = part.sum(dtype=torch.float64 if part.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(part).all()):
            return False
    return True


def _warn(message: str) -> None:
    warnings.warn(message, RobertaWarning, stacklevel=3)


def _with_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare RobertaModel checkpoint has no `roberta.` prefix; give every encoder key one."""
    encoder_parts = ("embeddings.", "encoder.", "pooler.")
    return {("roberta." + k if k.startswith(encoder_parts) else k): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------
# fairseq: a restricted unpickler and the key mapping


class _Inert:
    """Stands in for a class from fairseq's or omegaconf's world: stores its state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Inert(*args)


# Exactly what a checkpoint needs to rebuild tensors and plain containers.
_ALLOWED = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("argparse", "Namespace"), ("copyreg", "_reconstructor"),
    ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"),
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bool"), ("builtins", "complex"),
}
# Packages whose objects fairseq pickles as configuration or training state; they become _Inert.
_INERT_PACKAGES = ("omegaconf", "fairseq", "typing", "enum", "numpy", "pathlib", "_codecs")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's default) name Python 2 modules (`__builtin__.dict`, as in
        # an omegaconf DictConfig); map them as pickle itself does before checking the allow-list.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.split(".")[0] in _INERT_PACKAGES:
            return _Inert
        if module == "torch" and name.endswith("Storage") or module == "torch" and name in _TORCH_DTYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which could run code")


_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool", "int8", "int16"}

_restricted_pickle = types.SimpleNamespace(
    __name__="roberta_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
)


def load_fairseq_pickle(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as exc:
        raise RobertaError(f"{file} was refused: {exc}; only checkpoints of weights are loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RobertaError(f"{file} is truncated or corrupted ({type(exc).__name__}: {exc}); "
                           "download or copy it again") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RobertaError(f"{file} is not a fairseq checkpoint: it has no 'model' state dict")
    return state


def _plain(obj: Any) -> Any:
    """Turn a pickled omegaconf DictConfig (now _Inert objects) or a Namespace into plain dicts."""
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    if isinstance(obj, _Inert):
        state = getattr(obj, "state", None)
        if isinstance(state, dict):
            if "_content" in state:
                return _plain(state["_content"])
            if "_val" in state:
                return _plain(state["_val"])
            return {k: _plain(v) for k, v in state.items()}
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):  # an omegaconf ListConfig's content
        return [_plain(v) for v in obj]
    return obj


def _fairseq_hparams(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("args") is not None:
        return _plain(state["args"]) or {}
    cfg = _plain(state.get("cfg")) or {}
    return cfg.get("model") or {} if isinstance(cfg, dict) else {}


def read_fairseq(file: str | os.PathLike) -> tuple[RobertaConfig, dict[str, torch.Tensor]]:
    """Import a fairseq RoBERTa `model.pt` (current or 2019 key layout) with its classification heads."""
    file = Path(file)
    raw = load_fairseq_pickle(file)
    hp = _fairseq_hparams(raw)
    fs = {k: v for k, v in raw["model"].items() if isinstance(v, torch.Tensor)}
    prefix = next((p for p in ("encoder.sentence_encoder.", "decoder.sentence_encoder.")
                   if p + "embed_tokens.weight" in fs), None)
    if prefix is None:
        raise RobertaError(f"{file} is not a RoBERTa checkpoint: no sentence_encoder.embed_tokens.weight")
    state = fairseq_to_hf(fs)
    vocab, hidden = fs[prefix + "embed_tokens.weight"].shape
    try:
        layers = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in fs if k.startswith(prefix + "layers."))
        heads = int(hp.get("encoder_attention_heads") or max(1, hidden // 64))
        config = _fairseq_config(fs, prefix, hp, vocab, hidden, layers, heads)
    except (ValueError, TypeError, KeyError) as exc:
        raise RobertaError(f"{file} is not a complete RoBERTa checkpoint or has malformed settings "
                           f"({type(exc).__name__}: {exc})") from None
    act = hp.get("activation_fn", "gelu")
    if act != "gelu":
        raise RobertaError(f"{file} uses activation {act!r}; only RoBERTa's gelu is supported")
    check_weights(config, state, str(file))
    return config, state


def _fairseq_config(fs, prefix, hp, vocab, hidden, layers, heads) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=fs[f"{prefix}layers.0.fc1.weight"].shape[0],
        max_position_embeddings=fs[prefix + "embed_positions.weight"].shape[0],
        hidden_dropout_prob=float(hp.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(hp.get("attention_dropout", 0.1)),
        classification_heads={k.split(".")[1]: v.shape[0] for k, v in fs.items()
                              if k.startswith("classification_heads.") and k.endswith("out_proj.weight")},
    )


def fairseq_to_hf(fs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq parameter names to Hugging Face ones; the fused 2019 in_proj is split into q, k, v."""
    out: dict[str, torch.Tensor] = {}
    for key, value in fs.items():
        for old in ("encoder.", "decoder."):
            if key.startswith(old + "sentence_encoder.") or key.startswith(old + "lm_head."):
                key = key[len(old):]
                break
        if key.startswith("sentence_encoder."):
            rest = key[len("sentence_encoder."):]
            if rest.startswith("layers."):
                _, i, sub = rest.split(".", 2)
                _map_layer(out, f"roberta.encoder.layer.{i}.", sub, value)
                continue
            name = {"embed_tokens.weight": "roberta.embeddings.word_embeddings.weight",
                    "embed_positions.weight": "roberta.embeddings.position_embeddings.weight",
                    "emb_layer_norm.weight": "roberta.embeddings.LayerNorm.weight",
                    "emb_layer_norm.bias": "roberta.embeddings.LayerNorm.bias",
                    "layernorm_embedding.weight": "roberta.embeddings.LayerNorm.weight",
                    "layernorm_embedding.bias": "roberta.embeddings.LayerNorm.bias"}.get(rest)
            if name:
                out[name] = value
        elif key.startswith("lm_head."):
            if key == "lm_head.weight":
                continue  # tied to embed_tokens; checked below
            out[key] = value
        elif key.startswith("classification_heads."):
            out[key] = value
    hidden = out["roberta.embeddings.word_embeddings.weight"].shape[1]
    out["roberta.embeddings.token_type_embeddings.weight"] = out[
        "roberta.embeddings.word_embeddings.weight"].new_zeros(1, hidden)  # fairseq has no segments
    for old in ("encoder.", "decoder."):
        if old + "lm_head.weight" in fs and not torch.equal(
                fs[old + "lm_head.weight"], out["roberta.embeddings.word_embeddings.weight"]):
            raise RobertaError("this fairseq checkpoint's LM decoder is not tied to its embeddings; "
                               "RoBERTa ties them, so it cannot be represented here")
    return out


_LAYER_NAMES = {
    "self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
    "fc2": "output.dense", "final_layer_norm": "output.LayerNorm",
}


def _map_layer(out, prefix, sub, value):
    module, _, param = sub.rpartition(".")
    if module == "self_attn" and param in ("in_proj_weight", "in_proj_bias"):
        kind = param.split("_")[-1]
        for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
            out[f"{prefix}attention.self.{name}.{kind}"] = part.clone()
    elif module in _LAYER_NAMES:
        out[f"{prefix}{_LAYER_NAMES[module]}.{param}"] = value


def hf_to_fairseq(state: dict[str, torch.Tensor], layout: str = "current") -> dict[str, torch.Tensor]:
    """The inverse mapping, for exporting to fairseq: `current` or the fused-projection `2019` layout."""
    top = "encoder." if layout == "current" else "decoder."
    se = top + "sentence_encoder."
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    emb_ln = "layernorm_embedding" if layout == "current" else "emb_layer_norm"
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("roberta.embeddings."):
            rest = key[len("roberta.embeddings."):]
            name = {"word_embeddings.weight": "embed_tokens.weight",
                    "position_embeddings.weight": "embed_positions.weight",
                    "LayerNorm.weight": f"{emb_ln}.weight", "LayerNorm.bias": f"{emb_ln}.bias"}.get(rest)
            if name:
                out[se + name] = value
        elif key.startswith("roberta.encoder.layer."):
            i, rest = key[len("roberta.encoder.layer."):].split(".", 1)
            module, _, param = rest.rpartition(".")
            if layout == "2019" and module.startswith("attention.self."):
                fused.setdefault(f"{se}layers.{i}.self_attn.in_proj_{param}", {})[module.split(".")[-1]] = value
            else:
                out[f"{se}layers.{i}.{inverse[module]}.{param}"] = value
        elif key.startswith("lm_head."):
            out[top + key] = value
        elif key.startswith("classification_heads."):
            out[key] = value
    # fairseq has no segment embedding: RoBERTa's single row is added to every token, so fold it
    # into the position table, which is exact
    segment = state.get("roberta.embeddings.token_type_embeddings.weight")
    if segment is not None:
        out[se + "embed_positions.weight"] = out[se + "embed_positions.weight"] + segment[0]
    for name, parts in fused.items():
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if top + "lm_head.bias" in out:
        out[top + "lm_head.weight"] = out[se + "embed_tokens.weight"]
    return out


def save_fairseq(model: RobertaForMaskedLM, path: str | os.PathLike, tokenizer=None,
                 layout: str = "current") -> None:
    """Export to fairseq's layout (model.pt + dict.txt) for use with fairseq itself.

    fairseq reads only pickles, so this is the one file the project writes that is not safetensors.
    """
    c = model.config
    args = argparse.Namespace(
        arch="roberta_large" if c.num_hidden_layers == 24 else "roberta_base",
        encoder_layers=c.num_hidden_layers, encoder_embed_dim=c.hidden_size,
        encoder_ffn_embed_dim=c.intermediate_size, encoder_attention_heads=c.num_attention_heads,
        max_positions=c.max_tokens, dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob, activation_fn="gelu")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"args": args, "model": hf_to_fairseq(state, layout)}
    with replace_dir(path, keep=keep_beside_checkpoint) as tmp:
        torch.save(payload, tmp / FAIRSEQ_NAME)
        os.chmod(tmp / FAIRSEQ_NAME, default_mode())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------------
# Loading into a model class


def load_model(cls: type[RobertaPreTrainedModel], path: str | os.PathLike, dtype: torch.dtype | None = None,
               **config_overrides) -> RobertaPreTrainedModel:
    """Build `cls` from a checkpoint; heads the checkpoint lacks are initialised fresh."""
    config, state = read_checkpoint(path)
    file_head = config.head_name
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise RobertaError(f"unknown config field {key!r}")
        setattr(config, key, value)
    config.__post_init__()  # an id2label override sets num_labels
    check_vocab_fits(path, config)
    config, state = _place_heads(cls, config, state, config_overrides, file_head)
    config.__post_init__()
    model = on_meta(cls, config)
    load_state(model, state, source=str(path))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _place_heads(cls, config: RobertaConfig, state, overrides, file_head: str | None = None):
    """Move a sequence classifier between `classifier.*` (transformers) and named heads (fairseq).

    This is the one place that decides which head a task model starts from. A head whose label count
    differs from the one the caller asked for, or (when the caller names the head it wants, as
    fine-tuning does) a head of another name, is left out: the task model then starts with a fresh
    head. Starting RTE from an MNLI model, as the paper does, so replaces the 3-way `mnli` head with
    a new 2-way `rte` one. Named heads other than the wanted one are left out too, as fairseq leaves
    them out when fine-tuning: they were trained on the encoder as it was, and fine-tuning changes it.
    """
    asked = "num_labels" in overrides or "id2label" in overrides
    wanted = overrides.get("head_name")
    has_classifier = "classifier.out_proj.weight" in state
    named = sorted(config.classification_heads)
    if cls.__name__ == "RobertaForSequenceClassification" and not has_classifier and named:
        name = wanted if wanted else config.head_name if config.head_name in named else named[0]
        if name in named and (not asked or config.classification_heads[name] == config.num_labels):
            for key in [k for k in state if k.startswith(f"classification_heads.{name}.")]:
                state["classifier." + key.split(".", 2)[2]] = state.pop(key)
            config.head_name = name
            config.num_labels = config.classification_heads.pop(name)
            if config.id2label is not None and len(config.id2label) != config.num_labels:
                config.id2label = None
        if wanted:
            for key in [k for k in state if k.startswith("classification_heads.")]:
                del state[key]
            config.classification_heads = {}
    elif issubclass(cls, RobertaForMaskedLM) and has_classifier:
        name = config.head_name or "default"
        for key in [k for k in state if k.startswith("classifier.")]:
            state[f"classification_heads.{name}.{key.split('.', 1)[1]}"] = state.pop(key)
        config.classification_heads[name] = state[f"classification_heads.{name}.out_proj.weight"].shape[0]
        config.head_name = name
    if cls.__name__ in ("RobertaForSequenceClassification", "RobertaForTokenClassification"):
        out = state.get("classifier.out_proj.weight", state.get("classifier.weight"))
        other_head = wanted is not None and has_classifier and (file_head or "default") != wanted
        if out is not None and out.dim() == 2 and (out.shape[0] != config.num_labels or other_head):
            if asked or other_head:
                for key in [k for k in state if k.startswith("classifier.")]:
                    del state[key]
            else:
                config.id2label = None
                config.num_labels = out.shape[0]
    return config, state


def load_state(model: RobertaPreTrainedModel, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a state dict (HF names) into the model, with one-line errors for anything that does not fit."""
    if isinstance(model, RobertaModel):
        state = {k[len("roberta."):]: v for k, v in state.items() if k.startswith("roberta.")}
    own = model.state_dict()
    decoder = state.pop("lm_head.decoder.weight", None)
    state.pop("lm_head.decoder.bias", None)
    if decoder is not None and "roberta.embeddings.word_embeddings.weight" in state and not torch.equal(
            decoder, state["roberta.embeddings.word_embeddings.weight"]):
        raise RobertaError(f"{source}: lm_head.decoder.weight differs from the word embeddings; "
                           "RoBERTa ties them, so this checkpoint cannot be loaded")
    for key in ("roberta.embeddings.position_ids", "embeddings.position_ids",
                "roberta.embeddings.token_type_ids", "embeddings.token_type_ids"):
        state.pop(key, None)
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise RobertaError(f"{source}: tensor {key} has shape {list(value.shape)} but the config says "
                               f"{list(own[key].shape)}; the checkpoint does not match its config.json")
    missing = [k for k in own if k not in state]
    essential = [k for k in missing if not k.startswith(_NEW_HEAD_PREFIXES)
                 and not k.startswith("classification_heads.")]
    if essential:
        raise RobertaError(f"{source} lacks {len(essential)} of the model's tensors (e.g. {essential[0]}); "
                           "it is not a complete RoBERTa checkpoint")
    usable = {k: v for k, v in state.items() if k in own}
    if any(p.is_meta for p in model.parameters()):
        # A model built on the meta device takes the file's tensors as its own (one copy in memory,
        # not two); what the file lacks is then materialised and initialised.
        dtype = torch.get_default_dtype()
        for key, value in usable.items():
            if value.is_floating_point() and value.dtype != dtype:
                usable[key] = value.to(dtype)
        model.load_state_dict(usable, strict=False, assign=True)
        for name, module in model.named_modules():
            own_params = list(module.parameters(recurse=False))
            if any(p.is_meta for p in own_params):
                if not all(p.is_meta for p in own_params):
                    raise RobertaError(f"{source} has only some of the tensors of {name}; "
                                       "it is not a complete RoBERTa checkpoint")
                module.to_empty(device="cpu", recurse=False)
                model._init_weights(module)
    else:
        with torch.no_grad():
            for key, value in usable.items():
                own[key].copy_(value)
    model.missing_keys = missing  # heads initialised fresh, for callers that want to report them


def check_vocab_fits(path: str | os.PathLike, config: RobertaConfig) -> None:
    """A tokenizer shipped with the weights must not produce ids past the embedding table."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    n = None
    if (path / "vocab.json").exists():
        n = len(read_json(path / "vocab.json"))
    elif (path / FAIRSEQ_DICT).exists():
        with open(path / FAIRSEQ_DICT, encoding="utf-8", errors="replace") as f:
            n = 4 + sum(1 for line in f if line.strip()) + 1  # <s> <pad> </s> <unk>, rows, <mask>
    if n is not None and n > config.vocab_size:
        raise RobertaError(f"the vocabulary in {path} has {n} tokens but the model's embedding table has "
                           f"{config.vocab_size} rows; use the tokenizer made for this model, or "
                           "resize_token_embeddings")


# ----------------------------------------------------------------------------------------------------
# Writing


def save_model(model: RobertaPreTrainedModel, path: str | os.PathLike, tokenizer=None) -> None:
    """config.json + model.safetensors (+ tokenizer files), written whole: into a temporary sibling
    directory that then replaces `path` in one step (fileio.replace_dir), so an interrupted save leaves
    the previous checkpoint, and no file of it survives beside the new one. Other files in `path`
    (metrics, notes) are kept."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with replace_dir(path, keep=keep_beside_checkpoint) as tmp:
        save_safetensors(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        os.chmod(tmp / SAFETENSORS_NAME, default_mode())  # safetensors creates it 0600
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def model_class(directory: Path):
    """The model a checkpoint holds: a token-classification or question-answering model when its
    config.json says so (as transformers writes it), else the masked LM with its named heads."""
    try:
        architectures = read_json(directory / CONFIG_NAME).get("architectures")
    except RobertaError:
        architectures = None  # a fairseq checkpoint, or a config the loader reports on
    for cls in (RobertaForTokenClassification, RobertaForQuestionAnswering):
        if isinstance(architectures, list) and cls.__name__ in architectures:  # a name, not a substring of one
            return cls
    return RobertaForMaskedLM


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "hf", layout: str = "current") -> Path:
    """Convert a checkpoint between layouts: `hf` (what this project writes) or `fairseq`."""
    from .tokenizer import RobertaTokenizer

    if to not in ("hf", "fairseq"):
        raise RobertaError(f"unknown target layout {to!r}; use 'hf' or 'fairseq'")
    check_checkpoint_output(dst, src)
    src_dir = Path(src) if Path(src).is_dir() else Path(src).parent
    cls = model_class(src_dir)  # a tagger or a reader keeps its head
    if cls is not RobertaForMaskedLM and to == "fairseq":
        raise RobertaError(f"{src} is a {cls.__name__.removeprefix('RobertaFor')} checkpoint; fairseq's layout holds "
                           "sequence-classification heads only, so its head would be lost: keep it in the Hugging "
                           "Face layout")
    model = load_model(cls, src)
    tokenizer = RobertaTokenizer.from_pretrained(src_dir) if _has_tokenizer(src_dir) else None
    if to == "hf":
        save_model(model, dst, tokenizer=tokenizer)
    else:
        save_fairseq(model, dst, tokenizer=tokenizer, layout=layout)
    return Path(dst)


def _has_tokenizer(path: Path) -> bool:
    return (path / "vocab.json").exists() or (path / "encoder.json").exists()

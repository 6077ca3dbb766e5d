"""`roberta export --onnx DIR`: the encoder and its heads as one ONNX model.

For serving stacks built on ONNX Runtime, TensorRT or similar. The graph is the plain padded forward
pass (`model.Padded`: every position, attention masked at padding), traced by `torch.onnx.export`
with a dynamic batch size and length (up to the model's `max_tokens`), so one file takes any batch of up to `max_tokens` tokens.

    DIR/model.onnx      inputs  input_ids [batch, length] int64, attention_mask [batch, length] int64
                        outputs last_hidden_state [batch, length, hidden] (zeros at padding), and
                        - a masked-LM or classifier checkpoint (task "sequence-classification"): for
                          every classification head NAME, logits_NAME [batch, classes] (on `<s>`);
                        - a tagger ("token-classification"): logits [batch, length, labels];
                        - a reader ("question-answering"): start_logits and end_logits [batch, length]
                          (padding at float32's lowest, so that it is never an answer)
    DIR/onnx.json       the task, the input and output names, heads or labels, opset and model sizes
    DIR/config.json ... the checkpoint's config and tokenizer files, to tokenize as the model expects

The masked-LM head is left out: its 50K-way projection on every position would cost more than the
encoder itself. `tests/test_export.py` checks the file against this project's outputs with ONNX Runtime.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import RobertaError
from .fileio import replace_dir
from .model import RobertaForQuestionAnswering, RobertaForTokenClassification, first_token

OPSET = 18


def task(model) -> str:
    """What the exported file answers for this model: its heads' task, in Hugging Face's pipeline names."""
    if isinstance(model, RobertaForTokenClassification):
        return "token-classification"
    if isinstance(model, RobertaForQuestionAnswering):
        return "question-answering"
    return "sequence-classification"


class _Graph(nn.Module):
    """What the ONNX file computes: the padded encoder, then its heads (`task`): each classification
    head on `<s>`, the tagger's on every token, or the reader's start and end scores."""

    def __init__(self, model):
        super().__init__()
        self.model, self.task = model, task(model)

    def forward(self, input_ids, attention_mask):
        if self.task == "token-classification":
            out = self.model(input_ids, attention_mask)
            return out.last_hidden_state, out.logits
        if self.task == "question-answering":
            out = self.model(input_ids, attention_mask)
            return out.last_hidden_state, out.start_logits, out.end_logits
        hidden = self.model.encoder_model(input_ids, attention_mask).last_hidden_state
        first = first_token(hidden, attention_mask)
        return (hidden, *(head(first) for head in self.model.classification_heads.values()))


def export_onnx(model_name_or_path, out_dir, cache_dir=None, offline: bool | None = None) -> Path:
    """Write DIR/model.onnx (+ onnx.json, config and tokenizer files) for a model name or path; returns DIR.

    The directory is written beside its final name and renamed into place, so it is whole or absent
    (`fileio.replace_dir`: what a killed export left beside DIR is removed by the next export to DIR).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError as exc:
        raise RobertaError(f"export --onnx needs the {exc.name} package: pip install 'roberta[export]'") from None
    from .hub import load

    out = Path(out_dir)
    if out.exists():
        raise RobertaError(f"{out} already exists; give a new directory for the export")
    if not out.parent.is_dir():
        raise RobertaError(f"{out.parent} is not a directory; create it first")
    hub = load(model_name_or_path, device="cpu", cache_dir=cache_dir, offline=offline, precision="fp32")
    model = hub.model.eval()
    model.encoder_model.padding_free = False  # the plain layout: no shapes that depend on the data
    config = model.config
    kind = task(model)
    heads = {name: head.out_proj.out_features for name, head in getattr(model, "classification_heads", {}).items()}
    shapes = {"last_hidden_state": ["batch", "length", config.hidden_size]}  # each output's dimensions
    if kind == "token-classification":
        shapes["logits"] = ["batch", "length", config.num_labels]
    elif kind == "question-answering":
        shapes.update(start_logits=["batch", "length"], end_logits=["batch", "length"])
    else:
        shapes.update({f"logits_{name}": ["batch", n] for name, n in heads.items()})
    outputs = list(shapes)
    example = (torch.full((2, 8), 5, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    example[1][1, 6:] = 0
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            **{name: {i: d for i, d in enumerate(dims) if isinstance(d, str)} for name, dims in shapes.items()}}
    with replace_dir(out) as work:  # a temporary sibling; one a kill -9 left is removed by the next export to DIR
        # PyTorch's TorchScript-based exporter: deprecated in favour of the torch.export one, but in the
        # pinned PyTorch it is there and 15x faster on this graph (3 s against 47 s for a tiny model).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Graph(model).eval(), example, str(work / "model.onnx"), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=outputs,
                              opset_version=OPSET, dynamic_axes=axes)
        _name_dims(work / "model.onnx", shapes)
        config.save(work / "config.json")
        hub.tokenizer.save_pretrained(work)  # to tokenize as the model expects
        labels = {"labels": [config.labels()[i] for i in range(config.num_labels)]} \
            if kind == "token-classification" else {}
        (work / "onnx.json").write_text(json.dumps({
            "task": kind, "inputs": ["input_ids", "attention_mask"], "outputs": outputs, "heads": heads, **labels,
            "opset": OPSET,
            "hidden_size": config.hidden_size, "max_tokens": config.max_tokens,
            "pad_token_id": config.pad_token_id}, indent=2) + "\n")
    return out


def _name_dims(path: Path, shapes: dict[str, list]) -> None:
    """Give each output's dimensions their meaning: `batch` and `length` by name, the hidden size and
    the classes by number (the exporter calls what it could not infer `Wherelast_hidden_state_dim_2`)."""
    import onnx

    graph = onnx.load(str(path))
    for output in graph.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, shapes[output.name]):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(graph, str(path))

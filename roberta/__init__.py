"""RoBERTa in PyTorch: exact to the published models, fast, small on disk."""
from . import runtime

runtime.configure()  # before torch loads: OpenMP's wait policy and MKL's reproducible mode (roberta/runtime.py)

import importlib

from .errors import RobertaError

__version__ = "0.1.0"

# Imported on first use, so that `roberta --help` and `roberta --version` answer without loading torch.
_LAZY = {"RobertaHub": "hub", "load": "hub", "RobertaTokenizer": "tokenizer",
         **{name: "model" for name in ("ModelOutput", "RobertaConfig", "RobertaForMaskedLM", "RobertaForMultipleChoice",
                                       "RobertaForQuestionAnswering", "RobertaForSequenceClassification",
                                       "RobertaForTokenClassification", "RobertaModel")}}
__all__ = ["RobertaError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'roberta' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

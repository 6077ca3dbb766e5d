"""RoBERTa in PyTorch: exact to the published models, fast, small on disk."""
from . import runtime

runtime.configure()  # before torch loads: OpenMP's wait policy and MKL's reproducible mode (roberta/runtime.py)

from .errors import RobertaError
from .hub import RobertaHub, load
from .model import (
    ModelOutput,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from .tokenizer import RobertaTokenizer

__version__ = "0.1.0"

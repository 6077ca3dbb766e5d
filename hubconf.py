"""torch.hub entry points, one per named model:

    torch.hub.load("/path/to/this/checkout", "roberta.base", source="local")

Each takes `roberta.load`'s keyword arguments (device, cache_dir, offline, base_url, progress) and
returns the hub object; weights come from the cache, downloaded on first use.
"""
from roberta.download import MODELS as _MODELS
from roberta.hub import load as _load

dependencies = ["torch", "tokenizers", "safetensors", "tqdm"]


def _entry_point(name):
    def entry_point(**kwargs):
        return _load(name, **kwargs)

    entry_point.__doc__ = f"RoBERTa {name}, as `roberta.load({name!r}, **kwargs)` returns it."
    return entry_point


# Names with dots ('roberta.base') cannot be written as `def`; torch.hub looks them up with getattr.
globals().update({name: _entry_point(name) for name in _MODELS})

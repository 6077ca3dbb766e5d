"""Shared test fixtures: where the real data lives, and small models built from it."""
import os
from pathlib import Path

# Each xdist worker gets its share of the cores, so that `pytest -n N` never runs more compute threads than
# the machine has (set before torch loads; subprocesses of the tests inherit it).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

# The float32 products on the plain kernel, not the one measured fastest (roberta/kernels.py): two test processes
# timing at once on a busy machine could choose differently and round differently. tests/test_kernels.py
# measures, caches and checks every candidate itself.
os.environ.setdefault("ROBERTA_KERNELS", "default")

import pytest  # noqa: E402

import roberta  # noqa: E402,F401  first, so that its runtime settings (roberta/runtime.py) precede torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the test when absent, fails when CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing: the real data lives in ../shared/data beside the project root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def bpe_dir() -> Path:
    """The real RoBERTa tokenizer files (fairseq and Hugging Face layouts)."""
    return shared_path("roberta-bpe")


@pytest.fixture(scope="session")
def hub_checkpoints(tmp_path_factory, bpe_dir) -> dict[str, Path]:
    """A tiny RoBERTa with the real vocabulary and an 'mnli' head, in every layout `roberta.load` reads."""
    from hub_helpers import make_checkpoints

    return make_checkpoints(tmp_path_factory.mktemp("hub-checkpoints"), bpe_dir)


@pytest.fixture(scope="session")
def tiny_hub(hub_checkpoints):
    """That model loaded as the hub object (do not change it in a test: load your own)."""
    import roberta

    return roberta.load(hub_checkpoints["hf"], precision="fp32")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, bpe_dir) -> Path:
    """A tiny masked LM (2 x 64, 64 positions) with the real tokenizer, to fine-tune in tests."""
    import torch

    from roberta.model import RobertaConfig, RobertaForMaskedLM
    from roberta.tokenizer import RobertaTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mlm-dir")
    RobertaForMaskedLM(RobertaConfig.tiny(max_position_embeddings=66)).save_pretrained(
        path, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    return path

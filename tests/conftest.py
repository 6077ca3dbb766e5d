"""Shared test fixtures: where the real data lives, and small models built from it."""
import os
from pathlib import Path

import pytest

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

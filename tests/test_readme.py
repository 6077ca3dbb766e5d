"""README.md is runnable documentation: every code block in it runs, as written, and succeeds.

`make demo` takes minutes, so the models the README uses are built here the same way, only smaller and
with a few updates: a tiny masked LM pretrained by `roberta.pretrain` into `demo-out/pretrain`, and a run
of `roberta.finetune` with a `word_order` head into `demo-out/finetune/pretrained`, in a temporary
directory that every block runs in (Python blocks one process each, shell blocks with `bash -e`, the
`roberta` command on PATH). A block after `<!-- readme-test: network -->` runs against a local HTTP
server holding a tiny stand-in for the published models; the block after `<!-- readme-test: setup -->`
(`make demo`, `make test`) is what the models built here stand in for.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path
from hub_helpers import FileServer, serve_models

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (\w+) -->\n)?```(\w+)\n(.*?)```", re.S)


def blocks() -> list[tuple[str | None, str, str, int]]:
    """(marker, language, code, line number) of every fenced block of README.md."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), m.group(3), text.count("\n", 0, m.start(2)) + 1) for m in BLOCK.finditer(text)]


def build_demo_models(root: Path, bpe_dir: Path) -> None:
    """demo-out/ as `make demo` leaves it, from a few updates of the same library calls."""
    from roberta.data import preprocess
    from roberta.demo import word_order_task
    from roberta.finetune import finetune
    from roberta.pretrain import PretrainConfig, pretrain

    out = root / "demo-out"
    paragraphs = [p.strip() for p in shared_path("corpus", "wikitext2-valid.txt").read_text(encoding="utf-8")
                  .split("\n \n") if len(p.split()) > 20][:300]
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "text.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    preprocess([out / "corpus" / "text.txt"], out / "data", vocab=bpe_dir, valid_fraction=0.05, workers=1,
               progress=False)
    cfg = PretrainConfig.preset("tiny", model="tiny", data=str(out / "data"), max_len=64, batch_size=8,
                                micro_batch_size=8, warmup_updates=1, total_updates=2, val_every=0, save_every=2,
                                log_every=1, val_samples=8, threads=1, progress=False)
    model_dir = pretrain(cfg, out / "pretrain")
    task = word_order_task(paragraphs, out / "word-order", n=80)
    finetune("custom", task, model_dir, out / "finetune" / "pretrained", lr=1e-3, max_epochs=1, batch_size=16,
             dropout=0.0, head_name="word_order")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, bpe_dir) -> Path:
    root = tmp_path_factory.mktemp("readme")
    build_demo_models(root, bpe_dir)
    return root


def environment(tmp: Path, **extra) -> dict:
    """The `roberta` command on PATH, as `.venv/bin` puts it there, and this checkout's package."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "roberta").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m roberta "$@"\n')
    (bin_dir / "roberta").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "ROBERTA_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **extra}
    return env


def run_block(language: str, code: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-eo", "pipefail", "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_readme_is_short_and_marks_what_it_cannot_run_here():
    assert len(README.read_bytes()) < 10 * 1024
    found = blocks()
    assert {language for _, language, _, _ in found} <= {"python", "sh"}
    setup = [code for marker, _, code, _ in found if marker == "setup"]
    assert len(setup) == 1 and "make demo" in setup[0]
    assert {marker for marker, _, _, _ in found} <= {None, "setup", "network"}


def test_every_offline_block_runs_as_written(workdir, tmp_path):
    env = environment(tmp_path)
    ran = 0
    for marker, language, code, line in blocks():
        if marker is not None:
            continue
        result = run_block(language, code, workdir, env)
        assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
        assert result.stdout.strip(), f"README.md line {line} printed nothing"
        if language == "python" and not ran:  # the tour prints what its comments say
            lines = result.stdout.splitlines()
            assert lines[0] == "Hello world!" and lines[3].startswith("{'ordered': "), result.stdout
        ran += 1
    assert ran >= 2
    assert sorted(p.name for p in workdir.iterdir()) == ["demo-out", "work"]  # the examples write under work/ only
    assert sorted(p.name for p in (workdir / "work").iterdir()) == ["compressed", "my-model", "vectors.npy"]


def test_network_blocks_run_against_a_stand_in_for_the_published_models(hub_checkpoints, bpe_dir, tmp_path):
    network = [(language, code, line) for marker, language, code, line in blocks() if marker == "network"]
    assert network
    with FileServer() as server:
        serve_models(server, hub_checkpoints, bpe_dir)
        env = environment(tmp_path, ROBERTA_OFFLINE="", HF_HUB_OFFLINE="", ROBERTA_BASE_URL=server.url,
                          ROBERTA_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
        for language, code, line in network:
            result = run_block(language, code, tmp_path, env)
            assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
            if language == "python":  # the stand-in has the real vocabulary: the ids the comment gives
                assert result.stdout.splitlines()[0] == "[0, 31414, 232, 328, 2]"

"""benchmarks/gpu_check.py, the one-call check of the CUDA paths, runs its dry run here (a tiny model on
the CPU) so that it cannot rot between the runs on a GPU: every check passes and the JSON is whole."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["parity-fp32", "parity-bf16", "varlen-vs-padded", "tag-answer-batched", "pretrain-bf16", "pretrain-fp16",
          "finetune-2-steps", "features-tokens/s", "mfu-pretrain-base-512"]


def test_gpu_check_dry_run_passes_every_check_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and list(report["checks"]) == CHECKS
    for name, result in report["checks"].items():
        assert result["status"] == "ok", (name, result)
        assert name in done.stdout
    assert report["checks"]["parity-fp32"]["worst"] <= 1e-4  # against transformers, which the tests have
    assert set(report["checks"]["parity-fp32"]["heads"]) == {
        "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
        "RobertaForQuestionAnswering", "RobertaForMultipleChoice"}
    assert report["checks"]["pretrain-fp16"]["loss_scale"] > 0
    assert len(report["checks"]["finetune-2-steps"]["losses"]) == 2
    assert report["checks"]["features-tokens/s"]["ours_tokens_per_s"] > 0
    assert report["checks"]["tag-answer-batched"]["inputs"] == 40
    assert not list(tmp_path.glob(".*.tmp"))

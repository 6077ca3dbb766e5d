"""The paths other machines take, run on this one: the core parity tests in a subprocess with every
library capped at AVX2 (as on an AVX2-only laptop or cloud CPU; on a CPU without AVX-512 the cap changes
nothing, and only what `auto` picks under it is checked), and again with this project's C extensions
unavailable (as after a failed build). Each must pass exactly as it does here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What an AVX2-only CPU gives PyTorch, oneDNN and MKL (each library honours its own variable).
AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

CORE_PARITY = [
    "tests/test_model.py",
    "tests/test_hub.py::test_features_and_all_hiddens_match_transformers",
    "tests/test_hub.py::test_sentence_pair_prediction_matches_transformers",
    "tests/test_hub.py::test_batched_calls_equal_one_at_a_time",
    "tests/test_hub.py::test_a_default_load_is_float32_and_can_be_saved_given_a_head_and_trained",
    "tests/test_speed_paths.py::test_batched_features_equal_transformers_on_the_padded_batch",
    "tests/test_speed_paths.py::test_padding_free_path_equals_the_plain_padded_path",
    "tests/test_speed_paths.py::test_masked_lm_training_step_matches_transformers",
    "tests/test_speed_paths.py::test_reduced_precision_stays_close_to_float32",
    "tests/test_speed_paths.py::test_int8_kernel_equals_the_plain_integer_arithmetic",
]

# Run before pytest in the subprocess: `hide` makes `import roberta._kernels` (and _planes, _mkl_paths) fail as
# when they were never built; then it reports what the process runs on, for the assertions below.
PRELUDE = """
import json, sys
if {hide}:
    sys.modules["roberta._kernels"] = None
    sys.modules["roberta._planes"] = None
    sys.modules["roberta._mkl_paths"] = None
import roberta, torch
from roberta import inference, model
print("FACTS " + json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                             "attention_kernel": model._attend_cpu is not None,
                             "mkl_paths": roberta.runtime.mkl_paths(),
                             "auto": inference.resolve_precision("auto", "cpu")[0]}}))
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *{tests}]) if {tests} else 0)
"""


def run_core_parity(env: dict, hide_extensions: bool, tests: list[str]) -> tuple[dict, str]:
    code = PRELUDE.format(hide=hide_extensions, tests=tests)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    facts = next(line for line in result.stdout.splitlines() if line.startswith("FACTS "))
    return json.loads(facts[len("FACTS "):]), result.stdout


@pytest.mark.slow
def test_core_parity_with_every_library_capped_at_avx2():
    # on a CPU without AVX-512 the cap changes nothing: the suite itself is that run, so only the facts
    # (and what auto picks) are checked in the capped process
    from roberta.inference import cpu_flags

    facts, out = run_core_parity(AVX2_CAP, hide_extensions=False,
                                 tests=CORE_PARITY if "avx512f" in cpu_flags() else [])
    assert facts["capability"] in ("AVX2", "DEFAULT")  # PyTorch honoured the cap
    assert facts["auto"] in ("fp32", "int8", "bf16")  # resolved without an error
    # and what auto picked runs: a model loaded with it gives features
    check = ("import roberta, torch; m = roberta.RobertaModel(roberta.RobertaConfig.tiny()); "
             "from roberta.inference import reduce_precision, extract_features_batched; "
             "reduce_precision(m, 'auto'); print(extract_features_batched(m, [[0, 5, 6, 2]])[0].shape)")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **AVX2_CAP})
    assert result.returncode == 0 and "torch.Size([4, " in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_core_parity_without_the_c_extensions():
    # the compressed formats' pure-Python and zipnn decoders too; the tests of the C decoder itself skip
    # (CI unset: with CI=true they fail on a missing extension, which is the point of them elsewhere)
    tests = CORE_PARITY + ["tests/test_compress.py", "tests/test_znn.py", "-k", "not own_decoder"]
    facts, out = run_core_parity({"CI": ""}, hide_extensions=True, tests=tests)
    assert facts["attention_kernel"] is False  # PyTorch's attention ran instead of the C kernel
    assert facts["mkl_paths"] == "vendor"  # and MKL made its own choice of code path
    assert " failed" not in out and " passed" in out

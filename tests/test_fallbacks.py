"""The paths other machines take, run on this one: the core parity tests in a subprocess with every
library capped at AVX2 (as on an AVX2-only laptop or cloud CPU; on a CPU without AVX-512 the cap changes
nothing, and only what `auto` picks under it is checked), and again with this project's C extensions
unavailable (as after a failed build). Each must pass exactly as it does here. And the C kernels built by a
compiler without OpenMP, which must give the same bits on one thread."""
import json
import os
import shutil
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
    # and MKL's packed products, whose GELU then runs as PyTorch's passes
    tests = CORE_PARITY + ["tests/test_compress.py", "tests/test_znn.py",
                           "tests/test_kernels.py::test_mkl_packed_weights_multiply_any_row_count_as_f_linear_does",
                           "-k", "not own_decoder"]
    facts, out = run_core_parity({"CI": ""}, hide_extensions=True, tests=tests)
    assert facts["attention_kernel"] is False  # PyTorch's attention ran instead of the C kernel
    assert facts["mkl_paths"] == "vendor"  # and MKL made its own choice of code path
    assert " failed" not in out and " passed" in out


# Compares, in a child process, the installed kernels against the ones built at `path`: the same inputs
# through each, on 2 threads; prints which functions gave the same bits.
SAME_KERNELS = """
import importlib.util, json, sys
import numpy as np, torch
from roberta import _kernels as installed
spec = importlib.util.spec_from_file_location("roberta._kernels", sys.argv[1])
serial = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serial)
level = torch.backends.cpu.get_cpu_capability()
rng = np.random.default_rng(0)
x = rng.standard_normal((67, 3072), dtype=np.float32) * 3
r, gamma, beta = (rng.standard_normal(s, dtype=np.float32) for s in ((67, 3072), 3072, 3072))
m = rng.random((67, 1), dtype=np.float32)
qkv = rng.standard_normal((70, 3 * 4 * 64), dtype=np.float32)
cu = np.array([0, 25, 28, 70], dtype=np.int64)

def outputs(k):
    k.set_isa(level)
    y, q, qm, a = x.copy(), np.empty(x.shape, np.uint8), np.empty((67, 1), np.float32), np.empty((70, 256), np.float32)
    k.quantize_rows(x, 67, 3072, q, qm, 2)
    k.scale_rows(y, 67, 3072, m, beta, True, 2)
    n = x.copy()
    k.add_norm(n, r, 67, 3072, gamma, beta, 1e-5, 2)
    out = {"quantize_rows": [q, qm], "scale_rows": [y], "add_norm": [n]}
    if k.attend_available():
        k.attend(qkv, 70, cu, 3, 4, 64, a, 2)
        out["attend"] = [a]
    return out

ours, theirs = outputs(serial), outputs(installed)
print("SAME " + json.dumps({name: all(np.array_equal(a, b) for a, b in zip(ours[name], theirs[name]))
                            for name in theirs}))
"""


@pytest.mark.slow
def test_kernels_build_without_openmp_and_give_the_same_bits(tmp_path):
    """A compiler without OpenMP (clang without libomp) still builds roberta._kernels (setup.py retries
    without -fopenmp), and those kernels, each on one thread, give the same bits as the installed ones on
    two: every step shares out whole rows or (sequence, head) pairs, never a sum."""
    from roberta import inference

    if inference._kernels is None or shutil.which("gcc") is None:
        assert os.environ.get("CI") != "true", "roberta._kernels was not built (setup.py), or gcc is missing"
        pytest.skip("roberta._kernels is not built here, or there is no gcc to build it again")
    cc = tmp_path / "cc"  # gcc, but for -fopenmp, which it refuses as a compiler without OpenMP does
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP" >&2; exit 1; }; done\n'
                  'exec gcc "$@"\n')
    cc.chmod(0o755)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "CC": str(cc), "LDSHARED": f"{cc} -shared"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "roberta._kernels did not build with OpenMP; building it without" in build.stdout + build.stderr
    (built,) = (tmp_path / "lib" / "roberta").glob("_kernels*.so")
    assert b"GOMP_parallel" not in built.read_bytes()  # no OpenMP runtime asked for
    assert b"GOMP_parallel" in Path(inference._kernels.__file__).read_bytes()
    result = subprocess.run([sys.executable, "-c", SAME_KERNELS, str(built)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    same = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("SAME "))[5:])
    assert set(same) >= {"quantize_rows", "scale_rows", "add_norm"} and all(same.values()), same

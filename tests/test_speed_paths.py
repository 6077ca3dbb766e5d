"""The fast paths give the plain paths' results, so speed work cannot change numbers unnoticed.

Plain = transformers' model on the padded batch (same weights), or our model one sequence at a time.
"""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
import transformers

import roberta
from roberta import RobertaConfig
from roberta.tokenizer import RobertaTokenizer
import os
import subprocess
import sys
from pathlib import Path

from roberta import inference, model
from roberta.model import packed_attention_available
from roberta.inference import (Int8Linear, PackedLinear, choose_precision, cpu_flags, extract_features_batched,
                               length_batches, packed_bf16_available, pad_batch, reduce_precision, resolve_precision)

from test_model import CONFIG as MODEL_CONFIG, TOL, pair as model_pair, randomize

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = dict(num_hidden_layers=2, max_position_embeddings=70)  # room for 68-token inputs
CONFIG = {**MODEL_CONFIG, **OVERRIDES}


def pair(cls_name, tmp_path, **overrides):
    return model_pair(cls_name, tmp_path, **OVERRIDES, **overrides)


def assert_same_training_step(ours, theirs, ids, mask, labels):
    """Same loss, and every gradient within float rounding of transformers'."""
    loss = ours(ids, mask, labels=labels).loss
    reference = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss.item() - reference.item()) <= TOL
    loss.backward()
    reference.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs_params[name]
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, q.grad.abs().max().item()), name


def random_sequences(n, seed=0, lo=2, hi=60, vocab=300):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        seq = torch.randint(4, vocab, (length,), generator=g).tolist()
        seq[0], seq[-1] = 0, 2
        out.append(seq)
    return out


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


CAP_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_capped(args, tmp_path):
    """A child Python with every library capped at AVX2, as on an AVX2-only CPU; this checkout first."""
    env = {**os.environ, **CAP_AVX2, "ROBERTA_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_length_batches_cover_every_index_once_within_the_budget():
    lengths = [5, 60, 3, 3, 17, 40, 41, 8, 60, 1]
    batches = length_batches(lengths, batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    # sorted: each batch's lengths never undercut the previous batch's
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    with pytest.raises(roberta.RobertaError):
        length_batches(lengths, batch_tokens=0)


@pytest.mark.parametrize("batch_tokens", [1, 200, 100_000])
def test_batched_features_equal_transformers_on_the_padded_batch(tmp_path, batch_tokens):
    ours, theirs = pair("RobertaModel", tmp_path)
    sequences = random_sequences(13)
    features = extract_features_batched(ours, sequences, batch_tokens=batch_tokens)
    ids, mask = pad_batch(sequences, pad_id=1)
    with torch.no_grad():
        reference = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(features) == len(sequences)
    for row, (seq, f) in enumerate(zip(sequences, features)):
        assert f.shape == (len(seq), CONFIG["hidden_size"]) and f.dtype == torch.float32
        assert (f - reference[row, : len(seq)]).abs().max().item() <= TOL


def test_masked_lm_model_gives_encoder_features_and_empty_input_is_refused(tmp_path):
    mlm = randomize(roberta.RobertaForMaskedLM(RobertaConfig(**CONFIG)))
    sequences = random_sequences(4, seed=1)
    features = extract_features_batched(mlm, sequences)
    for seq, f in zip(sequences, features):
        with torch.no_grad():
            alone = mlm.roberta(torch.tensor([seq])).last_hidden_state[0]
        assert (f - alone).abs().max().item() <= TOL
    assert extract_features_batched(mlm, []) == []
    with pytest.raises(roberta.RobertaError, match="empty"):
        extract_features_batched(mlm, [[0, 5, 2], []])


@pytest.mark.parametrize("precision, min_cosine, packed", [("bf16", 0.999, True), ("bf16", 0.999, False),
                                                           ("int8", 0.999, None)])
def test_reduced_precision_stays_close_to_float32(precision, min_cosine, packed, monkeypatch):
    if packed is False:  # the bf16 path of GPUs and of CPUs without bf16 units, whatever this CPU has
        monkeypatch.setattr(inference, "packed_bf16_available", lambda: False)
    # BERT initialisation, as a trained model has it: the regime the documented accuracy is for
    torch.manual_seed(0)
    model = roberta.RobertaModel(RobertaConfig(**{**CONFIG, "hidden_size": 128, "intermediate_size": 256})).eval()
    sequences = random_sequences(8, seed=2)
    exact = extract_features_batched(model, sequences)
    reduce_precision(model, precision)
    approx = extract_features_batched(model, sequences)
    assert all(a.dtype == torch.float32 for a in approx)
    assert min(cosine(a, e) for a, e in zip(approx, exact)) >= min_cosine
    if precision == "int8":
        attention = model.encoder.layer[0].attention.self
        assert isinstance(attention.qkv, Int8Linear) and not hasattr(attention, "query")
        assert isinstance(model.encoder.layer[1].output.dense, Int8Linear)
    else:
        assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
        kind = PackedLinear if packed and packed_bf16_available() else torch.nn.Linear
        attention = model.encoder.layer[0].attention.self
        assert type(attention.qkv) is kind and not hasattr(attention, "query")


def test_unknown_precision_is_refused():
    model = roberta.RobertaModel(RobertaConfig.tiny())
    with pytest.raises(roberta.RobertaError, match="precision"):
        reduce_precision(model, "fp8")


@pytest.mark.parametrize("device, flags, gpu_bf16, expected", [
    ("cpu", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, False, "bf16"),  # AMX
    ("cpu", {"avx512f", "avx512_vnni", "avx512_bf16"}, False, "bf16"),   # AVX-512 BF16 without AMX
    ("cpu", {"avx2", "avx512f", "avx512_vnni"}, False, "int8"),         # the Xeon: VNNI only
    ("cpu", {"avx2", "avx512f"}, False, "fp32"),                        # AVX-512 without VNNI
    ("cpu", {"avx2", "avx_vnni"}, False, "fp32"),                       # AVX-VNNI (256-bit): not measured
    ("cpu", set(), False, "fp32"),                                      # no flags readable
    ("cpu", {"asimd", "bf16", "i8mm"}, False, "fp32"),                  # Arm names are not x86 units
    ("cuda", {"amx_bf16"}, True, "bf16"),                               # Ampere or later
    ("cuda", {"amx_bf16"}, False, "fp32"),                              # older GPUs: never int8 on a GPU
])
def test_auto_precision_follows_the_hardware(device, flags, gpu_bf16, expected):
    precision, why = choose_precision(device, flags, gpu_bf16)
    assert precision == expected and why


ZEN = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}


@pytest.mark.parametrize("runs, gflops, expected, reason", [
    ({"bf16", "int8"}, None, "bf16", "bf16 units"),
    ({"int8"}, None, "int8", "does not run it correctly"),  # oneDNN capped below bf16: the next one
    (set(), None, "fp32", "does not run it correctly"),  # the AVX2 cap: neither runs
    ({"bf16", "int8"}, {"fp32": 100.0, "bf16": 300.0, "int8": 400.0}, "bf16", "300 GFLOP/s"),
    ({"bf16", "int8"}, {"fp32": 100.0, "bf16": 90.0, "int8": 400.0}, "int8", "not faster than fp32"),
    ({"bf16", "int8"}, {"fp32": 100.0, "bf16": 90.0, "int8": 99.0}, "fp32", "not faster than fp32"),
])
def test_auto_precision_takes_what_runs_here_and_is_never_slower_than_fp32(runs, gflops, expected, reason):
    precision, why = choose_precision("cpu", ZEN, False, runs, gflops)
    assert precision == expected and reason in why


@pytest.mark.parametrize("flags, runs, expected", [
    ({"avx2", "avx512f", "avx512_vnni"}, {"int8"}, "fp32"),  # VNNI listed, but capped: oneDNN sums on AVX2
    (ZEN, {"int8"}, "fp32"),                                  # the same with bf16 refused too
    (ZEN, {"bf16", "int8"}, "bf16"),                          # bf16 does not depend on int8's range
])
def test_auto_never_takes_int8_on_7_bit_weights(flags, runs, expected):
    """int8 with 7-bit weights (AVX2's saturating multiply-add) measured min cosine 0.99916 against fp32,
    against 0.99961 on full-range weights: `auto` leaves it to an explicit --precision int8."""
    precision, why = choose_precision("cpu", flags, False, runs, {"fp32": 100.0, "bf16": 300.0, "int8": 400.0},
                                      int8_full=False)
    assert precision == expected
    if expected == "fp32":
        assert "7-bit weights" in why and "--precision int8" in why


def test_explicit_precisions_and_the_emulated_bf16_warning(recwarn):
    runs = inference.runs_here()
    full_int8 = "int8" in runs and inference.int8_levels() == 127
    assert resolve_precision("auto", "cpu", flags={"avx512_vnni"})[0] == ("int8" if full_int8 else "fp32")
    assert resolve_precision("auto", "cpu", flags={"amx_bf16"})[0] == ("bf16" if "bf16" in runs else "fp32")
    assert resolve_precision("fp32", "cpu", flags={"amx_bf16"}) == ("fp32", "asked for")
    if "bf16" in runs:
        assert resolve_precision("bf16", "cpu", flags={"amx_bf16"}) == ("bf16", "asked for")
    assert not recwarn.list
    with pytest.warns(UserWarning, match="emulates it"):
        assert resolve_precision("bf16", "cpu", flags={"avx512f", "avx512_vnni"})[0] == "bf16"
    with pytest.raises(roberta.RobertaError, match="int8 runs on CPU only"):
        resolve_precision("int8", "cuda", flags=set())
    assert cpu_flags() == cpu_flags() and isinstance(cpu_flags(), frozenset)


def test_auto_resolves_and_runs_under_an_avx2_cap(tmp_path):
    """On an AVX2-only machine (or one capped so), `auto` picks what runs, and the model runs in it:
    oneDNN refuses bf16 there and its int8 sums saturate, whatever /proc/cpuinfo lists."""
    script = (
        "import json, torch, roberta\n"
        "from roberta import inference\n"
        "precision, why = inference.resolve_precision('auto', 'cpu')\n"
        "model = roberta.RobertaModel(roberta.RobertaConfig.tiny()).eval()\n"
        "inference.reduce_precision(model, precision)\n"
        "features = inference.extract_features_batched(model, [[0, 5, 6, 2], [0, 7, 2]])\n"
        "print(json.dumps({'precision': precision, 'why': why, 'runs': sorted(inference.runs_here()),\n"
        "                  'levels': inference.int8_levels(),\n"
        "                  'isa': torch.backends.cpu.get_cpu_capability(),\n"
        "                  'finite': all(bool(f.isfinite().all()) for f in features)}))\n")
    done = run_capped(["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["isa"] in ("AVX2", "DEFAULT") and result["finite"] and result["why"]
    assert "bf16" not in result["runs"]  # oneDNN's bf16 path needs AVX-512
    if result["levels"] < 127:  # int8 only on 7-bit weights, which auto leaves alone: nothing else runs
        assert result["precision"] == "fp32"
    assert result["precision"] == "fp32" or result["precision"] in result["runs"]


def test_int8_kernel_equals_the_plain_integer_arithmetic():
    """oneDNN's prepacked int8 matmul against the same quantisation done with int32 tensors."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    layer = Int8Linear(weight, bias)
    x = torch.randn(3, 11, 64, generator=g) * torch.rand(3, 11, 1, generator=g) * 10  # rows of every scale
    fast, plain = layer(x), layer.forward_reference(x)
    assert fast.shape == (3, 11, 96)
    assert (fast - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    exact = torch.nn.functional.linear(x, weight, bias)
    assert 0 < (fast - exact).abs().max().item() <= 0.02 * exact.abs().max().item()  # quantised, and close
    # the integers are held once, in oneDNN's packed layout: `weight` reads them back from it, and besides
    # it the module keeps only scales, bias and zeros (a plain int8 copy would be 96 x 64 bytes more)
    levels = inference.int8_levels()  # 127: the offset uint8 rows of quantize_rows; 63: rounded to fewer levels
    q, m = inference.quantize_rows(weight)
    expected = q.int() - 128 if levels == 127 else torch.round(weight * (levels / m)).int()
    assert torch.equal(layer.weight, expected.to(torch.int8)) and layer.weight.shape == (96, 64)
    held = [t for t in [*layer.buffers(), *vars(layer).values()]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided]
    assert sum(t.numel() * t.element_size() for t in held) == 96 * 4 * 3  # weight_scale, bias, zeros


def test_int8_c_kernels_equal_their_pytorch_arithmetic_bit_for_bit():
    require_c_kernels()
    g = torch.Generator().manual_seed(1)
    for rows, k in [(37, 768), (5, 3072), (1, 1), (0, 8), (9, 33)]:
        x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
        if rows > 2:
            x[1], x[2, :] = 0.0, 1e-38  # a zero row and a subnormal row meet the 1e-30 floor
        q, m = inference.quantize_rows(x)
        q_ref, m_ref = inference.quantize_rows_reference(x)
        assert q.dtype == torch.uint8 and torch.equal(q, q_ref) and torch.equal(m, m_ref)
        y, s, b = torch.randn(rows, 50, generator=g), torch.rand(rows, 1, generator=g), torch.randn(50, generator=g)
        assert torch.equal(inference.scale_rows(y.clone(), s, b), y.clone().mul_(s).add_(b))
    for gelu in (False, True):  # the whole layer through the kernels against the int32 reference
        layer = Int8Linear(torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, generator=g), gelu=gelu)
        x = torch.randn(4, 7, 64, generator=g)
        assert (layer(x) - layer.forward_reference(x)).abs().max().item() <= 1e-5


def test_rescaling_then_quantising_in_one_pass_gives_the_two_steps_bits():
    """The int8 FFN's first layer quantises its rows for the second in the pass that rescales them and
    applies GELU (inference.scale_rows_quantized): the same bits as the two steps apart, at every
    instruction-set level and thread count, for widths that end inside a vector and row counts that end
    inside a block of 8 rows."""
    require_c_kernels()
    g = torch.Generator().manual_seed(6)
    for rows, n in [(37, 3072), (9, 33), (1, 1), (0, 16), (300, 64)]:
        y = torch.randn(rows, n, generator=g) * 4
        s, b = torch.rand(rows, 1, generator=g) * 3, torch.randn(n, generator=g)
        y[:2] = 0.0  # rows that are the bias alone
        for gelu in (False, True):
            def both(threads=2):  # (apart, fused) at the level in use
                apart = inference.quantize_rows(inference.scale_rows(y.clone(), s, b, gelu))
                q, m = torch.empty(rows, n, dtype=torch.uint8), torch.empty(rows, 1)
                inference._kernels.scale_rows(y.clone().numpy(), rows, n, s.numpy(), b.numpy(), gelu, threads,
                                              q.numpy(), m.numpy())
                return apart, (q, m)
            runs = [*each_isa_level(both).values(), both(1), both(3)]
            for (q0, m0), (q, m) in runs:
                assert torch.equal(q, q0) and torch.equal(m, m0), (rows, n, gelu)
            assert all(torch.equal(x, y) for x, y in zip(inference.scale_rows_quantized(y.clone(), s, b, gelu),
                                                          both()[0]))


def test_int8_ffn_hands_its_second_layer_quantised_rows_with_the_same_result(monkeypatch):
    """In an int8 model the FFN's first layer gives its second QuantizedRows, quantised in the pass that
    rescaled them: the model's output is bit for bit what it is with the FFN's hidden rows handed on as
    floats and quantised by the second layer."""
    if "int8" not in inference.runs_here():
        pytest.skip("oneDNN's int8 matmul does not run here")
    net = inference.reduce_precision(randomize(roberta.RobertaModel(RobertaConfig(**CONFIG))), "int8",
                                     inference_only=True)
    layers = net.encoder_model.encoder.layer
    assert all(layer.intermediate.quantized_output for layer in layers)
    handed = []
    second = layers[0].output.dense.forward
    monkeypatch.setattr(layers[0].output.dense, "forward", lambda x: handed.append(x) or second(x))
    ids, mask = fixed_lengths([3, 60, 5, 41], left=False)
    with torch.inference_mode():
        fast = net(ids, mask).last_hidden_state
        (rows,) = handed
        assert isinstance(rows, inference.QuantizedRows) and rows.shape == (int(mask.sum()), CONFIG["intermediate_size"])
        assert rows.q.dtype == torch.uint8 and rows.m.shape == (int(mask.sum()), 1)
        for layer in layers:
            layer.intermediate.quantized_output = False
        apart = net(ids, mask).last_hidden_state
    assert torch.equal(fast, apart)


def each_isa_level(run):
    """{level: run()} at every instruction-set level of the C kernels this CPU has (AVX512, AVX2, DEFAULT),
    the level PyTorch's capability gives restored after."""
    results = {}
    try:
        for asked in ("AVX512", "AVX2", "DEFAULT"):
            level = inference._kernels.set_isa(asked)
            if level not in results:
                results[level] = run()
    finally:
        inference._kernels.set_isa(torch.backends.cpu.get_cpu_capability())
    return results


def require_c_kernels():
    if inference._kernels is None:
        assert os.environ.get("CI") != "true", "roberta._kernels was not built (setup.py)"
        pytest.skip("roberta._kernels is not built; inference uses the PyTorch arithmetic itself")


def test_add_norm_kernel_is_layer_norm_of_the_sum_with_the_same_bits_on_every_cpu():
    """The residual connection and LayerNorm in one pass (csrc/kernels.c) against PyTorch's in float64, at
    every instruction-set level and thread count, which must all give the same bits: the sums run over
    32 partial sums in a fixed order whatever the vector width."""
    require_c_kernels()
    eps32 = torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(3)
    for rows, n in [(37, 768), (5, 1024), (3, 50), (1, 1), (0, 768), (200, 64)]:
        y = torch.randn(rows, n, generator=g) * 3 + 100 * torch.rand(rows, 1, generator=g)  # means far from 0
        r = torch.randn(rows, n, generator=g)
        gamma, beta = torch.randn(n, generator=g), torch.randn(n, generator=g)

        def run(threads=2):
            out = y.clone()
            inference._kernels.add_norm(out.numpy(), r.numpy(), rows, n, gamma.numpy(), beta.numpy(), 1e-5, threads)
            return out
        outs = each_isa_level(run)
        first = next(iter(outs.values()))
        assert all(torch.equal(o, first) for o in outs.values()), list(outs)
        assert all(torch.equal(run(threads), first) for threads in (1, 3))
        if rows == 0:
            assert first.shape == (0, n)
            continue
        v = y.double() + r.double()
        exact = F.layer_norm(v, (n,), gamma.double(), beta.double(), 1e-5)
        # the sum v, the mean and the variance each over n terms in 32 partial sums: at most n / 32 + 32
        # roundings of their terms' size; then rsqrt and four roundings of the output. Relative to the
        # standard deviation (with LayerNorm's epsilon), the mean's error is the largest |v| over it
        std = (v.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        z = (v - v.mean(-1, keepdim=True)) / std
        bound = eps32 * ((n / 32 + 40) * gamma.double().abs() * (v.abs().amax(-1, keepdim=True) / std + z.abs())
                         + 4 * (z * gamma.double()).abs() + 4 * beta.double().abs())
        assert bool(((first.double() - exact).abs() <= bound).all())


def c_gelu(x: torch.Tensor, width: int, threads: int = 2) -> torch.Tensor:
    """GELU of float32 x through the C kernels: the int8 rescaling with scale 1 and bias 0 (exact: x * 1 + 0
    is x, but for -0, which becomes +0), then GELU in the same pass, on rows of `width`."""
    out = x.clone().view(-1, width)
    inference._kernels.scale_rows(out.numpy(), out.shape[0], width, torch.ones(out.shape[0], 1).numpy(),
                                  torch.zeros(width).numpy(), True, threads)
    return out.flatten()


def test_gelu_kernel_is_within_its_bound_of_the_exact_gelu():
    """GELU in C (csrc/kernels.c: erfc by Abramowitz and Stegun 7.1.26, absolute error under 1.5e-7),
    after the int8 rescaling in the same pass, against the exact function in float64 at every
    instruction-set level, with NaN and infinities; the AVX-512 and AVX2 levels give the same bits, and
    the fused pass the same bits as the two steps apart."""
    require_c_kernels()
    eps32 = torch.finfo(torch.float32).eps
    x = torch.cat([torch.linspace(-12, 12, 99_604), torch.randn(4096, generator=torch.Generator().manual_seed(4))])
    exact = F.gelu(x.double())
    # Phi's error is erf's over 2; then a few roundings of the result (3e-7 more at the baseline level, whose
    # steps round apart where the vector levels fuse them)
    bound = x.double().abs() * 1.5e-7 / 2 * 1.01 + 8 * eps32 * exact.abs() + 1e-30
    outs = each_isa_level(lambda: c_gelu(x, 61))  # rows whose ends fall inside a vector
    for level, out in outs.items():
        assert bool(((out.double() - exact).abs() <= bound).all()), (level, (out.double() - exact).abs().max())
    assert "AVX2" not in outs or "AVX512" not in outs or torch.equal(outs["AVX512"], outs["AVX2"])
    assert torch.equal(c_gelu(x, 61, threads=1), c_gelu(x, 61, threads=3))
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-30, -1e-30, 100.0, -100.0])
    for out in each_isa_level(lambda: c_gelu(specials, 8)).values():
        assert out[0].isnan() and out[1] == float("inf") and out[2].isnan()  # -inf x Phi(-inf) = -inf x 0
        assert out[3] == 0 and not out[3].signbit()
        assert torch.equal(out[4:7], specials[4:7] * torch.tensor([0.5, 0.5, 1.0]))
        assert -1e-37 < out[7] <= 0  # GELU(-100) is -100 Phi(-100), under float's range
    g = torch.Generator().manual_seed(5)
    for rows, n in [(9, 3072), (4, 33), (0, 8)]:
        y, s, b = torch.randn(rows, n, generator=g), torch.rand(rows, 1, generator=g) * 3, torch.randn(n, generator=g)
        fused = inference.scale_rows(y.clone(), s, b, gelu=True)
        apart = inference.scale_rows(y.clone(), s, b)
        assert torch.equal(fused, c_gelu(apart, n).view(rows, n))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_inference_closes_every_sublayer_through_the_add_norm_kernel(precision, monkeypatch):
    """A model in inference closes each of its 2 x layers sublayers through the C kernel's residual and
    LayerNorm, and gives what PyTorch's add and LayerNorm give, within float rounding (int8: the same
    quantised model both ways, within the quantisation of the next layer's inputs)."""
    require_c_kernels()
    if precision == "int8" and "int8" not in inference.runs_here():
        pytest.skip("oneDNN's int8 matmul does not run here")
    net = inference.reduce_precision(randomize(roberta.RobertaModel(RobertaConfig(**CONFIG))), precision,
                                     inference_only=True)
    ids, mask = fixed_lengths([3, 60, 5, 41], left=False)
    kernel, calls = model._add_norm_cpu, []
    monkeypatch.setattr(model, "_add_norm_cpu", lambda *args: calls.append(args[2]) or kernel(*args))
    with torch.inference_mode():
        fast = net(ids, mask).last_hidden_state
        assert calls == [int(mask.sum())] * (2 * CONFIG["num_hidden_layers"])  # rows: the real tokens
        monkeypatch.setattr(model, "_add_norm_cpu", None)
        plain = net(ids, mask).last_hidden_state
    real = mask.bool()
    bound = TOL if precision == "fp32" else 0.05  # int8: a rounding apart moves a value by one level of 127
    assert (fast[real] - plain[real]).abs().max().item() <= bound * max(1.0, plain[real].abs().max().item())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_c_kernels_run_on_pytorchs_openmp_runtime():
    """roberta._kernels is built with OpenMP so that its steps run on PyTorch's threads: the process must
    hold one OpenMP runtime, torch's, not a second one with threads of its own competing for the cores."""
    require_c_kernels()
    code = ("import json, roberta.model, roberta.inference, torch\n"
            "torch.ones(64, 64) @ torch.ones(64, 64)\n"
            "print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l or 'iomp' in l})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    runtimes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes  # one libgomp (torch's, wherever it lies) and no other OpenMP


def test_element_wise_kernels_refuse_inconsistent_sizes():
    require_c_kernels()
    k = inference._kernels
    y, r, v = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(8)
    k.add_norm(y.numpy(), r.numpy(), 4, 8, v.numpy(), v.numpy(), 1e-5, 2)
    k.scale_rows(y.numpy(), 4, 8, torch.ones(4, 1).numpy(), v.numpy(), True, 2)
    bad = [
        lambda: k.add_norm(y.numpy(), r[:3].numpy(), 4, 8, v.numpy(), v.numpy(), 1e-5, 2),  # too short a residual
        lambda: k.add_norm(y.numpy(), r.numpy(), 4, 8, v[:7].numpy(), v.numpy(), 1e-5, 2),  # gamma of 7
        lambda: k.add_norm(y.numpy(), r.numpy(), 4, 8, v.numpy(), v.numpy(), 1e-5, 0),  # no threads
        lambda: k.add_norm(y.numpy(), r.numpy(), 5, 8, v.numpy(), v.numpy(), 1e-5, 2),  # more rows than y holds
        lambda: k.add_norm(y.t().numpy(), r.numpy(), 4, 8, v.numpy(), v.numpy(), 1e-5, 2),  # not contiguous
        lambda: k.scale_rows(y.numpy(), 4, 9, torch.ones(4, 1).numpy(), v.numpy(), True, 2),  # rows of 9 in 32
        lambda: k.scale_rows(y.numpy(), 4, 8, torch.ones(4, 1).numpy(), v.numpy(), True, -1),  # threads
        lambda: k.scale_rows(y.numpy(), 4, 8, torch.zeros(3, 1).numpy(), v.numpy(), False, 2),  # 3 row scales
        lambda: k.scale_rows(y.numpy(), 4, 8, torch.ones(4, 1).numpy(), v.numpy(), True, 2,
                             torch.zeros(4, 7, dtype=torch.uint8).numpy(), torch.zeros(4).numpy()),  # q too small
        lambda: k.scale_rows(y.numpy(), 4, 8, torch.ones(4, 1).numpy(), v.numpy(), True, 2,
                             torch.zeros(4, 8, dtype=torch.uint8).numpy(), torch.zeros(3).numpy()),  # 3 row maxima
        lambda: k.quantize_rows(y.numpy(), 4, 8, torch.zeros(4, 8, dtype=torch.uint8).numpy(),
                                torch.zeros(4).numpy(), 0),  # no threads
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    with pytest.raises(TypeError):  # the quantised rows' two buffers come together or not at all
        k.scale_rows(y.numpy(), 4, 8, torch.ones(4, 1).numpy(), v.numpy(), True, 2,
                     torch.zeros(4, 8, dtype=torch.uint8).numpy())


@pytest.mark.skipif(not packed_bf16_available(), reason="needs a CPU with bf16 units (AMX or AVX-512 BF16)")
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_bf16_linear_equals_the_plain_bf16_linear(gelu):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    layer = PackedLinear(weight, bias, gelu=gelu)
    for shape in [(1, 64), (3, 11, 64), (200, 64)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        fast, plain = layer(x), layer.forward_reference(x)
        assert fast.shape == (*shape[:-1], 96) and fast.dtype == torch.bfloat16
        exact = torch.nn.functional.linear(x.float(), weight.bfloat16().float(), bias.bfloat16().float())
        exact = torch.nn.functional.gelu(exact) if gelu else exact
        # bf16 output: both within a few bf16 roundings of the float32 result on the same bf16 inputs
        scale = exact.abs().max().item()
        assert (fast.float() - exact).abs().max().item() <= 2 ** -7 * scale
        assert (fast.float() - plain.float()).abs().max().item() <= 2 ** -7 * scale


HEADS = [("RobertaModel", {}), ("RobertaForMaskedLM", {}), ("RobertaForSequenceClassification", {"num_labels": 3}),
         ("RobertaForTokenClassification", {"num_labels": 5}), ("RobertaForQuestionAnswering", {}),
         ("RobertaForMultipleChoice", {})]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("cls_name, overrides", HEADS)
def test_padding_free_path_equals_the_plain_padded_path(cls_name, overrides, left):
    """Every head's output, with padding on either side, from the fast layout and from `Padded`."""
    fast = randomize(getattr(roberta, cls_name)(RobertaConfig(**{**CONFIG, **overrides})))
    plain = copy.deepcopy(fast)
    plain.encoder_model.padding_free = False
    ids, mask = fixed_lengths([3, 60, 5, 41, 17, 60, 2], left=left)
    if cls_name == "RobertaForMultipleChoice":
        ids, mask = ids[:6].view(3, 2, -1), mask[:6].view(3, 2, -1)
    with torch.no_grad():
        a, b = fast(ids, mask), plain(ids, mask)
        qkv = torch.zeros(1, 3 * CONFIG["hidden_size"])
        attention = fast.encoder_model.encoder.layer[0].attention.self
        assert packed_attention_available(qkv, attention) == (model._attend_cpu is not None)  # the C kernel ran
    real = mask.bool()
    for field in ("last_hidden_state", "logits", "start_logits", "end_logits", "pooler_output"):
        x, y = getattr(a, field), getattr(b, field)
        if x is None:
            continue
        if x.shape[:2] == real.shape:  # per token: padding is not an output
            x, y = x[real], y[real]
        assert (x - y).abs().max().item() <= TOL * max(1.0, y.abs().max().item()), field


def sdpa_per_sequence(qkv, lengths, heads, dim, dtype=torch.float64):
    """The reference: PyTorch's attention on each sequence alone (in float64 unless told)."""
    out, start = [], 0
    for T in lengths:
        q, k, v = qkv[start:start + T].to(dtype).view(T, 3, heads, dim).permute(1, 2, 0, 3)  # each [h, T, d]
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(T, heads * dim))
        start += T
    return torch.cat(out).float()


def require_attention_kernel():
    if model._attend_cpu is None:
        assert os.environ.get("CI") != "true" or inference.cpu_flags().isdisjoint({"avx512f"}), \
            "roberta._kernels was not built (setup.py), or its attention does not run on this AVX-512 CPU"
        pytest.skip("the C attention kernel is not built or this CPU has no AVX-512; model uses PyTorch's attention")


def attention_error_bound(qkv, lengths, heads, dim):
    """How far float32 attention may be from the exact result, per output row and head, from the
    arithmetic: each score is a length-`dim` dot product (FMAs), off by at most gamma_dim times the sum of
    |q_c k_c| (times the 1/sqrt(dim) scale); e^(s - max) is then off by that twice (s and the max), the
    rounding of s - max and the kernel's exp (relative error under 2e-7, plus its few roundings). Weights
    off by a relative E move the weighted mean of v by at most 2E max|v|, and its two sums of T terms and
    the division add gamma_T twice and u."""
    u = 2.0 ** -24
    gamma = lambda n: n * u / (1 - n * u)
    bounds, start = [], 0
    for T in filter(None, lengths):  # empty sequences have no rows
        q, k, v = qkv[start:start + T].double().abs().view(T, 3, heads, dim).permute(1, 2, 0, 3)  # |.|, [h, T, d]
        magnitude = (q @ k.transpose(1, 2)) * dim ** -0.5  # [h, T, T]: scale * sum_c |q_c k_c|
        scores = magnitude.amax(-1, keepdim=True)  # [h, T, 1]: bounds |s| too
        E = 2 * gamma(dim + 1) * scores + 2 * u * 2 * scores + 2e-7 + 8 * u
        bound = v.amax(1, keepdim=True) * (2 * E + 2 * gamma(T) + u)  # [h, T, d]
        bounds.append(bound.transpose(0, 1).reshape(T, heads * dim))
        start += T
    return torch.cat(bounds).float() if bounds else torch.zeros(0, heads * dim)


@pytest.mark.parametrize("lengths, heads, dim", [
    ([25, 3, 1, 40], 12, 64),  # short sentences, as most served inputs are
    ([512, 7], 4, 64),  # the longest input next to a short one
    ([0, 5, 0, 16, 17], 2, 16),  # empty sequences, lengths at a vector's edge
    ([33] * 5, 3, 32),
    ([3, 100], 2, 80),  # a head wider than one block of 64 columns
    ([9], 1, 128),
])
def test_cpu_packed_attention_kernel_equals_sdpa(lengths, heads, dim):
    require_attention_kernel()
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":  # run by the test below: the AVX2 variant is what runs
        assert model._kernels.set_isa(torch.backends.cpu.get_cpu_capability()) == "AVX2"
    g = torch.Generator().manual_seed(sum(lengths) + dim)
    tokens = sum(lengths)
    qkv = torch.randn(tokens, 3 * heads * dim, generator=g) * 2
    cu = torch.tensor([0] + lengths).cumsum(0)
    expected = sdpa_per_sequence(qkv, lengths, heads, dim)
    bound = attention_error_bound(qkv, lengths, heads, dim)
    for threads in (1, 2, 3):
        out = torch.full((tokens, heads * dim), float("nan"))
        model._attend_cpu(qkv.numpy(), tokens, cu.numpy(), len(lengths), heads, dim, out.numpy(), threads)
        assert bool(((out - expected).abs() <= bound).all()) if tokens else out.numel() == 0


def test_avx2_attention_kernel_equals_sdpa_under_an_avx2_cap(tmp_path):
    """The AVX2 variant of the attention kernel: the test above, run where PyTorch and this project may
    use AVX2 at most."""
    require_attention_kernel()
    done = run_capped(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
                       str(Path(__file__)), "-k", "test_cpu_packed_attention_kernel_equals_sdpa"], tmp_path)
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_cpu_packed_attention_kernel_refuses_inconsistent_sizes():
    require_attention_kernel()
    qkv, out, cu = torch.zeros(10, 3 * 32), torch.zeros(10, 32), torch.tensor([0, 4, 10])
    assert model._attend_cpu(qkv.numpy(), 10, cu.numpy(), 2, 2, 16, out.numpy(), 2) is None
    bad = [
        (qkv.numpy(), 11, cu.numpy(), 2, 2, 16, out.numpy(), 2),  # more tokens than qkv holds
        (qkv.numpy(), 10, torch.tensor([0, 6, 4]).numpy(), 2, 2, 16, out.numpy(), 2),  # lengths going down
        (qkv.numpy(), 10, torch.tensor([0, 4, 9]).numpy(), 2, 2, 16, out.numpy(), 2),  # not ending at the tokens
        (qkv.numpy(), 10, torch.tensor([1, 4, 10]).numpy(), 2, 2, 16, out.numpy(), 2),  # not starting at 0
        (qkv.numpy(), 10, cu.int().numpy(), 2, 2, 16, out.numpy(), 2),  # int32 lengths
        (qkv.numpy(), 10, cu.numpy(), 2, 2, 16, out[:9].numpy(), 2),  # too small an output
        (qkv.numpy(), 10, cu.numpy(), 2, 4, 8, out.numpy(), 2),  # heads of 8: not a multiple of 16
        (qkv.numpy(), 10, cu.numpy(), 2, 2, 16, out.numpy(), 0),  # no threads
        (qkv.numpy(), 10, cu.numpy(), 2, 2, 16, torch.zeros(10, 32).t().numpy(), 2),  # not contiguous
    ]
    for args in bad:
        with pytest.raises(ValueError):
            model._attend_cpu(*args)


class _DeviceQuestions(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operations that make a GPU stop and tell the host something: reading a value
    (item, bool, int, tolist all read through _local_scalar_dense) or making a shape from data."""

    ASKING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.asked = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]  # "nonzero.default" -> "nonzero"
        if name in self.ASKING:
            self.asked.append(name)
        return func(*args, **(kwargs or {}))


def test_forward_with_host_metadata_asks_the_device_nothing():
    """With the `Unpadded` built on the host, the forward pass reads no value and makes no shape from
    the data, so on a GPU it never synchronises; checked on the CPU through the same code."""
    from roberta.model import Unpadded

    model = randomize(roberta.RobertaModel(RobertaConfig(**CONFIG)))
    ids, mask = fixed_lengths([3, 60, 5, 41, 17, 0, 2], left=True)
    layout = Unpadded(mask, ids.device)
    with torch.no_grad():
        reference = model(ids, mask).last_hidden_state
        with _DeviceQuestions() as questions:
            model.check_inputs = lambda ids: None  # the id range check reads values only on the CPU
            out = model(ids, mask, layout=layout).last_hidden_state
            features, _ = model.forward_unpadded(ids, layout=layout)
    assert questions.asked == []
    assert torch.equal(out, reference) and torch.equal(features, reference[mask.bool()])
    with _DeviceQuestions() as questions:  # the recorder does see them: building the metadata asks
        Unpadded(mask)
    assert "nonzero" in questions.asked and "_local_scalar_dense" in questions.asked


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("cls_name, overrides", HEADS)
def test_every_head_runs_on_a_host_built_layout_and_asks_the_device_nothing(cls_name, overrides, left,
                                                                           padding_free, monkeypatch):
    """A layout made on the host when the batch is built, as the hub makes it, gives every head (and the
    named heads' `classify`) what it gives without one, with padding on either side, in both layouts;
    and with it the forward pass reads no value and makes no shape from the data (a GPU never waits)."""
    from roberta.model import ModelOutput

    heads = {"extra": 4} if cls_name in ("RobertaForMaskedLM", "RobertaForSequenceClassification") else {}
    model = randomize(getattr(roberta, cls_name)(RobertaConfig(**{**CONFIG, **overrides}, classification_heads=heads)))
    encoder = model.encoder_model
    encoder.padding_free = padding_free
    ids, mask = fixed_lengths([3, 60, 5, 41, 17, 2], left=left)
    layout = encoder.layout(mask, "cpu")  # [batch * choices, length] for multiple choice
    if cls_name == "RobertaForMultipleChoice":
        ids, mask = ids.view(3, 2, -1), mask.view(3, 2, -1)
    with torch.no_grad():
        expected = model(ids, mask, output_hidden_states=True)
        named = model.classify(ids, mask, head="extra") if heads else None
        monkeypatch.setattr(encoder, "check_inputs", lambda ids: None)  # the id range check reads ids on the CPU
        with _DeviceQuestions() as questions:
            got = model(ids, output_hidden_states=True, layout=layout)
            named_got = model.classify(ids, head="extra", layout=layout) if heads else None
    assert questions.asked == []
    compared = 0
    for field in dataclasses.fields(ModelOutput):
        a, b = getattr(got, field.name), getattr(expected, field.name)
        assert (a is None) == (b is None), field.name
        for x, y in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))) if a is not None else ():
            assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-6, field.name
            compared += 1
    assert compared >= 3  # the layers' states and the head's output at least
    if heads:
        assert named_got.shape == (6, 4) and (named_got - named).abs().max().item() <= 1e-6
    if cls_name == "RobertaForMaskedLM":  # the training path: the LM head only at the labels
        chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3
        labels = torch.where(chosen & mask.bool(), ids, -100)
        with torch.no_grad():
            a, b = model(ids, labels=labels, layout=layout), model(ids, mask, labels=labels)
        assert a.logits.shape == b.logits.shape and (a.logits - b.logits).abs().max().item() <= 1e-6
        assert abs(a.loss.item() - b.loss.item()) <= 1e-6


def test_hub_runs_in_the_precision_auto_picks_and_refuses_to_train_or_save_it(hub_checkpoints, tmp_path):
    exact = roberta.load(hub_checkpoints["hf"], precision="fp32")
    fast = roberta.load(hub_checkpoints["hf"], precision="int8")
    assert (exact.precision, fast.precision) == ("fp32", "int8")
    tokens = exact.encode("Hello world! A sentence of a few words.")
    assert cosine(fast.extract_features(tokens), exact.extract_features(tokens)) > 0.99
    with pytest.raises(roberta.RobertaError, match="precision='fp32'"):
        fast.train()
    with pytest.raises(roberta.RobertaError, match="precision='fp32'"):
        fast.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    auto = roberta.load(hub_checkpoints["hf"], precision="auto")
    assert (auto.precision, auto.precision_reason) == resolve_precision("auto", "cpu")


def test_masked_lm_training_step_matches_transformers(tmp_path):
    """Loss and every gradient (the tied decoder included) equal transformers' full-vocabulary step."""
    ours, theirs = pair("RobertaForMaskedLM", tmp_path)
    ours.train(), theirs.train()  # dropout probabilities are 0: train mode, deterministic
    ids, mask = pad_batch(random_sequences(6, seed=3, lo=5, hi=30), pad_id=1)
    g = torch.Generator().manual_seed(4)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.2) & mask.bool(), ids, -100)
    assert_same_training_step(ours, theirs, ids, mask, labels)


def fixed_lengths(lengths, seed=0, vocab=300, left=False):
    """A padded batch with these sequence lengths (0: a row of padding only)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.ones(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(T - n, T) if left else slice(0, n)
        ids[row, cols] = torch.randint(4, vocab, (n,), generator=g)
        mask[row, cols] = 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_batch_of_very_different_lengths_matches_transformers(tmp_path, left):
    """Attention runs per length group (here 4 groups and an empty row): still transformers' numbers."""
    ours, theirs = pair("RobertaModel", tmp_path)
    ids, mask = fixed_lengths([3, 60, 5, 0, 41, 17, 60, 2], left=left)
    with torch.no_grad():
        a = ours(ids, mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= TOL
    assert a[~real].abs().max().item() == 0.0  # padding is never computed


def test_classification_training_step_on_padded_batch_matches_transformers(tmp_path):
    ours, theirs = pair("RobertaForSequenceClassification", tmp_path, num_labels=3)
    ours.train(), theirs.train()
    ids, mask = fixed_lengths([3, 37, 8, 21, 60], seed=5)  # three length groups in one batch
    labels = torch.tensor([0, 2, 1, 1, 0])
    assert_same_training_step(ours, theirs, ids, mask, labels)


def test_fast_cpu_dropout_keeps_one_minus_p_and_scales_like_torch():
    from roberta.model import dropout

    torch.manual_seed(0)
    x = torch.randn(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y.ne(0)
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1e6 draws: the standard error is 3e-4
    assert torch.allclose(y[kept], x[kept] / 0.9)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / 0.9)  # the gradient flows only where the value was kept
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    assert dropout(x, 1.0, True).count_nonzero() == 0
    torch.manual_seed(5)  # drawn from torch's generator: seeding repeats the mask
    first = dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.3, True), first)


def test_attention_dropout_in_training_matches_sdpa_without_dropout(tmp_path):
    # The CPU training path computes attention itself (to use the faster dropout); with dropout 0 the
    # attention must equal SDPA's, so check that path by setting p to 0 only after taking it.
    from roberta.model import RobertaSelfAttention

    attention = RobertaSelfAttention(RobertaConfig(**CONFIG)).train()
    qkv = torch.randn(3, 9, 3 * CONFIG["hidden_size"])
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    torch.manual_seed(0)
    attention.dropout_p = 1e-12  # the manual path, dropping (almost surely) nothing
    manual = attention.attention(qkv, mask)
    attention.eval()
    assert torch.allclose(manual, attention.attention(qkv, mask), atol=1e-6)



@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_a_reduced_precision_hub_is_not_moved_or_cast_away_from_its_prepared_weights(hub_checkpoints, precision):
    hub = roberta.load(hub_checkpoints["hf"], precision=precision)
    expected = hub.extract_features(hub.encode("Hello world!"))
    for args in (("cuda",), ("meta",), (torch.float16,), ("cpu", torch.float32 if precision == "bf16" else torch.bfloat16)):
        with pytest.raises(roberta.RobertaError, match="load it where it should run"):
            hub.to(*args)
    assert hub.to("cpu") is hub and hub.to(torch.device("cpu")) is hub  # where it is already: nothing to do
    assert torch.equal(hub.extract_features(hub.encode("Hello world!")), expected)
    exact = roberta.load(hub_checkpoints["hf"], precision="fp32")
    assert exact.to("cpu", torch.float32) is exact  # fp32 hubs move as any module


FAULTS_SCRIPT = """
import resource, sys, torch
from roberta import RobertaConfig, RobertaModel
from roberta.inference import keep_freed_memory, pad_batch
torch.set_num_threads(1)
model = RobertaModel(RobertaConfig.base(num_hidden_layers=2, vocab_size=1000), add_pooling_layer=False).eval()
assert keep_freed_memory()
ids, mask = pad_batch([[0] + [5] * 23 + [2]] * 32, 1)  # 800 tokens: FFN activations of 9.4 MiB
faults = []
with torch.inference_mode():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(ids, mask)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[0], sum(faults[2:]))  # the first pass, and ten warm ones together
"""


def test_inference_keeps_freed_memory_so_warm_batches_do_not_page_fault():
    """The first pass faults in the pages its activations need; with `keep_freed_memory` (which
    `reduce_precision` calls) glibc keeps them for the next batch instead of handing them back (blocks
    under its 32 MiB mmap threshold, freed memory under 256 MiB kept), so ten warm passes of the same
    batch together fault in fewer pages than the first did alone: only where the heap grows past its
    earlier top. (glibc's own default sometimes keeps them too, through its dynamic threshold, and
    sometimes faults every pass: measured 58-72 thousand faults over ten passes; that is not asserted.)"""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory tunes glibc's malloc; this libc is not glibc")
    first, warm = map(int, subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True,
                                          check=True, timeout=120).stdout.split())
    assert warm < first, (first, warm)


PAGES_SCRIPT = """
import sys, torch
from roberta import RobertaConfig, RobertaModel, kernels
from roberta.inference import reduce_precision
way = sys.argv[2]
packed = way != "plain"  # int8 replaces every encoder weight, as reordering them all does
# as a machine where laying the weights out once for oneDNN or MKL measured faster, or slower
kernels.packing = lambda shapes: {"packed": kernels.PACKED, "mkl-packed": kernels.MKL_PACKED}.get(way)
RobertaModel(RobertaConfig.base(num_hidden_layers=2, vocab_size=1000), add_pooling_layer=False).save_pretrained(sys.argv[1])
model = RobertaModel.from_pretrained(sys.argv[1]).eval()

def total():  # kB of this process's resident memory
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])

def resident():  # kB of the weight file's mapping in this process's memory
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.endswith("/model.safetensors"):
            return int(next(l for l in lines[i + 1:] if l.startswith("Rss:")).split()[1])
    raise SystemExit("model.safetensors is not mapped")

ids = torch.randint(3, 1000, (4, 30))
with torch.inference_mode():
    before_out = model(ids, torch.ones_like(ids)).last_hidden_state
held = model.encoder.layer[0].attention.self.query.weight  # a weight someone still holds
copy = held.detach().clone()
before, before_total = resident(), total()
replaced = sum(p.numel() * 4 for layer in model.encoder.layer for name, p in layer.named_parameters()
               if "self." in name or (packed and "dense" in name))
model = reduce_precision(model, "int8" if way == "int8" else "fp32", inference_only=True)
after, after_total = resident(), total()
with torch.inference_mode():
    after_out = model(ids, torch.ones_like(ids)).last_hidden_state
cosine = torch.nn.functional.cosine_similarity(after_out, before_out, dim=-1).min().item()
print(before - after, replaced // 1024, torch.equal(held, copy), (after_out - before_out).abs().max().item(), cosine,
      before_total - after_total)
"""


@pytest.mark.parametrize("way", ["packed", "mkl-packed", "plain", "int8"])
def test_an_inference_only_model_hands_back_the_pages_of_the_weights_it_replaced(tmp_path, way):
    """A model read from safetensors keeps the file mapped; the weights `reduce_precision(...,
    inference_only=True)` replaces (q, k and v by their concatenation; ones laid out once for oneDNN or
    MKL where that measured faster; every one in int8) leave that mapping's resident memory, less at most one page at
    each end of each tensor, while a tensor still held elsewhere reads the same values and the outputs
    stay within float rounding (the plain path's own tolerance; int8 within its cosine). In int8 the
    float32 weights go and one int8 copy comes (oneDNN's packed one), a quarter of their size, so the
    process should shrink by three quarters of what was replaced; at least a quarter is asserted: how
    much of the heap glibc hands back varies from run to run and with the thread count (measured 0.52
    to 2.07 of what was replaced; `test_int8_kernel_equals_the_plain_integer_arithmetic` checks the
    single copy itself). Before the pages were handed back and the quantising temporaries trimmed
    from the heap, it grew by about as much as was replaced."""
    import subprocess
    import sys

    from roberta import kernels

    if not sys.platform.startswith("linux"):
        pytest.skip("release_pages advises Linux's kernel (madvise MADV_PAGEOUT)")
    from roberta.inference import int8_kernels_available, release_pages

    assert release_pages([torch.randn(1 << 20)]) == 0  # memory of no file: freed with its tensor, never swapped first
    if way == "packed" and not kernels.packed_available():
        pytest.skip("this PyTorch build's oneDNN does not run reordered float32 weights")
    if way == "mkl-packed" and not kernels.mkl_packed_available():
        pytest.skip("this PyTorch build does not export MKL's packed sgemm")
    if way == "int8" and not int8_kernels_available():
        pytest.skip("this PyTorch build lacks oneDNN's int8 kernels")
    done = subprocess.run([sys.executable, "-c", PAGES_SCRIPT, str(tmp_path / "m"), way], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    dropped, replaced, intact, diff, cosine, shrunk = done.stdout.split()
    tensors = 2 * (6 + (4 if way != "plain" else 0))  # per layer: q, k, v weights and biases (+ the dense ones)
    assert int(dropped) >= int(replaced) - tensors * 2 * 4, (dropped, replaced)
    assert intact == "True"
    if way == "int8":
        assert float(cosine) >= 0.99 and int(shrunk) >= int(replaced) // 4, (cosine, shrunk, replaced)
    else:
        assert float(diff) <= 1e-5

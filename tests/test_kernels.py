"""The float32 GEMM chosen by measurement: made, cached, measured again when the cache cannot be trusted,
switched off on request, and every candidate within float rounding of the plain path for every head."""
import copy
import os
import json

import pytest
import torch
import torch.nn.functional as F

import roberta
from roberta import RobertaConfig, kernels

from test_model import randomize
from test_speed_paths import CONFIG, HEADS, attention_error_bound, fixed_lengths, sdpa_per_sequence


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory and no decisions held by this process."""
    monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_records", {})
    monkeypatch.setattr(kernels, "_mode", None)
    monkeypatch.setattr(kernels, "_remeasured", set())
    return tmp_path / kernels.CACHE_FILE


@pytest.fixture
def measured(monkeypatch):
    """The shapes measured, in order (the real measurement runs)."""
    shapes = []
    real = kernels.measure_fp32
    monkeypatch.setattr(kernels, "measure_fp32", lambda *shape: shapes.append(shape) or real(*shape))
    return shapes


def entry(path):
    data = json.loads(path.read_text())
    assert data["format"] == kernels.FORMAT
    m = kernels.machine()
    return data["entries"][f"{m['cpu']} | {m['isa']} | MKL by {m['mkl_paths']} | {m['threads']} threads | torch {m['torch']}"]


def test_the_choice_is_measured_once_and_cached(cache, measured, monkeypatch):
    assert kernels.fp32_choice(800, 96, 64) in kernels.available_fp32()
    record = entry(cache)["fp32"]["96x64"]
    assert entry(cache)["machine"] == kernels.machine()
    for name, tokens in (("small", kernels.SMALL_TOKENS), ("large", kernels.LARGE_TOKENS)):
        r = record[name]
        assert r["tokens"] == tokens and set(r["gflops"]) == set(kernels.candidates(torch.ones(2, 2), None))
        plain = {k: v for k, v in r["gflops"].items() if k in kernels.available_fp32()}
        assert all(v > 0 for v in r["gflops"].values()) and r["winner"] == max(plain, key=plain.get)
    assert kernels.fp32_choice(800, 96, 64) == record["large"]["winner"]
    assert kernels.fp32_choice(5, 96, 64) == record["small"]["winner"]
    monkeypatch.setattr(kernels, "_records", {})  # another process on this machine: reads the cache
    assert kernels.fp32_choice(800, 96, 64) == record["large"]["winner"]
    assert measured == [(96, 64)]
    kernels.fp32_choice(800, 32, 64)  # another shape: measured and added beside the first
    assert measured == [(96, 64), (32, 64)] and set(entry(cache)["fp32"]) == {"96x64", "32x64"}
    rows = kernels.report([(96, 64), (32, 64)])  # what `roberta info --device` shows: from the cache
    packing = [r for r in rows if r.get("inference_only")]
    rows = [r for r in rows if not r.get("inference_only")]
    assert [(r["shape"], r["kernel"]) for r in packing] == ([("96x64, 32x64", kernels.packing([(96, 64), (32, 64)])
                                                              or "plain weights")] if kernels.available_packed() else [])
    assert [(r["shape"], r["tokens"], r["kernel"]) for r in rows] == [
        (s, entry(cache)["fp32"][s][c]["tokens"], entry(cache)["fp32"][s][c]["winner"])
        for s in ("96x64", "32x64") for c in ("small", "large")]
    assert measured == [(96, 64), (32, 64)] and all(kernels.describe(r).startswith("fp32") for r in rows)


def test_remeasure_times_again_once_and_replaces_the_cached_choice(cache, measured, monkeypatch):
    kernels.fp32_choice(800, 96, 64)
    old = entry(cache)["fp32"]["96x64"]
    monkeypatch.setenv(kernels.ENV, "remeasure")  # in another process, which has measured nothing yet
    monkeypatch.setattr(kernels, "_records", {})
    monkeypatch.setattr(kernels, "_remeasured", set())
    kernels.fp32_choice(800, 96, 64)
    monkeypatch.setattr(kernels, "_records", {})
    kernels.fp32_choice(800, 96, 64)  # once per process: the fresh record is used from then on
    assert measured == [(96, 64), (96, 64)]
    new = entry(cache)["fp32"]["96x64"]
    assert new["large"]["gflops"] != old["large"]["gflops"]  # timings never repeat to the last bit


@pytest.mark.parametrize("damage", ["not json {", "[]", "truncated", "foreign machine", "unknown kernel",
                                    "a candidate missing", "other format"])
def test_a_damaged_or_foreign_cache_entry_is_measured_again(cache, measured, monkeypatch, damage):
    kernels.fp32_choice(800, 96, 64)
    text = cache.read_text()
    data = json.loads(text)
    key = next(iter(data["entries"]))
    if damage == "not json {":
        text = damage
    elif damage == "[]":
        text = "[]"
    elif damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "foreign machine":  # copied from another machine under this one's key
        data["entries"][key]["machine"]["cpu"] = "Another CPU"
        text = json.dumps(data)
    elif damage == "unknown kernel":
        data["entries"][key]["fp32"]["96x64"]["large"]["winner"] = "rm -rf"
        text = json.dumps(data)
    elif damage == "a candidate missing":  # as written by a release with fewer candidates
        del data["entries"][key]["fp32"]["96x64"]["small"]["gflops"]["mkl"]
        text = json.dumps(data)
    else:
        data["format"] = kernels.FORMAT + 1
        text = json.dumps(data)
    cache.write_text(text)
    monkeypatch.setattr(kernels, "_records", {})
    assert kernels.fp32_choice(800, 96, 64) in kernels.available_fp32()
    assert measured == [(96, 64), (96, 64)]
    assert entry(cache)["fp32"]["96x64"]["large"]["winner"] in kernels.available_fp32()  # repaired


def test_measurement_can_be_turned_off(cache, measured, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(50, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for switch in ("env", "use"):
        if switch == "env":
            monkeypatch.setenv(kernels.ENV, "default")
        else:
            monkeypatch.delenv(kernels.ENV)
            kernels.use("default")
        with torch.inference_mode():
            assert torch.equal(kernels.linear(x, w, b), F.linear(x, w, b))
        assert measured == [] and not cache.exists()
    kernels.use(None)
    with pytest.raises(roberta.RobertaError, match="kernels"):
        kernels.use("fastest")
    monkeypatch.setenv(kernels.ENV, "fastest")
    with pytest.raises(roberta.RobertaError, match=kernels.ENV):
        kernels.mode()


def test_training_and_other_dtypes_stay_on_f_linear(cache, measured):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 64, generator=g), torch.randn(96, 64, generator=g, requires_grad=True)
    y = kernels.linear(x, w, None)  # autograd: the plain path, with its backward
    y.sum().backward()
    assert torch.equal(y, F.linear(x, w)) and w.grad is not None
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x.double(), w.double(), None), F.linear(x.double(), w.double()))
    assert measured == []


@pytest.mark.parametrize("kernel", kernels.available_fp32())
@pytest.mark.parametrize("cls_name, overrides", HEADS)
def test_every_candidate_gives_every_head_within_1e_5_of_the_plain_path(cache, monkeypatch, kernel, cls_name,
                                                                        overrides):
    model = randomize(getattr(roberta, cls_name)(RobertaConfig(**{**CONFIG, **overrides}))).eval()
    ids, mask = fixed_lengths([3, 60, 5, 41, 17, 60, 2])
    if cls_name == "RobertaForMultipleChoice":
        ids, mask = ids[:6].view(3, 2, -1), mask[:6].view(3, 2, -1)
    chosen = []
    monkeypatch.setattr(kernels, "fp32_choice", lambda *shape: chosen.append(shape) or kernel)
    with torch.inference_mode():
        fast = model(ids, mask)
        kernels.use("default")
        plain = model(ids, mask)
        kernels.use(None)
    assert chosen  # the dense layers went through the choice
    for field in ("last_hidden_state", "logits", "start_logits", "end_logits", "pooler_output"):
        x, y = getattr(fast, field, None), getattr(plain, field, None)
        if x is not None:
            assert (x - y).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item()), field


def measured_faster(cache, shapes, winner: str | None, factor: float = 10.0):
    """This machine's records of `shapes` (measured for real), with the packed candidates' speeds then
    written `factor` times the plain winner's for `winner` and a tenth of it for the others: a cache as a
    machine where that packed candidate wins (None: where packing loses)."""
    for out_features, in_features in shapes:
        kernels.fp32_record(out_features, in_features)
    data = json.loads(cache.read_text())
    key = next(iter(data["entries"]))
    for name in (f"{o}x{i}" for o, i in shapes):
        for r in data["entries"][key]["fp32"][name].values():
            for kernel in kernels.available_packed():
                r["gflops"][kernel] = r["gflops"][r["winner"]] * (factor if kernel == winner else 0.1)
    cache.write_text(json.dumps(data))
    kernels._records.clear()


def packed_kernel(name):
    """`name` as a test parameter, skipped where this process does not run it."""
    reasons = {kernels.PACKED: "this PyTorch build's oneDNN does not run reordered float32 weights",
               kernels.MKL_PACKED: "this PyTorch build does not export MKL's packed sgemm"}
    return pytest.param(name, marks=pytest.mark.skipif(name not in kernels.available_packed(), reason=reasons[name]))


PACKED_KERNELS = [packed_kernel(kernels.PACKED), packed_kernel(kernels.MKL_PACKED)]
needs_packing = pytest.mark.skipif(kernels.PACKED not in kernels.available_packed(),
                                   reason="this PyTorch build's oneDNN does not run reordered float32 weights")


@pytest.mark.parametrize("winner", [*PACKED_KERNELS, None])
def test_an_inference_only_fp32_model_packs_its_encoder_where_that_measured_faster(cache, winner):
    from roberta.inference import PackedLinear, PlainLinear, prepared, reduce_precision

    config = RobertaConfig(**CONFIG)
    model = randomize(roberta.RobertaModel(config)).eval()
    measured_faster(cache, kernels.encoder_shapes(config.hidden_size, config.intermediate_size), winner)
    assert kernels.packing(kernels.encoder_shapes(config.hidden_size, config.intermediate_size)) == winner
    packed_faster = winner is not None
    trainable = reduce_precision(copy.deepcopy(model), "fp32")  # not inference-only: kept as it is
    assert not prepared(trainable) and trainable.encoder.layer[0].attention.self.query.weight.requires_grad
    kernels.use("default")  # the reproducible mode never packs, but still concatenates q, k and v once
    plain = reduce_precision(copy.deepcopy(model), "fp32", inference_only=True)
    assert {type(m) for m in plain.modules()} & {PackedLinear, PlainLinear} == {PlainLinear}
    kernels.use(None)
    fast = reduce_precision(model, "fp32", inference_only=True)
    assert prepared(fast) and any(isinstance(m, PackedLinear) for m in fast.modules()) is packed_faster
    assert not hasattr(fast.encoder.layer[0].attention.self, "query")
    if packed_faster:
        layer = fast.encoder.layer[0]
        assert isinstance(layer.attention.self.qkv, PackedLinear) and layer.intermediate.gelu
        assert layer.intermediate.bias.dtype == torch.float32 and f"fp32 {winner} + GELU" in repr(layer.intermediate)
        assert {m.kernel for m in fast.modules() if isinstance(m, PackedLinear)} == {winner}
    rows = kernels.report(kernels.encoder_shapes(config.hidden_size, config.intermediate_size))
    if kernels.available_packed():
        assert [r["kernel"] for r in rows if r.get("inference_only")] == [winner or "plain weights"]


@pytest.mark.parametrize("winner", PACKED_KERNELS)
@pytest.mark.parametrize("packed_wins", [True, False])
def test_an_inference_only_fp32_model_holds_every_weight_the_way_fastest_over_all_its_shapes(cache, winner,
                                                                                            packed_wins):
    """One way for all (libraries alternating within a pass cost more than the shapes' own timings
    differed by): packed where that is faster summed over the shapes, though slower on some of them."""
    from roberta.inference import PackedLinear, PlainLinear, reduce_precision

    config = RobertaConfig(**CONFIG)
    model = randomize(roberta.RobertaForMaskedLM(config)).eval()
    h, f = config.hidden_size, config.intermediate_size
    big, small = [(3 * h, h), (f, h), (h, f)], [(h, h)]  # 11 of a layer's 12 units of work, and 1
    measured_faster(cache, big, winner, 2.0 if packed_wins else 0.5)
    measured_faster(cache, small, winner, 0.5 if packed_wins else 2.0)
    assert kernels.packing(big + small) == (winner if packed_wins else None)
    ids, mask = fixed_lengths([3, 60, 5, 41])
    with torch.inference_mode():
        kernels.use("default")
        plain = model(ids, mask).logits
        kernels.use(None)
        fast = reduce_precision(model, "fp32", inference_only=True)
        held = [m for layer in fast.roberta.encoder.layer for m in (
            layer.attention.self.qkv, layer.attention.output.dense, layer.intermediate, layer.output.dense)]
        if packed_wins:
            assert all(isinstance(m, PackedLinear) and m.kernel == winner for m in held)
        else:
            assert all(isinstance(m, PlainLinear) for m in held)
        assert (fast(ids, mask).logits - plain).abs().max().item() <= 1e-5 * max(1.0, plain.abs().max().item())


@pytest.mark.parametrize("winner, fused", [
    pytest.param(*packed_kernel(kernels.PACKED).values, True, marks=packed_kernel(kernels.PACKED).marks,
                 id="onednn-packed-gelu-in-epilogue"),
    pytest.param(*packed_kernel(kernels.PACKED).values, False, marks=packed_kernel(kernels.PACKED).marks,
                 id="onednn-packed-gelu-after"),
    pytest.param(*packed_kernel(kernels.MKL_PACKED).values, False, marks=packed_kernel(kernels.MKL_PACKED).marks,
                 id="mkl-packed-gelu-after")])
@pytest.mark.parametrize("cls_name, overrides", HEADS)
def test_a_packed_inference_only_model_gives_every_head_within_1e_5_of_the_plain_path(cache, monkeypatch, cls_name,
                                                                                     overrides, winner, fused):
    from roberta.inference import prepared, reduce_precision

    config = RobertaConfig(**{**CONFIG, **overrides})
    model = randomize(getattr(roberta, cls_name)(config)).eval()
    measured_faster(cache, kernels.encoder_shapes(config.hidden_size, config.intermediate_size), winner)
    monkeypatch.setattr(kernels, "fuse_gelu", lambda *shape: fused)  # as a machine where that way measured faster
    ids, mask = fixed_lengths([3, 60, 5, 41, 17, 60, 2])
    if cls_name == "RobertaForMultipleChoice":
        ids, mask = ids[:6].view(3, 2, -1), mask[:6].view(3, 2, -1)
    with torch.inference_mode():
        kernels.use("default")
        plain = model(ids, mask)
        kernels.use(None)
        fast = reduce_precision(model, "fp32", inference_only=True)
        assert prepared(fast) and all(layer.intermediate.fused is fused for layer in fast.encoder_model.encoder.layer)
        packed = fast(ids, mask)
    for field in ("last_hidden_state", "logits", "start_logits", "end_logits", "pooler_output"):
        x, y = getattr(packed, field, None), getattr(plain, field, None)
        if x is not None:
            assert (x - y).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item()), field


needs_mkl_packed = pytest.mark.skipif(kernels.MKL_PACKED not in kernels.available_packed(),
                                      reason="this PyTorch build does not export MKL's packed sgemm")


def float_bound(x, w):
    """What float32 sums of products may differ by between two summation orders: (K + 2) unit roundoffs
    of the sum of the magnitudes, per output (the bias added once more)."""
    return (x.abs().double() @ w.abs().double().t()) * (x.shape[-1] + 2) * 2 ** -24


@needs_mkl_packed
@pytest.mark.parametrize("rows", [1, 3, 31, kernels.PACK_ROWS - 1, kernels.PACK_ROWS + 1, 1200])
def test_mkl_packed_weights_multiply_any_row_count_as_f_linear_does(rows):
    """MKL's layout is packed for PACK_ROWS rows; every row count multiplies by it, within float32
    rounding of the exact product, bias or not, and GELU after it within the same (GELU's slope is at
    most 1.13) plus the C GELU's own error (5e-7 of the exact function; 1e-6 allowed)."""
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(96, 80, generator=g), torch.randn(96, generator=g), torch.randn(rows, 80, generator=g)
    packed = kernels.MklPacked(w)
    exact = x.double() @ w.double().t()
    for bias in (b, None):
        y = packed.linear(x, bias)
        want = exact + (bias.double() if bias is not None else 0)
        bound = float_bound(x, w) + want.abs() * 2 ** -24
        assert y.shape == (rows, 96) and y.dtype == torch.float32
        assert ((y.double() - want).abs() <= bound).all()
        gelu = kernels.packed_linear(x, packed, bias, True, True)  # no epilogue here: GELU after, with the bias
        assert ((gelu.double() - F.gelu(want)).abs() <= 1.13 * bound + 1e-6).all()
        if bias is None:
            assert torch.equal(gelu, F.gelu(y))  # PyTorch's GELU pass over the product


@needs_mkl_packed
def test_mkl_packed_weights_give_the_weight_back_exactly_and_copy_as_it():
    import pickle

    w = torch.randn(40, 24)
    w[0, :3] = torch.tensor([0.0, 1e-38, -3.4e38])  # a zero, a subnormal, nearly the largest magnitude
    packed = kernels.MklPacked(w)
    assert torch.equal(packed.to_dense(), w)
    x = torch.randn(7, 24)
    for copied in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert copied._address != packed._address and torch.equal(copied.to_dense(), w)
        assert torch.equal(copied.linear(x, None), packed.linear(x, None))
    assert packed.linear(torch.empty(0, 24), torch.zeros(40)).shape == (0, 40)  # no rows: no call into MKL
    for bad in (x.double(), x.bfloat16(), x[:, :20], x[None], torch.randn(7, 48)):  # what MKL would misread
        with pytest.raises(ValueError, match="float32 CPU rows of 24"):
            packed.linear(bad, None)
    assert torch.equal(packed.linear(x.t().contiguous().t(), None), packed.linear(x, None))  # strided: copied


def test_without_mkl_the_packed_candidate_is_left_out(cache, monkeypatch):
    """A PyTorch build without MKL's packed sgemm (ARM, some conda builds): the measurement, the choice
    and the prepared model go on without it."""
    monkeypatch.setattr(kernels, "_mkl_library", [None])
    monkeypatch.setattr(kernels, "_packs", {k: v for k, v in kernels._packs.items() if k != "mkl"})
    assert not kernels.mkl_packed_available() and kernels.MKL_PACKED not in kernels.available_packed()
    assert kernels.MKL_PACKED not in kernels.candidates(torch.ones(4, 4), None)
    kernels.fp32_record(24, 16)
    assert kernels.MKL_PACKED not in entry(cache)["fp32"]["24x16"]["small"]["gflops"]
    assert kernels.packing([(24, 16)]) in (kernels.PACKED, None)
    with pytest.raises(roberta.RobertaError, match="MKL's packed sgemm"):
        kernels.MklPacked(torch.ones(4, 4))


@pytest.mark.parametrize("size", [0, 2 ** 62])
def test_an_mkl_asking_for_an_absurd_packing_size_is_left_out(monkeypatch, size):
    """A library whose sizes cannot be the packing of the weight (an MKL of another integer width would
    read its arguments wrongly): refused before any memory is mapped or written, and the candidate left out."""
    class Library:
        @staticmethod
        def cblas_sgemm_pack_get_size(*args):
            return size

        def __getattr__(self, name):
            raise AssertionError(f"{name} called after a refused size")

    monkeypatch.setattr(kernels, "_mkl_library", [Library()])
    monkeypatch.setattr(kernels, "_packs", {k: v for k, v in kernels._packs.items() if k != "mkl"})
    with pytest.raises(roberta.RobertaError, match="bytes to pack"):
        kernels.MklPacked(torch.ones(8, 16))
    assert not kernels.mkl_packed_available()


@pytest.mark.parametrize("winner", PACKED_KERNELS)
def test_a_hub_loaded_for_inference_only_refuses_to_train_or_save(cache, hub_checkpoints, tmp_path, winner):
    config = RobertaConfig.load(hub_checkpoints["hf"] / "config.json")
    measured_faster(cache, kernels.encoder_shapes(config.hidden_size, config.intermediate_size), winner)
    exact = roberta.load(hub_checkpoints["hf"], precision="fp32")
    fast = roberta.load(hub_checkpoints["hf"], precision="fp32", inference_only=True)
    assert not exact.inference_only and fast.inference_only and fast.precision == "fp32"
    tokens = exact.encode("Hello world! A sentence of a few words.")
    a, b = fast.extract_features(tokens), exact.extract_features(tokens)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    with pytest.raises(roberta.RobertaError, match="without inference_only"):
        fast.train()
    with pytest.raises(roberta.RobertaError, match="without inference_only"):
        fast.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gelu_takes_the_way_measured_faster_and_caches_it(cache, monkeypatch, dtype):
    from roberta.inference import PackedLinear, packed_bf16_available

    if dtype == torch.bfloat16 and not packed_bf16_available():
        pytest.skip("needs a CPU whose oneDNN runs bf16 on reordered weights (AMX or AVX-512 BF16)")
    measured = []
    real = kernels.measure_gelu_epilogue
    monkeypatch.setattr(kernels, "measure_gelu_epilogue", lambda *shape: measured.append(shape) or real(*shape))
    fused = kernels.fuse_gelu(dtype, 64, 16)
    name = f"{str(dtype).removeprefix('torch.')} 64x16"
    record = entry(cache)["epilogue"][name]
    assert set(record["seconds"]) == {"fused", "separate"} and all(v > 0 for v in record["seconds"].values())
    assert fused == (record["winner"] == "fused")
    assert record["winner"] == min(record["seconds"], key=record["seconds"].get)
    kernels._records.clear()  # another process: reads the cache
    assert kernels.fuse_gelu(dtype, 64, 16) == fused and measured == [(dtype, 64, 16)]
    weight, bias = torch.randn(64, 16), torch.randn(64)
    assert PackedLinear(weight, bias, gelu=True, dtype=dtype).fused is fused
    assert not PackedLinear(weight, bias, dtype=dtype).fused  # no GELU: nothing to decide
    assert [r["kernel"] for r in kernels.report([(8, 16)]) if r["shape"] == name] == [record["winner"]]
    assert any(kernels.describe(r).startswith("gelu  ") for r in kernels.report([(8, 16)]))
    data = json.loads(cache.read_text())  # a damaged record is measured again
    data["entries"][next(iter(data["entries"]))]["epilogue"][name]["seconds"]["fused"] = "fast"
    cache.write_text(json.dumps(data))
    kernels._records.clear()
    kernels.fuse_gelu(dtype, 64, 16)
    assert measured == [(dtype, 64, 16)] * 2
    kernels.use("default")  # reproducible runs: always in the epilogue, as before any measurement
    assert kernels.fuse_gelu(dtype, 64, 16) is True and measured == [(dtype, 64, 16)] * 2


def test_bf16_attention_takes_the_path_measured_faster_and_caches_it(cache, monkeypatch):
    from roberta import model

    if model._attend_cpu is None:
        pytest.skip("the C attention kernel is not built or does not run on this CPU")
    measured = []
    real = kernels.measure_bf16_attention
    monkeypatch.setattr(kernels, "measure_bf16_attention", lambda *shape: measured.append(shape) or real(*shape))
    widen = kernels.widen_bf16_attention(4, 16)
    record = entry(cache)["attention"]["bf16 4x16"]
    assert widen == (record["winner"] == "widened") and set(record["seconds"]) == {"sdpa", "widened"}
    assert record["winner"] == min(record["seconds"], key=record["seconds"].get)
    kernels._records.clear()  # another process: reads the cache
    assert kernels.widen_bf16_attention(4, 16) == widen and measured == [(4, 16)]
    assert any(r["precision"] == "attention" for r in kernels.report([(8, 16)]))
    data = json.loads(cache.read_text())  # a damaged record is measured again
    data["entries"][next(iter(data["entries"]))]["attention"]["bf16 4x16"]["winner"] = "rm -rf"
    cache.write_text(json.dumps(data))
    kernels._records.clear()
    kernels.widen_bf16_attention(4, 16)
    assert measured == [(4, 16), (4, 16)]
    kernels.use("default")
    assert kernels.widen_bf16_attention(4, 16) is False


def test_bf16_attention_widened_to_the_float32_kernel_is_that_kernel_rounded_once(cache, monkeypatch):
    """Where it measured faster, bf16 attention is the float32 kernel on the widened q, k, v (the same
    bits), rounded once to bf16: within bf16's unit roundoff (2^-8 relative: 8 significant bits) of
    exact attention on those inputs, plus float32's own error (`attention_error_bound`)."""
    from roberta import model

    if model._attend_cpu is None:
        pytest.skip("the C attention kernel is not built or does not run on this CPU")
    config = RobertaConfig(**{**CONFIG, "num_hidden_layers": 1})
    attention = model.RobertaSelfAttention(config).eval()
    lengths = [3, 17, 1, 40]
    layout = model.Unpadded(fixed_lengths(lengths)[1])
    qkv = (torch.randn(sum(lengths), 3 * config.hidden_size, generator=torch.Generator().manual_seed(0)) * 2).bfloat16()
    monkeypatch.setattr(kernels, "widen_bf16_attention", lambda *shape: True)
    with torch.inference_mode():
        y = layout.attend(qkv, attention)
        wide = layout.attend(qkv.float(), attention)
    assert y.dtype == torch.bfloat16 and torch.equal(y, wide.bfloat16())
    exact = sdpa_per_sequence(qkv.double(), lengths, attention.num_heads, attention.head_dim)
    bound = attention_error_bound(qkv.float(), lengths, attention.num_heads, attention.head_dim)
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + bound * (1 + 2 ** -8)).all()


@pytest.mark.parametrize("winner", PACKED_KERNELS)
def test_the_commands_run_an_fp32_model_packed_where_that_measured_faster(cache, hub_checkpoints, tiny_hub, tmp_path,
                                                                         winner):
    """`roberta features --precision fp32` loads for inference only: with packing measured faster (this
    machine's cache, as `measured_faster` writes it) its vectors stay within 1e-5 of the plain model's."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    config = RobertaConfig.load(hub_checkpoints["hf"] / "config.json")
    measured_faster(cache, kernels.encoder_shapes(config.hidden_size, config.intermediate_size), winner)
    texts = ["Hello world!", "A longer sentence, with more words in it than the first one has."]
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "roberta", "features", "-m", str(hub_checkpoints["hf"]), "-o",
                           str(tmp_path / "f.npy"), "--precision", "fp32", *texts], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(root), "ROBERTA_CACHE": str(cache.parent),
                               "ROBERTA_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    import argparse

    from roberta import cli

    hub = cli._load(argparse.Namespace(model=hub_checkpoints["hf"], device="cpu", cache_dir=None, offline=True,
                                       base_url=None, precision="fp32"))  # what every inference command loads
    assert hub.inference_only and hub.precision == "fp32"
    from roberta.inference import PackedLinear
    assert {m.kernel for m in hub.model.modules() if isinstance(m, PackedLinear)} == {winner}
    vectors = np.load(tmp_path / "f.npy")
    for vector, text in zip(vectors, texts):
        expected = tiny_hub.extract_features(tiny_hub.encode(text))[0, 0].numpy()
        assert np.abs(vector - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


# ---- MKL's code path by instruction set (roberta/runtime.py, csrc/mkl_paths.c) ------------------------

MKL_PROBE = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch
import roberta, torch
from roberta import runtime
torch.manual_seed(0)
x, w = torch.randn(32, 768), torch.randn(3072, 768)
y = torch.nn.functional.linear(x, w)  # MKL's sgemm: its first call chooses the code path
exact = x.double() @ w.double().t()
bound = 768 * 2 ** -24 * (x.double().abs() @ w.double().abs().t())  # float32 rounding of 768 terms, each entry
import ctypes
mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(json.dumps({"paths": runtime.mkl_paths(), "ratio": ((y.double() - exact).abs() / bound).max().item(),
                  "code_path": mkl.mkl_serv_cpu_detect()}))  # MKL's: 0 its generic one, else by instruction set
"""


def mkl_probe(order="roberta-first", **env):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MKL_PROBE, order], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif("avx2" not in roberta.inference.cpu_flags(), reason="needs a CPU with AVX2")
def test_mkl_chooses_its_code_path_by_instruction_set_unless_asked_not_to():
    import importlib.util

    if importlib.util.find_spec("roberta._mkl_paths") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("roberta._mkl_paths is not built (pip install -e . compiles it)")
        pytest.skip("roberta._mkl_paths is not built (pip install -e . compiles it)")
    ours = mkl_probe()
    # MKL runs the code of the CPU's instruction set, on any vendor's CPU (on an AMD EPYC its own choice
    # is its generic path, 0)
    assert ours["paths"] == "isa" and ours["code_path"] > 0, ours
    own = mkl_probe(ROBERTA_MKL_PATHS="vendor")
    first = mkl_probe("torch-first")  # too late to change MKL's choice: said so
    assert own["paths"] == "vendor" and first["paths"] == "vendor"
    # either path is float32 arithmetic: within its rounding of the exact product
    assert ours["ratio"] <= 1 and own["ratio"] <= 1, (ours, own)
    from roberta.cli import main
    os.environ["ROBERTA_MKL_PATHS"] = "fast"
    try:
        assert main(["info", "--device"]) == 2
    finally:
        del os.environ["ROBERTA_MKL_PATHS"]

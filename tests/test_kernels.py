"""The float32 GEMM chosen by measurement: made, cached, measured again when the cache cannot be trusted,
switched off on request, and every candidate within float rounding of the plain path for every head."""
import json

import pytest
import torch
import torch.nn.functional as F

import roberta
from roberta import RobertaConfig, kernels

from test_model import randomize
from test_speed_paths import CONFIG, HEADS, fixed_lengths


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory and no decisions held by this process."""
    monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_fp32", {})
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
    return data["entries"][f"{m['cpu']} | {m['isa']} | {m['threads']} threads | torch {m['torch']}"]


def test_the_choice_is_measured_once_and_cached(cache, measured, monkeypatch):
    assert kernels.fp32_choice(800, 96, 64) in kernels.available_fp32()
    record = entry(cache)["fp32"]["96x64"]
    assert entry(cache)["machine"] == kernels.machine()
    for name, tokens in (("small", kernels.SMALL_TOKENS), ("large", kernels.LARGE_TOKENS)):
        r = record[name]
        assert r["tokens"] == tokens and set(r["gflops"]) == set(kernels.available_fp32())
        assert all(v > 0 for v in r["gflops"].values()) and r["winner"] == max(r["gflops"], key=r["gflops"].get)
    assert kernels.fp32_choice(800, 96, 64) == record["large"]["winner"]
    assert kernels.fp32_choice(5, 96, 64) == record["small"]["winner"]
    monkeypatch.setattr(kernels, "_fp32", {})  # another process on this machine: reads the cache
    assert kernels.fp32_choice(800, 96, 64) == record["large"]["winner"]
    assert measured == [(96, 64)]
    kernels.fp32_choice(800, 32, 64)  # another shape: measured and added beside the first
    assert measured == [(96, 64), (32, 64)] and set(entry(cache)["fp32"]) == {"96x64", "32x64"}
    rows = kernels.report([(96, 64), (32, 64)])  # what `roberta info --device` shows: from the cache
    assert [(r["shape"], r["tokens"], r["kernel"]) for r in rows] == [
        (s, entry(cache)["fp32"][s][c]["tokens"], entry(cache)["fp32"][s][c]["winner"])
        for s in ("96x64", "32x64") for c in ("small", "large")]
    assert measured == [(96, 64), (32, 64)] and all(kernels.describe(r).startswith("fp32") for r in rows)


def test_remeasure_times_again_once_and_replaces_the_cached_choice(cache, measured, monkeypatch):
    kernels.fp32_choice(800, 96, 64)
    old = entry(cache)["fp32"]["96x64"]
    monkeypatch.setenv(kernels.ENV, "remeasure")  # in another process, which has measured nothing yet
    monkeypatch.setattr(kernels, "_fp32", {})
    monkeypatch.setattr(kernels, "_remeasured", set())
    kernels.fp32_choice(800, 96, 64)
    monkeypatch.setattr(kernels, "_fp32", {})
    kernels.fp32_choice(800, 96, 64)  # once per process: the fresh record is used from then on
    assert measured == [(96, 64), (96, 64)]
    new = entry(cache)["fp32"]["96x64"]
    assert new["large"]["gflops"] != old["large"]["gflops"]  # timings never repeat to the last bit


@pytest.mark.parametrize("damage", ["not json {", "[]", "truncated", "foreign machine", "unknown kernel",
                                    "other format"])
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
    else:
        data["format"] = kernels.FORMAT + 1
        text = json.dumps(data)
    cache.write_text(text)
    monkeypatch.setattr(kernels, "_fp32", {})
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

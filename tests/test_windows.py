"""Long sequences in overlapping windows: features, classification and fill-mask (tiny model, 64 tokens)."""
import pytest
import torch
from hypothesis import given, strategies as st

from roberta import windows
from roberta.errors import RobertaError

TEXT = ("The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill, "
        "and far away a train crosses the long bridge over the river before the evening rain begins. ") * 3


@given(st.integers(0, 300), st.integers(1, 40), st.integers(0, 39))
def test_spans_cover_every_token_and_the_owner_moves_forward(length, room, stride):
    if length > room and stride >= room:
        with pytest.raises(RobertaError, match="stride"):
            windows.spans(length, room, stride)
        return
    ranges = windows.spans(length, room, stride)
    assert ranges[0][0] == 0 and ranges[-1][1] == length and all(b - a <= room for a, b in ranges)
    assert all(next_a == b - stride for (_, b), (next_a, _) in zip(ranges, ranges[1:]))
    owners = [windows.most_central(ranges, j) for j in range(length)]
    assert owners == sorted(owners)  # fill_mask relies on it: masks come back in text order
    for j, w in enumerate(owners):
        a, b = ranges[w]
        assert a <= j < b
        assert all(min(j - a2, b2 - 1 - j) <= min(j - a, b - 1 - j) for a2, b2 in ranges if a2 <= j < b2)


def test_features_of_a_text_that_fits_equal_the_single_pass(tiny_hub):
    tokens = tiny_hub.encode("Hello world, this fits in one window.")
    single = tiny_hub.extract_features(tokens)
    assert torch.equal(tiny_hub.extract_features(tokens, window=64, stride=8), single)
    assert torch.equal(tiny_hub.extract_features(tokens, stride=8), single)  # window: the model's 64
    layers = tiny_hub.extract_features([tokens], return_all_hiddens=True, stride=8)[0]
    assert all(torch.equal(a, b) for a, b in zip(layers, tiny_hub.extract_features(tokens, return_all_hiddens=True)))


def test_long_features_are_stitched_from_the_most_central_window(tiny_hub):
    tokens = tiny_hub.encode(TEXT)
    n = len(tokens)
    assert n > 64
    with pytest.raises(RobertaError, match="at most 64"):
        tiny_hub.extract_features(tokens)
    stitched = tiny_hub.extract_features(tokens, window=32, stride=10)
    assert stitched.shape == (1, n, tiny_hub.model.config.hidden_size)
    inner = tokens[1:-1].tolist()
    step = 30 - 10
    starts = list(range(0, n - 2 - 30 + step, step))
    features = {a: tiny_hub.extract_features(torch.tensor([0, *inner[a:a + 30], 2]))[0] for a in starts}
    for j in range(n - 2):  # independently: the window in which token j has most context on its nearer side
        best = max((a for a in starts if a <= j < a + 30), key=lambda a: (min(j - a, min(a + 30, n - 2) - 1 - j), -a))
        assert torch.allclose(stitched[0, j + 1], features[best][j - best + 1], atol=1e-6)
    assert torch.allclose(stitched[0, 0], features[0][0], atol=1e-6)
    assert torch.allclose(stitched[0, -1], features[starts[-1]][-1], atol=1e-6)
    batch = tiny_hub.extract_features(torch.stack([tokens, tokens]), window=32, stride=10)
    assert batch.shape == (2, n, stitched.shape[-1]) and torch.allclose(batch[1], stitched[0], atol=1e-6)


def test_predict_pools_window_logits(tiny_hub):
    short = tiny_hub.encode("A short one.")
    assert torch.equal(tiny_hub.predict("mnli", short, stride=4), tiny_hub.predict("mnli", short))
    tokens = tiny_hub.encode(TEXT)
    rows, _ = windows.split(tokens.tolist(), 64, 16)
    logits = torch.cat([tiny_hub.predict("mnli", torch.tensor(r), return_logits=True) for r in rows])
    assert len(rows) >= 3
    mean = tiny_hub.predict("mnli", tokens, stride=16, return_logits=True)
    assert torch.allclose(mean[0], logits.mean(0), atol=1e-6)
    assert torch.allclose(tiny_hub.predict("mnli", [tokens], stride=16, pool="max", return_logits=True)[0],
                          logits.max(0).values, atol=1e-6)
    assert torch.allclose(tiny_hub.predict("mnli", tokens, stride=16).exp().sum(), torch.tensor(1.0))
    with pytest.raises(RobertaError, match="pool"):
        tiny_hub.predict("mnli", tokens, stride=16, pool="median")


def test_fill_mask_in_windows(tiny_hub):
    short = "The capital of France is <mask>."
    assert tiny_hub.fill_mask(short, topk=3, stride=4) == tiny_hub.fill_mask(short, topk=3)
    text = "<mask> " + TEXT + " A <mask> at the end, and <mask>."
    results = tiny_hub.fill_mask(text, topk=2, window=40, stride=12)
    assert len(results) == 3
    tokens = tiny_hub._encode_masked(text).tolist()
    rows, ranges = windows.split(tokens, 40, 12)
    masks = [j for j, t in enumerate(tokens[1:-1]) if t == tiny_hub.tokenizer.mask_token_id]
    for mask, result in zip(masks, results):
        w = windows.most_central(ranges, mask)
        ids = torch.tensor([rows[w]])
        with torch.no_grad():
            logits = tiny_hub.model(ids).logits[0, 1 + mask - ranges[w][0]]
        probs, top = logits.softmax(-1).topk(2)
        assert [r[2] for r in result] == [tiny_hub.tokenizer.decode([t]) for t in top.tolist()]
        assert [r[1] for r in result] == pytest.approx(probs.tolist(), abs=1e-6)
    with pytest.raises(RobertaError, match="at most 64"):
        tiny_hub.fill_mask(text)


@pytest.mark.parametrize("window, stride, match", [(2, None, "window must be"), (65, None, "window must be"),
                                                   (32, 30, "stride must be"), (32, -1, "stride must be")])
def test_bad_window_settings(tiny_hub, window, stride, match):
    with pytest.raises(RobertaError, match=match):
        tiny_hub.extract_features(tiny_hub.encode("x"), window=window, stride=stride)

"""The published RoBERTa examples, run on a tiny model with the real tokenizer, checked against transformers."""
import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import roberta
from hub_helpers import FileServer, serve_models
from roberta.errors import RobertaError

ROOT = Path(__file__).resolve().parents[1]
PAIR = ("Roberta is a heavily optimized version of BERT.", "Roberta is not very optimized.")
SENTENCES = ["Hello world!", "A much longer sentence, with some punctuation; and more words in it.", "Hi"]


@pytest.fixture(scope="module")
def reference(hub_checkpoints):
    """transformers' RobertaForMaskedLM on the same weights, and a sequence classifier with the mnli head."""
    transformers = pytest.importorskip("transformers")
    mlm = transformers.RobertaForMaskedLM.from_pretrained(hub_checkpoints["hf"]).eval()
    config = transformers.RobertaConfig.from_pretrained(hub_checkpoints["hf"], num_labels=3)
    classifier = transformers.RobertaForSequenceClassification(config).eval()
    classifier.roberta.load_state_dict(mlm.roberta.state_dict(), strict=False)
    ours = roberta.load(hub_checkpoints["hf"], precision="fp32").model.classification_heads["mnli"].state_dict()
    classifier.classifier.load_state_dict(ours)
    return mlm, classifier


@pytest.fixture
def served(hub_checkpoints, bpe_dir, tmp_path, monkeypatch):
    with FileServer() as server:
        serve_models(server, hub_checkpoints, bpe_dir)
        monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("ROBERTA_BASE_URL", server.url)
        monkeypatch.delenv("ROBERTA_OFFLINE", raising=False)
        yield server


def test_bpe_examples_from_the_release(tiny_hub):
    tokens = tiny_hub.encode("Hello world!")
    assert tokens.dtype == torch.long and tokens.tolist() == [0, 31414, 232, 328, 2]
    assert tiny_hub.decode(tokens) == "Hello world!"
    assert tiny_hub.encode("Hello world").tolist() == [0, 31414, 232, 2]
    assert tiny_hub.encode(" world").tolist() == [0, 232, 2]
    assert tiny_hub.encode("world").tolist() == [0, 8331, 2]


def test_sentence_pairs_and_decode_splits_them(tiny_hub):
    pair = tiny_hub.encode("Hello world!", "Hi")
    assert pair.tolist() == [0, 31414, 232, 328, 2, 2, 30086, 2]
    assert tiny_hub.encode("Hello world!", "Hi", no_separator=True).tolist() == [0, 31414, 232, 328, 2, 30086, 2]
    assert tiny_hub.decode(pair) == ["Hello world!", "Hi"]
    assert [t.tolist() for t in tiny_hub.encode(["Hello world!", "Hi"], ["Hi", "Hi"])] == [
        pair.tolist(), [0, 30086, 2, 2, 30086, 2]]


def test_every_layout_loads_the_same_model(hub_checkpoints, served, tiny_hub):
    tokens = tiny_hub.encode(*PAIR)
    expected = tiny_hub.extract_features(tokens)
    for path in (hub_checkpoints["fairseq"], hub_checkpoints["fairseq_bpe"], hub_checkpoints["archive"], hub_checkpoints["fairseq"] / "model.pt"):
        other = roberta.load(path, precision="fp32")
        assert other.encode(*PAIR).tolist() == tokens.tolist()
        torch.testing.assert_close(other.extract_features(tokens), expected, rtol=0, atol=1e-6)
        assert list(other.model.classification_heads) == ["mnli"]
    assert [p for p, _ in served.log] == ["/fairseq/gpt2_bpe/encoder.json", "/fairseq/gpt2_bpe/vocab.bpe"]


def test_features_and_all_hiddens_match_transformers(tiny_hub, reference):
    tokens = tiny_hub.encode("Hello world!")
    last = tiny_hub.extract_features(tokens)
    assert last.shape == (1, 5, 64) and not last.requires_grad
    layers = tiny_hub.extract_features(tokens, return_all_hiddens=True)
    assert len(layers) == tiny_hub.model.config.num_hidden_layers + 1
    assert torch.equal(layers[-1], last)
    with torch.no_grad():
        theirs = reference[0].roberta(tokens[None], output_hidden_states=True).hidden_states
    for ours, ref in zip(layers, theirs):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_sentence_pair_prediction_matches_transformers(tiny_hub, reference):
    tokens = tiny_hub.encode(*PAIR)
    log_probs = tiny_hub.predict("mnli", tokens)
    with torch.no_grad():
        logits = reference[1](tokens[None]).logits
    torch.testing.assert_close(log_probs, logits.log_softmax(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny_hub.predict("mnli", tokens, return_logits=True), logits, rtol=0, atol=1e-5)
    assert log_probs.argmax().item() == logits.argmax().item()


def test_register_a_new_head_then_save_and_reload(hub_checkpoints, tmp_path):
    hub = roberta.load(hub_checkpoints["hf"], precision="fp32")
    hub.register_classification_head("sentiment", num_classes=5)
    tokens = hub.encode("What a lovely day.")
    log_probs = hub.predict("sentiment", tokens)
    assert log_probs.shape == (1, 5)
    torch.testing.assert_close(log_probs.exp().sum(), torch.tensor(1.0))
    hub.save(tmp_path / "saved")
    again = roberta.load(tmp_path / "saved", precision="fp32")
    assert sorted(again.model.classification_heads) == ["mnli", "sentiment"]
    saved, loaded = hub.model.state_dict(), again.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # what save keeps
    # The same weights and input through the same kernels: equal up to the order the matmuls sum in,
    # which may depend on buffer alignment (MKL); float32 rounding of log-probabilities near 1.
    torch.testing.assert_close(again.predict("sentiment", tokens), log_probs, rtol=0, atol=1e-5)
    assert [c[2] for c in again.fill_mask("It is <mask>.")] == [c[2] for c in hub.fill_mask("It is <mask>.")]
    with pytest.raises(RobertaError, match="no classification head named 'nope'"):
        hub.predict("nope", tokens)


@pytest.mark.parametrize("text", ["The first Star wars movie came out in <mask>",
                                  "Hello <mask> world!", "<mask> is the capital of France."])
def test_fill_mask_matches_transformers_and_keeps_fairseq_spacing(tiny_hub, reference, text, bpe_dir):
    transformers = pytest.importorskip("transformers")
    mask = transformers.AddedToken("<mask>", lstrip=True)  # as roberta-base's tokenizer_config.json has it
    hf_tok = transformers.RobertaTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"), mask_token=mask)
    ids = hf_tok(text, return_tensors="pt")["input_ids"]  # its <mask> swallows the space before it, as fairseq
    assert tiny_hub._encode_masked(text).tolist() == ids[0].tolist()
    with torch.no_grad():
        probs = reference[0](ids).logits[ids == hf_tok.mask_token_id].softmax(-1)[0]
    top = probs.topk(3)
    result = tiny_hub.fill_mask(text, topk=3)
    assert len(result) == 3
    for (filled, prob, token), p, index in zip(result, top.values.tolist(), top.indices.tolist()):
        assert token == hf_tok.decode([index])
        assert prob == pytest.approx(p, abs=1e-6)
        space = " <mask>" if " <mask>" in text else "<mask>"
        assert filled == text.replace(space, token)


def test_fill_mask_several_masks_and_pipeline_dicts(tiny_hub):
    text = "The <mask> sat on the <mask>."
    per_mask = tiny_hub.fill_mask(text, topk=2)
    assert len(per_mask) == 2 and all(len(choices) == 2 for choices in per_mask)
    first, second = per_mask[0][0], per_mask[1][0]
    assert first[0] == "The" + first[2] + " sat on the <mask>."
    assert second[0] == "The <mask> sat on the" + second[2] + "."
    dicts = tiny_hub.fill_mask("Hello <mask>!", topk=2, as_dicts=True)
    assert [set(d) for d in dicts] == [{"sequence", "score", "token", "token_str"}] * 2
    assert dicts[0]["token_str"] == tiny_hub.tokenizer.decode([dicts[0]["token"]])
    with pytest.raises(RobertaError, match="needs a <mask>"):
        tiny_hub.fill_mask("no mask here")


def test_batched_calls_equal_one_at_a_time(tiny_hub):
    tokens = tiny_hub.encode(SENTENCES)
    batched = tiny_hub.extract_features(tokens)
    for t, b in zip(tokens, batched):
        torch.testing.assert_close(b, tiny_hub.extract_features(t), rtol=0, atol=1e-5)
    all_layers = tiny_hub.extract_features(tokens, return_all_hiddens=True)
    for t, layers in zip(tokens, all_layers):
        for b, s in zip(layers, tiny_hub.extract_features(t, return_all_hiddens=True)):
            torch.testing.assert_close(b, s, rtol=0, atol=1e-5)
    padded = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=1)  # fairseq's 2-D input
    for row, (t, b) in enumerate(zip(tokens, batched)):
        torch.testing.assert_close(tiny_hub.extract_features(padded)[row:row + 1, :len(t)], b, rtol=0, atol=1e-5)
    predicted = tiny_hub.predict("mnli", tokens)
    assert predicted.shape == (3, 3)
    torch.testing.assert_close(tiny_hub.predict("mnli", padded), predicted, rtol=0, atol=1e-5)
    for t, row in zip(tokens, predicted):
        torch.testing.assert_close(row, tiny_hub.predict("mnli", t)[0], rtol=0, atol=1e-5)
    texts = ["Hello <mask>!", "A <mask> of words, and then many more <mask> follow it here."]
    for batched_result, text in zip(tiny_hub.fill_mask(texts, topk=3), texts):
        single = tiny_hub.fill_mask(text, topk=3)
        assert [c[0] for c in _flat(batched_result)] == [c[0] for c in _flat(single)]
        assert [c[1] for c in _flat(batched_result)] == pytest.approx([c[1] for c in _flat(single)], abs=1e-6)


def _flat(result):
    return [c for choices in result for c in choices] if isinstance(result[0], list) else result


def test_too_long_input_errors_unless_truncated(tiny_hub):
    limit = tiny_hub.max_tokens
    tokens = tiny_hub.encode("word " * 100)
    with pytest.raises(RobertaError, match=f"input has {len(tokens)} tokens but the model takes at most {limit}"):
        tiny_hub.extract_features(tokens)
    cut = tiny_hub.extract_features(tokens, truncate=True)
    assert cut.shape[1] == limit
    manual = torch.cat([tokens[:limit - 1], tokens[-1:]])
    torch.testing.assert_close(cut, tiny_hub.extract_features(manual), rtol=0, atol=0)
    with pytest.raises(RobertaError, match=f"at most {limit}; shorten it"):
        tiny_hub.fill_mask("word " * 100 + "<mask>")
    predicted = tiny_hub.predict("mnli", [tokens, tiny_hub.encode("short")], truncate=True)
    torch.testing.assert_close(predicted[0], tiny_hub.predict("mnli", manual)[0], rtol=0, atol=1e-5)


def test_modes_devices_and_dtypes(hub_checkpoints):
    hub = roberta.load(hub_checkpoints["hf"], precision="fp32")
    assert not hub.training and hub.device.type == "cpu"
    tokens = hub.encode("Hello world!")
    reference = hub.extract_features(tokens)
    hub.train()
    assert hub.model.training and hub.extract_features(tokens).requires_grad  # fine-tuning through the hub
    assert hub.eval() is hub and not hub.model.training
    assert hub.to("cpu") is hub
    hub.bfloat16()
    low = hub.extract_features(tokens)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.1)
    assert hub.predict("mnli", tokens).dtype == torch.float32
    assert hub.half().extract_features(tokens).dtype == torch.float16


@contextlib.contextmanager
def between(first: torch.nn.Module, last: torch.nn.Module, start, stop):
    """Calls start() as `first` begins each forward pass, stop() as `last` ends its own."""
    def call(f):
        return lambda *_: [f(), None][1]  # a hook's return value would replace the inputs or the output

    hooks = [first.register_forward_pre_hook(call(start)), last.register_forward_hook(call(stop))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def left_padded(rows: list[torch.Tensor], pad: int = 1) -> torch.Tensor:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, ids.shape[1] - len(r):] = r
    return ids


def test_hub_calls_build_the_batch_on_the_host_and_the_model_asks_the_device_nothing(hub_checkpoints, monkeypatch):
    """extract_features, predict and fill_mask make ids, mask and layout on the host: from the encoder's
    first step to the head's last, the forward pass reads no value and makes no shape from the data
    (what makes a GPU wait), for a list (padded on the right) and a tensor padded on the left."""
    from test_speed_paths import _DeviceQuestions

    hub = roberta.load(hub_checkpoints["hf"], precision="fp32")
    tokens = hub.encode(SENTENCES)
    masked = ["The capital of France is <mask>.", "<mask> world, <mask> again!"]
    alone = [hub.fill_mask(text) for text in masked]
    questions = _DeviceQuestions()
    encoder = hub.model.roberta
    monkeypatch.setattr(encoder, "check_inputs", lambda ids: None)  # it reads the ids only on the CPU
    start, stop = questions.__enter__, lambda: questions.__exit__(None, None, None)
    with between(encoder, encoder, start, stop):
        features, shifted = hub.extract_features(tokens), hub.extract_features(left_padded(tokens))
    with between(encoder, hub.model.classification_heads["mnli"], start, stop):
        scores, shifted_scores = hub.predict("mnli", tokens), hub.predict("mnli", left_padded(tokens))
    with between(encoder, hub.model.lm_head, start, stop):
        filled = hub.fill_mask(masked)
    assert questions.asked == []
    for row, (f, ids) in enumerate(zip(features, tokens)):
        assert (shifted[row, shifted.shape[1] - len(ids):] - f[0]).abs().max().item() <= 1e-6
    assert scores.shape == (3, 3) and (shifted_scores - scores).abs().max().item() <= 1e-6
    assert [[choice[2] for choice in per_mask] for per_mask in filled[1]] == \
        [[choice[2] for choice in per_mask] for per_mask in alone[1]]
    assert [choice[2] for choice in filled[0]] == [choice[2] for choice in alone[0]]
    assert max(abs(a[1] - b[1]) for a, b in zip(filled[0], alone[0])) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_hub_calls_never_make_the_gpu_wait(hub_checkpoints, precision):
    """On a GPU, extract_features and predict run without a single device-to-host synchronisation, and
    fill_mask without one up to its LM head (then its top-k comes to the host: the one wait, for the
    results); a [batch, length] tensor already on the GPU costs one copy to the host, no more. The
    results equal the CPU's (fp32 within 1e-4; bf16, which runs varlen attention, roughly)."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16 units")
    hub = roberta.load(hub_checkpoints["hf"], device="cuda", precision=precision)
    cpu = roberta.load(hub_checkpoints["hf"], precision="fp32")
    tokens = hub.encode(SENTENCES)
    on_gpu = left_padded(tokens).cuda()
    masked = ["The capital of France is <mask>.", "<mask> world, <mask> again!"]
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        features, scores = hub.extract_features(tokens), hub.predict("mnli", tokens)
        with between(hub.model.roberta, hub.model.lm_head, lambda: None, lambda: torch.cuda.set_sync_debug_mode(0)):
            filled = hub.fill_mask(masked)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from_gpu = hub.extract_features(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
    tol = 1e-4 if precision == "fp32" else 0.1
    for gpu, ref in zip(features, cpu.extract_features(tokens)):
        torch.testing.assert_close(gpu.float().cpu(), ref, rtol=0, atol=tol)
    torch.testing.assert_close(scores.cpu(), cpu.predict("mnli", tokens), rtol=0, atol=tol)
    torch.testing.assert_close(from_gpu.float().cpu(), cpu.extract_features(left_padded(tokens)), rtol=0, atol=tol)
    for ours, ref in zip(filled, cpu.fill_mask(masked)):  # probabilities: near ties may swap tokens
        ours, ref = (ours, ref) if isinstance(ours[0], list) else ([ours], [ref])
        for a, b in zip(ours, ref):
            assert np.allclose([c[1] for c in a], [c[1] for c in b], rtol=0.05 if precision == "bf16" else 1e-3)


def test_named_models_download_once_then_load_offline(served, tmp_path, monkeypatch):
    hub = roberta.load("roberta.large.mnli")
    assert hub.predict("mnli", hub.encode(*PAIR)).shape == (1, 3)
    requests = len(served.log)
    monkeypatch.setenv("ROBERTA_OFFLINE", "1")
    roberta.load("roberta.large.mnli")
    assert len(served.log) == requests
    with pytest.raises(RobertaError, match="offline mode is on"):
        roberta.load("roberta.base")


def test_torch_hub_load_from_this_checkout(served):
    model = torch.hub.load(str(ROOT), "roberta.base", source="local")
    assert isinstance(model, roberta.RobertaHub)
    assert model.encode("Hello world!").tolist() == [0, 31414, 232, 328, 2]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(RobertaError, match="neither an existing path nor a known model name"):
        roberta.load("roberta.huge")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RobertaError, match="is not a model"):
        roberta.load(tmp_path / "notes.txt")
    with pytest.raises(RobertaError):
        roberta.load(tmp_path)


def test_feature_files_come_back_in_input_order(tiny_hub, tmp_path):
    from roberta.hub import write_features

    texts = ["Hello world!", "A much longer line of text, with a comma and more words in it.", "Short",
             "Premise here.\tHypothesis there.", "Medium length line of text."]
    # a tiny token budget forces several length-sorted batches
    assert write_features(tiny_hub, texts, tmp_path / "f.npy", batch_tokens=24) == [tiny_hub.model.config.hidden_size]
    rows = np.load(tmp_path / "f.npy")
    for text, row in zip(texts, rows):
        alone = tiny_hub.extract_features(tiny_hub.encode(*text.split("\t")))[0, 0]
        assert np.abs(row - alone.numpy()).max() <= 1e-5
    write_features(tiny_hub, texts, tmp_path / "f.jsonl", pool="mean", layer=1, batch_tokens=24)
    lines = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == texts
    alone = tiny_hub.extract_features(tiny_hub.encode(texts[1]), return_all_hiddens=True)[1][0].mean(0)
    assert np.abs(np.array(lines[1]["features"]) - alone.numpy()).max() <= 1e-5


@pytest.mark.parametrize("call, text", [
    (lambda hub: hub.extract_features("Hello"), "Hello"),
    (lambda hub: hub.predict("mnli", "a great movie"), "a great movie"),
    (lambda hub: hub.predict("mnli", ["a great movie", "dull"]), "a great movie"),
    (lambda hub: hub.extract_features("Hello", window=16), "Hello"),
])
def test_a_text_where_token_ids_belong_says_to_call_encode(tiny_hub, call, text):
    with pytest.raises(RobertaError) as info:
        call(tiny_hub)
    assert str(info.value) == (f"expected token ids, got the text {text!r}: call encode first, e.g. "
                               f"hub.encode({text!r}), or embed(texts) for sentence vectors")


def test_other_wrong_types_for_token_ids_are_one_line_errors(tiny_hub):
    with pytest.raises(RobertaError, match=r"^expected token ids \(a tensor from encode, or a list of them\), got a int$"):
        tiny_hub.extract_features(31414)
    with pytest.raises(RobertaError, match=r"^expected token ids \(integers\), got a torch.float32 tensor"):
        tiny_hub.predict("mnli", torch.ones(1, 4))


def test_a_default_load_is_float32_and_can_be_saved_given_a_head_and_trained(hub_checkpoints, tmp_path):
    """What a new user does on any machine: no arguments, then save, a new head, a training step."""
    hub = roberta.load(hub_checkpoints["hf"])
    assert hub.precision == "fp32" and all(p.dtype == torch.float32 for p in hub.model.parameters())
    tokens = hub.encode("Hello world!")
    assert hub.extract_features(tokens).dtype == torch.float32
    hub.save(tmp_path / "saved")
    hub.register_classification_head("topic", num_classes=4)
    hub.train()
    optimizer = torch.optim.SGD(hub.model.parameters(), lr=0.1)
    before = hub.model.classification_heads["topic"].out_proj.weight.detach().clone()
    loss = -hub.predict("topic", tokens)[0, 2]
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, hub.model.classification_heads["topic"].out_proj.weight)
    again = roberta.load(tmp_path / "saved")
    assert again.precision == "fp32" and sorted(again.model.classification_heads) == ["mnli"]

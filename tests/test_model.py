"""The model against transformers' RoBERTa on identical random weights, head by head.

Weights travel through this project's save_pretrained and transformers' from_pretrained, so every
comparison also checks that the checkpoint layout is the one transformers reads.
"""
import json

import pytest
import torch
import transformers

import roberta
from roberta import RobertaConfig, RobertaError

TOL = 1e-5
CONFIG = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
              max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomize(model, seed=0):
    """Every parameter random (LayerNorm scales near 1), so no term of the computation is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1 + noise if "LayerNorm.weight" in name or "layer_norm.weight" in name else noise)
    return model.eval()


def padded_batch(seed=0, lengths=(12, 7, 3, 12), vocab=300, left=False):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 1, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq = torch.randint(4, vocab, (n,), generator=g)
        seq[0], seq[-1] = 0, 2
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl], mask[i, sl] = seq, 1
    return ids, mask


def pair(cls_name, tmp_path, **overrides):
    """Our model with random weights and transformers' model loaded from what ours saved."""
    config = RobertaConfig(**{**CONFIG, **overrides})
    ours = randomize(getattr(roberta, cls_name)(config))
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, cls_name).from_pretrained(tmp_path).eval()
    return ours, theirs


def max_diff(a, b, mask=None):
    """The largest difference, in units of the values' scale where they exceed 1: float32's rounding is
    relative, so logits of magnitude ~6 (the MLM head's) differ by up to ~6x what values near 1 do
    when two implementations sum in different orders."""
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.parametrize("left", [False, True])
def test_encoder_and_all_hidden_states_match_transformers(tmp_path, left):
    ours, theirs = pair("RobertaModel", tmp_path)
    ids, mask = padded_batch(left=left)
    with torch.no_grad():
        a = ours(ids, mask, output_hidden_states=True)
        b = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(a.hidden_states) == CONFIG["num_hidden_layers"] + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert max_diff(x, y, mask) <= TOL
    assert max_diff(a.last_hidden_state, b.last_hidden_state, mask) <= TOL
    assert torch.equal(a.hidden_states[-1], a.last_hidden_state)
    # the pooler reads <s>, which left padding moves; transformers reads index 0 whatever is there
    right_ids, right_mask = padded_batch()
    with torch.no_grad():
        reference = theirs(input_ids=right_ids, attention_mask=right_mask).pooler_output
    assert max_diff(a.pooler_output, reference) <= TOL


def test_a_nan_in_the_weights_reaches_the_outputs_as_in_transformers(tmp_path):
    """The packed attention kernel's exponential clamps its input from below: a NaN score must stay NaN
    through it (it became e^-87, and the outputs finite garbage), as PyTorch's softmax keeps it."""
    ours, theirs = pair("RobertaModel", tmp_path)
    with torch.no_grad():
        for model in (ours.encoder.layer[0].attention.self, theirs.encoder.layer[0].attention.self):
            model.key.weight[0, 0] = float("nan")
        ids, mask = padded_batch()
        a = ours(ids, mask).last_hidden_state  # padding-free: the C kernel where it is built
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isnan(b[mask.bool()]).all() and torch.isnan(a[mask.bool()]).all()


def test_left_and_right_padding_give_the_unpadded_result(tmp_path):
    ours, _ = pair("RobertaModel", tmp_path)
    right_ids, right_mask = padded_batch()
    left_ids, left_mask = padded_batch(left=True)
    with torch.no_grad():
        right = ours(right_ids, right_mask).last_hidden_state
        left = ours(left_ids, left_mask).last_hidden_state
        for i, n in enumerate(right_mask.sum(1).tolist()):
            alone = ours(right_ids[i:i + 1, :n]).last_hidden_state[0]
            assert (right[i, :n] - alone).abs().max() <= TOL
            assert (left[i, -n:] - alone).abs().max() <= TOL
    # pad positions keep position id 1 whichever side they are on
    pos = roberta.model.create_position_ids(left_ids, 1)
    assert pos[2].tolist()[:9] == [1] * 9 and pos[2].tolist()[9:] == [2, 3, 4]


def test_masked_lm_logits_and_loss_match_transformers(tmp_path):
    ours, theirs = pair("RobertaForMaskedLM", tmp_path)
    ids, mask = padded_batch(seed=1)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2], labels[3, 5], labels[3, 10] = 17, 42, 5, 299
    with torch.no_grad():
        full = ours(ids, mask)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        a = ours(ids, mask, labels=labels)
    assert max_diff(full.logits, b.logits, mask) <= TOL
    # with labels, logits exist only where a prediction is scored
    assert a.logits.shape == (4, CONFIG["vocab_size"])
    assert max_diff(a.logits, b.logits[labels.ne(-100)]) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


def test_masked_lm_fast_loss_has_the_gradients_of_the_plain_loss(tmp_path):
    ours, _ = pair("RobertaForMaskedLM", tmp_path)
    ids, mask = padded_batch(seed=2)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3, ids, -100)
    labels[mask == 0] = -100
    fast = ours(ids, mask, labels=labels).loss
    fast_grads = torch.autograd.grad(fast, list(ours.parameters()))
    logits = ours(ids, mask).logits
    plain = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    plain_grads = torch.autograd.grad(plain, list(ours.parameters()))
    assert abs(fast.item() - plain.item()) <= TOL
    for g1, g2 in zip(fast_grads, plain_grads):
        assert (g1 - g2).abs().max() <= TOL


@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classification_matches_transformers(tmp_path, num_labels):
    ours, theirs = pair("RobertaForSequenceClassification", tmp_path, num_labels=num_labels)
    ids, mask = padded_batch(seed=3)
    labels = torch.tensor([0, 2, 1, 1]) if num_labels == 3 else torch.tensor([0.1, 0.9, 0.5, 0.3])
    with torch.no_grad():
        a = ours(ids, mask, labels=labels)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (4, num_labels)
    assert max_diff(a.logits, b.logits) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


def test_token_classification_matches_transformers(tmp_path):
    ours, theirs = pair("RobertaForTokenClassification", tmp_path, num_labels=5)
    ids, mask = padded_batch(seed=4)
    labels = torch.where(mask.bool(), ids % 5, -100)
    with torch.no_grad():
        a = ours(ids, mask, labels=labels)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_diff(a.logits, b.logits, mask) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


def test_question_answering_matches_transformers(tmp_path):
    ours, theirs = pair("RobertaForQuestionAnswering", tmp_path)
    ids, mask = padded_batch(seed=5)
    starts, ends = torch.tensor([1, 2, 0, 4]), torch.tensor([3, 5, 1, 11])
    with torch.no_grad():
        a = ours(ids, mask, start_positions=starts, end_positions=ends)
        b = theirs(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends)
    assert max_diff(a.start_logits, b.start_logits, mask) <= TOL
    assert max_diff(a.end_logits, b.end_logits, mask) <= TOL
    # transformers lets padding compete for the answer; here it cannot
    lowest = torch.finfo(torch.float32).min
    ref_start, ref_end = (x.masked_fill(mask == 0, lowest) for x in (b.start_logits, b.end_logits))
    reference = (torch.nn.functional.cross_entropy(ref_start, starts)
                 + torch.nn.functional.cross_entropy(ref_end, ends)) / 2
    assert abs(a.loss.item() - reference.item()) <= TOL
    assert (a.start_logits[mask == 0] == lowest).all()


def test_multiple_choice_matches_transformers(tmp_path):
    ours, theirs = pair("RobertaForMultipleChoice", tmp_path)
    ids, mask = padded_batch(seed=6, lengths=(9, 4, 6, 9, 2, 5))
    ids, mask = ids.view(2, 3, -1), mask.view(2, 3, -1)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        a = ours(ids, mask, labels=labels)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (2, 3)
    assert max_diff(a.logits, b.logits) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


def test_transformers_checkpoint_loads_here(tmp_path):
    hf_config = transformers.RobertaConfig(**CONFIG, num_labels=4)
    theirs = randomize(transformers.RobertaForSequenceClassification(hf_config), seed=9)
    theirs.save_pretrained(tmp_path)
    ours = roberta.RobertaForSequenceClassification.from_pretrained(tmp_path)
    ids, mask = padded_batch(seed=7)
    with torch.no_grad():
        assert max_diff(ours(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits) <= TOL


def test_named_heads_on_one_encoder(tmp_path):
    ours, _ = pair("RobertaForMaskedLM", tmp_path)
    ours.register_classification_head("mnli", 3)
    ours.register_classification_head("sts", 1)
    ids, mask = padded_batch(seed=8)
    with torch.no_grad():
        mnli, sts = ours.classify(ids, mask, head="mnli"), ours.classify(ids, mask, head="sts")
    assert mnli.shape == (4, 3) and sts.shape == (4, 1)
    ours.save_pretrained(tmp_path / "saved")
    again = roberta.RobertaForMaskedLM.from_pretrained(tmp_path / "saved")
    assert set(again.classification_heads) == {"mnli", "sts"}
    with torch.no_grad():
        assert torch.equal(again.classify(ids, mask, head="mnli"), mnli)
    with pytest.raises(RobertaError, match="no classification head named 'qnli'"):
        ours.classify(ids, mask, head="qnli")


def test_config_round_trips_through_transformers_config(tmp_path):
    ours = RobertaConfig.large(num_labels=3)
    ours.save(tmp_path / "config.json")
    theirs = transformers.RobertaConfig.from_pretrained(tmp_path)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "layer_norm_eps", "pad_token_id", "num_labels"):
        assert getattr(theirs, field) == getattr(ours, field), field
    theirs.save_pretrained(tmp_path / "hf")
    assert RobertaConfig.load(tmp_path / "hf" / "config.json") == ours
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "roberta"


def test_presets_have_the_published_sizes():
    with torch.device("meta"):  # shapes only: counting needs no memory and no initialisation
        base = roberta.RobertaForMaskedLM(RobertaConfig.base())
        hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**RobertaConfig.base().to_dict()))
        encoder = roberta.RobertaModel(RobertaConfig.base(), add_pooling_layer=False)
    assert base.num_parameters() == hf.num_parameters()
    assert 124e6 < encoder.num_parameters() < 125e6
    large = RobertaConfig.large()
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads, large.intermediate_size) == (
        24, 1024, 16, 4096)
    assert RobertaConfig.base().max_tokens == 512


def test_resize_token_embeddings_keeps_old_rows_and_ties_decoder(tmp_path):
    ours, _ = pair("RobertaForMaskedLM", tmp_path)
    ids, mask = padded_batch(seed=10)
    with torch.no_grad():
        before = ours(ids, mask).logits
    ours.resize_token_embeddings(310)
    with torch.no_grad():
        after = ours(ids, mask).logits
    assert after.shape[-1] == 310 and ours.config.vocab_size == 310
    assert max_diff(after[..., :300], before, mask) <= TOL
    new_ids = ids.clone()
    new_ids[0, 1] = 305
    ours(new_ids, mask)  # new ids are accepted
    ours.save_pretrained(tmp_path / "resized")
    again = transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "resized").eval()
    assert again.lm_head.decoder.weight.data_ptr() == again.roberta.embeddings.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        assert max_diff(again(input_ids=new_ids, attention_mask=mask).logits, ours(new_ids, mask).logits, mask) <= TOL


def test_pruning_a_head_equals_silencing_it(tmp_path):
    ours, _ = pair("RobertaModel", tmp_path)
    ids, mask = padded_batch(seed=11)
    silenced = roberta.RobertaModel.from_pretrained(tmp_path)
    d = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    with torch.no_grad():
        for layer, head in ((0, 1), (2, 0), (2, 3)):
            silenced.encoder.layer[layer].attention.output.dense.weight[:, head * d:(head + 1) * d] = 0
        expected = silenced(ids, mask).last_hidden_state
    ours.prune_heads({0: [1], 2: [0]})
    ours.prune_heads({2: [3]})  # original index, after another head of the layer is gone
    assert ours.encoder.layer[2].attention.self.num_heads == 2
    with torch.no_grad():
        assert max_diff(ours(ids, mask).last_hidden_state, expected, mask) <= TOL
    ours.save_pretrained(tmp_path / "pruned")
    again = roberta.RobertaModel.from_pretrained(tmp_path / "pruned")
    assert again.config.pruned_heads == {0: [1], 2: [0, 3]}
    with torch.no_grad():
        assert max_diff(again(ids, mask).last_hidden_state, expected, mask) <= TOL


def test_freeze_and_count_parameters(tmp_path):
    ours, _ = pair("RobertaForSequenceClassification", tmp_path)
    total = ours.num_parameters()
    ours.freeze("roberta.embeddings", "roberta.encoder.layer.0.")
    frozen = sum(p.numel() for n, p in ours.named_parameters()
                 if n.startswith(("roberta.embeddings", "roberta.encoder.layer.0.")))
    assert ours.num_parameters(trainable_only=True) == total - frozen
    ids, mask = padded_batch()
    ours(ids, mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    assert ours.roberta.embeddings.word_embeddings.weight.grad is None
    assert ours.classifier.out_proj.weight.grad is not None
    ours.unfreeze()
    assert ours.num_parameters(trainable_only=True) == total
    with pytest.raises(RobertaError, match="no parameter name starts with"):
        ours.freeze("nothing.like.this")


def test_bad_inputs_get_one_line_errors(tmp_path):
    ours, _ = pair("RobertaModel", tmp_path)
    too_long = torch.full((1, CONFIG["max_position_embeddings"] - 1), 5)
    with pytest.raises(RobertaError, match="39 tokens but this model takes at most 38") as e:
        ours(torch.cat([too_long[:, :38], torch.tensor([[5]])], dim=1))
    assert "\n" not in str(e.value)
    ours(too_long[:, :38])  # exactly the maximum is fine
    with pytest.raises(RobertaError, match="token id 300 is out of range"):
        ours(torch.tensor([[0, 300, 2]]))
    with pytest.raises(RobertaError, match="token id -1 is out of range"):
        ours(torch.tensor([[0, -1, 2]]))
    with pytest.raises(RobertaError, match="must be integer token ids"):
        ours(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(RobertaError, match="not a multiple"):
        RobertaConfig(hidden_size=65, num_attention_heads=2)

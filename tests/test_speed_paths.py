"""The fast paths give the plain paths' results, so speed work cannot change numbers unnoticed.

Plain = transformers' model on the padded batch (same weights), or our model one sequence at a time.
"""
import pytest
import torch
import transformers

import roberta
from roberta import RobertaConfig
from roberta.tokenizer import RobertaTokenizer
from roberta.inference import (extract_features_batched, length_batches, pad_batch,
                               reduce_precision)

from test_model import CONFIG as MODEL_CONFIG, TOL, pair as model_pair, randomize

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


@pytest.mark.parametrize("precision, min_cosine", [("bf16", 0.999), ("int8", 0.99)])
def test_reduced_precision_stays_close_to_float32(precision, min_cosine):
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
        assert not isinstance(model.encoder.layer[0].attention.self.query, torch.nn.Linear)
    else:
        assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_unknown_precision_is_refused():
    model = roberta.RobertaModel(RobertaConfig.tiny())
    with pytest.raises(roberta.RobertaError, match="precision"):
        reduce_precision(model, "fp8")


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

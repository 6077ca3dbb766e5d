"""The shared training layer (roberta/train.py): schedule, settings grammar, optimizer groups,
accumulation, checkpoint checksums."""
import dataclasses
import json

import pytest
import torch

from roberta.errors import RobertaError
from roberta.finetune import Recipe, recipe_for
from roberta.model import RobertaConfig, RobertaForSequenceClassification
from roberta.pretrain import PretrainConfig
from roberta.train import (Dist, adamw, lr_at, micro_steps, precision_context, save_checkpoint, train_step,
                           verify_dir)


class FairseqPolynomialDecay:
    """fairseq's `PolynomialDecaySchedule` (fairseq/optim/lr_scheduler/polynomial_decay_schedule.py)
    as its trainer drives it: `step_update(0)` right after the optimizer is built, then
    `step_update(num_updates)` after every update. Transcribed from its formula, power 1, end lr 0."""

    def __init__(self, lr, warmup_updates, total_num_update, power=1.0, end_learning_rate=0.0):
        self.peak, self.warmup, self.total = lr, warmup_updates, total_num_update
        self.power, self.end = power, end_learning_rate
        self.lr = self.peak * (1.0 / warmup_updates if warmup_updates > 0 else 1)

    def step_update(self, num_updates):
        if self.warmup > 0 and num_updates <= self.warmup:
            self.lr = num_updates / float(self.warmup) * self.peak
        elif num_updates >= self.total:
            self.lr = self.end
        else:
            pct_remaining = 1 - (num_updates - self.warmup) / (self.total - self.warmup)
            self.lr = (self.peak - self.end) * pct_remaining ** self.power + self.end
        return self.lr


@pytest.mark.parametrize("warmup,total", [(4, 10), (0, 7), (122, 2036), (1, 1), (10, 10), (6, 100)])
def test_schedule_equals_fairseq_polynomial_decay_at_every_update(warmup, total):
    fairseq = FairseqPolynomialDecay(2e-5, warmup, total)
    fairseq.step_update(0)
    for update in range(total + 3):  # the rate each update runs at, and a few past the end
        assert lr_at(update, 2e-5, warmup, total) == pytest.approx(fairseq.lr, rel=1e-12, abs=1e-18), update
        fairseq.step_update(update + 1)
    # the example: warmup 4, total 10, the last update no longer runs at 0
    assert [round(lr_at(u, 1.0, 4, 10), 2) for u in range(10)] == [0, .25, .5, .75, 1, .83, .67, .5, .33, .17]


def test_one_settings_vocabulary_and_grammar_for_both_scripts(capsys):
    pre, ft = PretrainConfig.preset("small"), recipe_for("RTE")
    shared = {"lr", "batch_size", "update_freq", "adam_betas", "adam_eps", "weight_decay", "clip_norm",
              "warmup_updates", "total_updates", "precision", "dropout", "max_len", "seed", "log_every", "device"}
    for cfg in (pre, ft):
        assert shared <= {f.name for f in dataclasses.fields(cfg)}
        changed = cfg.with_sets(["adam_betas=0.9,0.999", "lr=3e-4", "clip_norm=1", "precision=bf16"])
        assert (changed.adam_betas, changed.lr, changed.clip_norm, changed.precision) == ((0.9, 0.999), 3e-4, 1.0, "bf16")
        assert cfg.with_sets(["adam_betas=[0.9, 0.98]"]).adam_betas == (0.9, 0.98)  # the JSON form too
        # the old names of either script still work, and say what the new name is
        old = cfg.with_sets(["betas=0.8,0.9", "eps=1e-8", "clip_grad=0.5", "warmup_steps=7", "max_steps=70"])
        assert (old.adam_betas, old.adam_eps, old.clip_norm, old.warmup_updates, old.total_updates) == \
            ((0.8, 0.9), 1e-8, 0.5, 7, 70)
        assert "'clip_grad' is now called 'clip_norm'" in capsys.readouterr().out
    assert "lr=" in PretrainConfig.help_text() and "update_freq=" in Recipe.help_text()


@pytest.mark.parametrize("cls,setting,message", [
    (PretrainConfig, "micro_batch_size=-1", "micro_batch_size=-1 is out of range"),
    (PretrainConfig, "batch_size=0", "batch_size=0 is out of range"),
    (PretrainConfig, "mask_prob=2", "mask_prob=2.0 is out of range"),
    (PretrainConfig, "lr=abc", "lr='abc' is not a valid float"),
    (PretrainConfig, "lr=nan", "lr=nan is out of range"),
    (PretrainConfig, "fsdp=maybe", "fsdp='maybe' is not a valid bool"),
    (PretrainConfig, "precision=fp8", "precision='fp8' is not one of fp32, bf16, fp16"),
    (PretrainConfig, "adam_betas=0.9", "adam_betas='0.9' is not a valid"),
    (PretrainConfig, "total_updates=1.5", "total_updates='1.5' is not a valid int"),
    (PretrainConfig, "learning_rate=1", "unknown pretraining setting 'learning_rate'"),
    (PretrainConfig, "lr", "expected KEY=VALUE"),
    (Recipe, "lr=-1", "lr=-1.0 is out of range"),
    (Recipe, "batch_size=0", "batch_size=0 is out of range"),
    (Recipe, "update_freq=0", "update_freq=0 is out of range"),
    (Recipe, "max_len=100000", "max_len=100000 is out of range"),
    (Recipe, "patience=-2", "patience=-2 is out of range"),
    (Recipe, "problem_type=ranking", "problem_type='ranking' is not one of"),
])
def test_bad_settings_are_refused_when_built(cls, setting, message):
    cfg = PretrainConfig.preset("tiny") if cls is PretrainConfig else recipe_for("RTE")
    with pytest.raises(RobertaError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cfg.with_sets([setting])


def test_adamw_exempts_biases_and_layer_norms_from_weight_decay():
    model = RobertaForSequenceClassification(RobertaConfig.tiny(num_labels=2))
    optimizer = adamw(model, 1e-3, (0.9, 0.98), 1e-6, 0.1)
    decayed, exempt = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in exempt["params"]} == {"bias", "weight"}  # LayerNorm weights
    assert optimizer.defaults["fused"] is True  # float32 on CPU: the fused kernel


def test_micro_steps_split_a_global_batch():
    assert micro_steps(32, 0, 4, 1) == (8, 4) and micro_steps(32, 8, 0, 2) == (8, 2) and micro_steps(32, 0, 0, 1) == (32, 1)
    with pytest.raises(RobertaError, match="not a multiple"):
        micro_steps(30, 0, 4, 1)
    with pytest.raises(RobertaError, match="set one of"):
        micro_steps(32, 8, 2, 1)


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(4, 100, (n, 12), generator=g), "attention_mask": torch.ones(n, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32(precision):
    """The same loss and weights (float tolerance), with fp16 loss scaling in the loop too."""
    torch.manual_seed(0)
    reference = RobertaForSequenceClassification(RobertaConfig.tiny(num_labels=2, vocab_size=100,
                                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    models = [reference, RobertaForSequenceClassification(reference.config)]
    models[1].load_state_dict(reference.state_dict())
    whole = _batch(32, 1)
    parts = [{k: v[i * 8:(i + 1) * 8] for k, v in whole.items()} for i in range(4)]
    results = []
    for model, batches in zip(models, ([whole], parts)):
        optimizer = adamw(model, 1e-3, (0.9, 0.98), 1e-6, 0.01)
        autocast, scaler = precision_context(precision, torch.device("cpu"))
        results.append(train_step(model.train(), optimizer, scaler, autocast, batches, [len(b["labels"]) / 32 for b in batches],
                                  Dist(), 1.0, 0))
    # fp16 rounds each micro-batch's activations its own way; one Adam step moves a weight by up to lr
    rel, atol = (1e-5, 1e-6) if precision == "fp32" else (2e-3, 2e-3)
    assert results[0][0] == pytest.approx(results[1][0], rel=rel)  # loss
    assert results[0][1] == pytest.approx(results[1][1], rel=max(rel, 1e-4))  # gradient norm
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rel, atol=atol, msg=name)


def test_checkpoint_checksums_catch_a_flipped_bit(tmp_path):
    model = RobertaForSequenceClassification(RobertaConfig.tiny(num_labels=2, vocab_size=100))
    optimizer = adamw(model, 1e-3, (0.9, 0.98), 1e-6, 0.01)
    _, scaler = precision_context("fp32", torch.device("cpu"))
    save_checkpoint(tmp_path, 3, model, optimizer, scaler, Dist(), 1, {"best": 0.5},
                    lambda state, d: model.save_pretrained(d))
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert set(json.loads((ckpt / "checksums.json").read_text())) == {"config.json", "model.safetensors", "trainer.pt"}
    verify_dir(ckpt)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(RobertaError, match="model.safetensors does not match its checksum.*remove it"):
        verify_dir(ckpt)


def test_a_resume_with_another_thread_count_says_so_and_how_to_be_exact(tmp_path, recwarn):
    from roberta.errors import RobertaWarning
    from roberta.train import load_checkpoint

    model = RobertaForSequenceClassification(RobertaConfig.tiny(num_labels=2, vocab_size=100))
    optimizer = adamw(model, 1e-3, (0.9, 0.98), 1e-6, 0.01)
    _, scaler = precision_context("fp32", torch.device("cpu"))
    threads = torch.get_num_threads()
    save_checkpoint(tmp_path, 3, model, optimizer, scaler, Dist(), 1, {}, lambda state, d: model.save_pretrained(d))
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert load_checkpoint(ckpt, model, optimizer, scaler, Dist())["numerics"]["threads"] == threads
    assert not [w for w in recwarn.list if issubclass(w.category, RobertaWarning)]  # the same conditions: silent
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(RobertaWarning, match=f"threads \\({threads} then, {threads + 1} now\\).*--threads {threads} "
                                                "for a bitwise-exact resume"):
            load_checkpoint(ckpt, model, optimizer, scaler, Dist())
    finally:
        torch.set_num_threads(threads)

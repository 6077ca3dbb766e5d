"""Checkpoints: fairseq imports in both key layouts, transformers' files, and every way a file can be bad."""
import argparse
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import roberta
from roberta import RobertaConfig, RobertaError, RobertaForMaskedLM, RobertaForSequenceClassification
from roberta.checkpoint import read_checkpoint
from test_model import CONFIG, max_diff, padded_batch, randomize


@pytest.fixture
def mlm():
    model = RobertaForMaskedLM(RobertaConfig(**CONFIG))
    model.register_classification_head("mnli", 3)
    return randomize(model, seed=3)


def fairseq_keys(model, layout):
    """fairseq's names for our weights, written out by hand from fairseq's TransformerSentenceEncoder."""
    sd = model.state_dict()
    top = "encoder" if layout == "current" else "decoder"
    se = f"{top}.sentence_encoder"
    emb_ln = "layernorm_embedding" if layout == "current" else "emb_layer_norm"
    out = {
        f"{se}.embed_tokens.weight": sd["roberta.embeddings.word_embeddings.weight"],
        # fairseq has no segment embedding; its single row folds exactly into every position row
        f"{se}.embed_positions.weight": sd["roberta.embeddings.position_embeddings.weight"]
        + sd["roberta.embeddings.token_type_embeddings.weight"][0],
        f"{se}.{emb_ln}.weight": sd["roberta.embeddings.LayerNorm.weight"],
        f"{se}.{emb_ln}.bias": sd["roberta.embeddings.LayerNorm.bias"],
        f"{se}.version": torch.tensor([2.0]),
        f"{top}.lm_head.weight": sd["roberta.embeddings.word_embeddings.weight"],
        f"{top}.lm_head.bias": sd["lm_head.bias"],
        f"{top}.lm_head.dense.weight": sd["lm_head.dense.weight"],
        f"{top}.lm_head.dense.bias": sd["lm_head.dense.bias"],
        f"{top}.lm_head.layer_norm.weight": sd["lm_head.layer_norm.weight"],
        f"{top}.lm_head.layer_norm.bias": sd["lm_head.layer_norm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        h, f = f"roberta.encoder.layer.{i}.", f"{se}.layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = (sd[f"{h}attention.self.{n}.{p}"] for n in ("query", "key", "value"))
            if layout == "current":
                out[f"{f}self_attn.q_proj.{p}"], out[f"{f}self_attn.k_proj.{p}"], out[f"{f}self_attn.v_proj.{p}"] = q, k, v
            else:
                out[f"{f}self_attn.in_proj_{p}"] = torch.cat([q, k, v])
            out[f"{f}self_attn.out_proj.{p}"] = sd[f"{h}attention.output.dense.{p}"]
            out[f"{f}self_attn_layer_norm.{p}"] = sd[f"{h}attention.output.LayerNorm.{p}"]
            out[f"{f}fc1.{p}"] = sd[f"{h}intermediate.dense.{p}"]
            out[f"{f}fc2.{p}"] = sd[f"{h}output.dense.{p}"]
            out[f"{f}final_layer_norm.{p}"] = sd[f"{h}output.LayerNorm.{p}"]
    for name in ("dense", "out_proj"):
        for p in ("weight", "bias"):
            out[f"classification_heads.mnli.{name}.{p}"] = sd[f"classification_heads.mnli.{name}.{p}"]
    return {k: v.clone() for k, v in out.items()}


class _FakeOmegaConf:
    """Pickles like omegaconf's DictConfig does (module path and `_content` state), without omegaconf."""

    def __init__(self, content):
        self._content = content

    def __reduce__(self):
        return (_FakeOmegaConf, (None,), {"_content": self._content, "_metadata": None})


def write_fairseq(model, directory, layout):
    directory.mkdir(parents=True, exist_ok=True)
    hp = dict(encoder_layers=CONFIG["num_hidden_layers"], encoder_embed_dim=CONFIG["hidden_size"],
              encoder_attention_heads=CONFIG["num_attention_heads"], dropout=0.1, attention_dropout=0.1,
              activation_fn="gelu", max_positions=CONFIG["max_position_embeddings"] - 2)
    if layout == "2019":
        payload = {"args": argparse.Namespace(**hp), "model": fairseq_keys(model, layout)}
    else:
        # fairseq >= 0.10 stores an omegaconf config under 'cfg'; pretend to be omegaconf for the pickle
        fake = types.ModuleType("omegaconf.dictconfig")
        _FakeOmegaConf.__module__, _FakeOmegaConf.__qualname__ = "omegaconf.dictconfig", "DictConfig"
        fake.DictConfig = _FakeOmegaConf
        parent = types.ModuleType("omegaconf")
        parent.dictconfig = fake
        sys.modules.update({"omegaconf": parent, "omegaconf.dictconfig": fake})
        try:
            cfg = _FakeOmegaConf({"model": _FakeOmegaConf(hp), "task": _FakeOmegaConf({"_name": "masked_lm"})})
            payload = {"args": None, "cfg": cfg, "model": fairseq_keys(model, layout), "optimizer_history": []}
            torch.save(payload, directory / "model.pt")
        finally:
            del sys.modules["omegaconf.dictconfig"], sys.modules["omegaconf"]
            _FakeOmegaConf.__module__, _FakeOmegaConf.__qualname__ = __name__, "_FakeOmegaConf"
        return
    torch.save(payload, directory / "model.pt")


@pytest.mark.parametrize("layout", ["current", "2019"])
def test_fairseq_checkpoint_loads_to_the_same_outputs(tmp_path, mlm, layout):
    write_fairseq(mlm, tmp_path / "fs", layout)
    loaded = RobertaForMaskedLM.from_pretrained(tmp_path / "fs")
    assert loaded.config.num_attention_heads == CONFIG["num_attention_heads"]
    assert loaded.config.classification_heads == {"mnli": 3}
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        assert max_diff(loaded(ids, mask).logits, mlm(ids, mask).logits, mask) <= 1e-5
        assert max_diff(loaded.classify(ids, mask, head="mnli"), mlm.classify(ids, mask, head="mnli")) <= 1e-5
    # the same file as a sequence classifier: the mnli head becomes its classifier
    cls = RobertaForSequenceClassification.from_pretrained(tmp_path / "fs" / "model.pt")
    assert cls.config.head_name == "mnli" and cls.config.num_labels == 3
    with torch.no_grad():
        assert max_diff(cls(ids, mask).logits, mlm.classify(ids, mask, head="mnli")) <= 1e-5


def test_saved_classifier_is_a_named_head_for_the_masked_lm_model(tmp_path, mlm):
    cls = randomize(RobertaForSequenceClassification(RobertaConfig(**CONFIG, num_labels=2, head_name="sst2")))
    cls.save_pretrained(tmp_path)
    hub_model = RobertaForMaskedLM.from_pretrained(tmp_path)  # lm_head absent: initialised fresh
    assert "lm_head.bias" in hub_model.missing_keys
    ids, mask = padded_batch()
    with torch.no_grad():
        assert max_diff(hub_model.classify(ids, mask, head="sst2"), cls(ids, mask).logits) <= 1e-5


def test_pytorch_bin_from_transformers_loads_with_weights_only(tmp_path):
    theirs = randomize(transformers.RobertaForMaskedLM(transformers.RobertaConfig(**CONFIG)), seed=5)
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = RobertaForMaskedLM.from_pretrained(tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert max_diff(ours(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, mlm, name):
    marker = tmp_path / "pwned"
    directory = tmp_path / "ckpt"
    directory.mkdir()
    if name == "pytorch_model.bin":
        RobertaConfig(**CONFIG).save(directory / "config.json")
    payload = {"model": {"x": torch.zeros(1)}, "args": _RunsCode(marker)}
    with open(directory / name, "wb") as f:
        pickle.dump(payload, f)  # a legacy (non-zip) pickle
    with pytest.raises(RobertaError, match="refused") as e:
        RobertaForMaskedLM.from_pretrained(directory)
    assert not marker.exists()
    assert "\n" not in str(e.value)
    torch.save(payload, directory / name)  # and the zip format
    with pytest.raises(RobertaError, match="refused"):
        RobertaForMaskedLM.from_pretrained(directory)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(RobertaError, match="does not exist"):
        RobertaForMaskedLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(RobertaError, match=r"is not a model: it has neither config.json \(Hugging Face\) nor model.pt \(fairseq\); pass a checkpoint directory$"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RobertaError, match="is a file"):
        RobertaForMaskedLM.from_pretrained(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RobertaError, match="not valid JSON"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RobertaError, match="not RoBERTa"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    RobertaConfig(**CONFIG).save(tmp_path / "config.json")
    with pytest.raises(RobertaError, match="has config.json but no weights"):
        RobertaForMaskedLM.from_pretrained(tmp_path)


def test_shapes_that_do_not_fit_the_config(tmp_path, mlm):
    mlm.save_pretrained(tmp_path)
    RobertaConfig(**{**CONFIG, "intermediate_size": 80}).save(tmp_path / "config.json")
    with pytest.raises(RobertaError, match=r"intermediate_size, hidden_size = 80, 64 but the weights hold "
                                           r"roberta.encoder.layer.0.intermediate.dense.weight of shape \[96, 64\]"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    RobertaConfig(**{**CONFIG, "num_hidden_layers": 4}).save(tmp_path / "config.json")
    with pytest.raises(RobertaError, match="num_hidden_layers = 4 but the weights hold 3 layers"):
        RobertaForMaskedLM.from_pretrained(tmp_path)


def test_vocabulary_larger_than_the_embedding_table(tmp_path, mlm):
    mlm.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(CONFIG["vocab_size"] + 5)}))
    with pytest.raises(RobertaError, match="has 305 tokens but the model's embedding table has 300 rows"):
        RobertaForMaskedLM.from_pretrained(tmp_path)


def test_truncated_or_corrupted_weights(tmp_path, mlm):
    mlm.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RobertaError, match="truncated or corrupted"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    weights.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(RobertaError, match="truncated or corrupted"):
        RobertaForMaskedLM.from_pretrained(tmp_path)
    write_fairseq(mlm, tmp_path / "fs", "2019")
    pt = tmp_path / "fs" / "model.pt"
    pt.write_bytes(pt.read_bytes()[:3000])
    with pytest.raises(RobertaError, match="truncated or corrupted"):
        RobertaForMaskedLM.from_pretrained(tmp_path / "fs")


def test_saving_writes_whole_files_only(tmp_path, mlm):
    mlm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.decoder.weight" not in state  # tied: stored once, as the word embeddings
    config, state = read_checkpoint(tmp_path)
    assert config.classification_heads == {"mnli": 3}


def test_convert_fairseq_to_hf_and_back(tmp_path, bpe_dir):
    """The published path: a fairseq release (model.pt, dict.txt, GPT-2 BPE files) to a transformers dir."""
    import shutil
    import subprocess

    big = RobertaConfig(**{**CONFIG, "vocab_size": 50265})
    model = RobertaForMaskedLM(big)
    model.register_classification_head("mnli", 3)
    randomize(model, seed=4)
    src = tmp_path / "roberta.tiny"
    write_fairseq(model, src, "2019")
    for name in ("dict.txt", "encoder.json", "vocab.bpe"):
        shutil.copy(bpe_dir / name, src / name)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "roberta", "convert", str(src), str(tmp_path / "hf")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    theirs = transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.RobertaTokenizerFast(vocab=str(tmp_path / "hf" / "vocab.json"),
                                            merges=str(tmp_path / "hf" / "merges.txt"))
    batch = tok(["Hello world!", "A longer sentence, with more tokens."], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:5] == [0, 31414, 232, 328, 2]
    imported = RobertaForMaskedLM.from_pretrained(src)
    with torch.no_grad():
        ours = imported(batch["input_ids"], batch["attention_mask"]).logits
        ref = theirs(**batch).logits
        original = model(batch["input_ids"], batch["attention_mask"]).logits
    assert max_diff(ours, ref, batch["attention_mask"]) <= 1e-5
    # the writer folded the segment row into the positions, which only changes rounding
    assert max_diff(ours, original, batch["attention_mask"]) <= 1e-4
    # and back to fairseq's current layout, which loads to the same model again
    run = subprocess.run([sys.executable, "-m", "roberta", "convert", str(tmp_path / "hf"), str(tmp_path / "fs2"),
                          "--to", "fairseq"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    again = RobertaForMaskedLM.from_pretrained(tmp_path / "fs2")
    with torch.no_grad():
        assert max_diff(again(batch["input_ids"], batch["attention_mask"]).logits, ours, batch["attention_mask"]) <= 1e-5
        assert max_diff(again.classify(batch["input_ids"], head="mnli"),
                        imported.classify(batch["input_ids"], head="mnli")) <= 1e-5
    bad = subprocess.run([sys.executable, "-m", "roberta", "convert", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_a_requested_label_count_gets_a_fresh_head(tmp_path, mlm):
    write_fairseq(mlm, tmp_path / "fs", "current")
    kept = RobertaForSequenceClassification.from_pretrained(tmp_path / "fs")  # the mnli head, 3 labels
    assert kept.config.num_labels == 3 and "classifier.out_proj.weight" not in kept.missing_keys
    fresh = RobertaForSequenceClassification.from_pretrained(tmp_path / "fs", num_labels=2)
    assert fresh.config.num_labels == 2 and "classifier.out_proj.weight" in fresh.missing_keys
    kept.save_pretrained(tmp_path / "cls")
    again = RobertaForSequenceClassification.from_pretrained(tmp_path / "cls", id2label={0: "neg", 1: "pos"})
    assert again.config.labels() == {0: "neg", 1: "pos"} and "classifier.out_proj.weight" in again.missing_keys


def test_a_model_is_built_on_meta_without_initialising_it(tmp_path, mlm):
    # the meta model has every parameter of the real one, and building it leaves random init of real
    # tensors (after it, and in another model) as it was
    from roberta.checkpoint import on_meta, parameter_count

    config = RobertaConfig.tiny()
    torch.manual_seed(3)
    real = RobertaForMaskedLM(config)
    shell = on_meta(RobertaForMaskedLM, config)
    assert all(p.is_meta for p in shell.parameters())
    assert [(n, p.shape) for n, p in shell.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert parameter_count(config) == real.num_parameters()
    torch.manual_seed(3)
    again = RobertaForMaskedLM(config)
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), again.state_dict().values()))
    # PyTorch's meta normal_ imports torch._dynamo (seconds, in every process that loads a model): a load
    # and a describe in a fresh process import it nowhere
    mlm.save_pretrained(tmp_path / "m")
    code = ("import sys, roberta; from roberta.checkpoint import load_model; from roberta.hub import describe; "
            f"load_model(roberta.RobertaForMaskedLM, {str(tmp_path / 'm')!r}); describe({str(tmp_path / 'm')!r}); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'none')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.stdout.split() == ["none"], result.stderr[-2000:]

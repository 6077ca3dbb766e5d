"""sentence-transformers directories, built in the test by sentence-transformers itself from the tiny
RoBERTa: `embed` and `roberta features` follow the directory's pooling and equal its `encode`."""
import json

import numpy as np
import pytest
import torch

import roberta
from roberta.cli import main

TEXTS = ["Hello world!", "A much longer sentence, with some punctuation; and more words in it.", "Hi",
         "Sentence embeddings average or pick token vectors. " * 6]


def build(src, dst, mode: str, normalize: bool, max_len: int = 24):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Normalize, Pooling, Transformer

    transformer = Transformer(str(src), max_seq_length=max_len)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), mode)] + ([Normalize()] if normalize else [])
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(dst))
    return model


@pytest.mark.parametrize("mode, normalize", [("mean", False), ("mean", True), ("cls", False), ("cls", True)])
def test_embeddings_equal_sentence_transformers(hub_checkpoints, tmp_path, mode, normalize, capsys):
    reference = build(hub_checkpoints["hf"], tmp_path / "st", mode, normalize)
    want = reference.encode(TEXTS, convert_to_numpy=True)
    hub = roberta.load(tmp_path / "st", precision="fp32")
    assert hub.pooling.mode == mode and hub.pooling.normalize == normalize and hub.pooling.max_tokens == 24
    got = hub.embed(TEXTS).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
    assert np.abs(hub.embed(TEXTS[0]).numpy() - want[0]).max() <= 1e-5
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    # the CLI: --pool left out follows the directory
    out = tmp_path / "vectors.npy"
    assert main(["features", "--precision", "fp32", "-m", str(tmp_path / "st"), "-o", str(out), *TEXTS]) == 0
    assert np.abs(np.load(out) - want).max() <= 1e-5


def test_older_layout_from_the_hub_and_explicit_overrides(hub_checkpoints, tmp_path):
    """sentence-transformers 2.x: the transformer in 0_Transformer/, one flag per pooling mode, max_seq_length
    in sentence_bert_config.json; served as a Hub repository."""
    from hub_helpers import HubServer, directory_files

    reference = build(hub_checkpoints["hf"], tmp_path / "st", "mean", False, max_len=60)
    st = tmp_path / "st"
    (st / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (st / name).rename(st / "0_Transformer" / name)
    (st / "sentence_bert_config.json").unlink()
    (st / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 60, "do_lower_case": False}))
    modules = json.loads((st / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    want = reference.encode(TEXTS, convert_to_numpy=True)
    with HubServer() as hub:
        hub.add("org/st-old", directory_files(st))
        model = roberta.load("org/st-old", cache_dir=tmp_path / "hf", base_url=hub.url, progress=False, precision="fp32")
    assert (model.pooling.mode, model.pooling.normalize, model.pooling.max_tokens) == ("mean", False, 60)
    assert np.abs(model.embed(TEXTS).numpy() - want).max() <= 1e-5
    assert np.abs(roberta.load(st, precision="fp32").embed(TEXTS).numpy() - want).max() <= 1e-5
    cls = model.embed(TEXTS, pool="cls")
    torch.testing.assert_close(cls[1], model.extract_features(model.encode(TEXTS[1]))[0, 0], rtol=0, atol=1e-6)
    plain = roberta.load(hub_checkpoints["hf"], precision="fp32")  # not a sentence-transformers directory: <s> vector
    assert plain.pooling is None
    torch.testing.assert_close(plain.embed("Hi"), plain.extract_features(plain.encode("Hi"))[0, 0])


def test_unsupported_modules_are_one_line_errors(hub_checkpoints, tmp_path):
    from roberta.errors import RobertaError

    build(hub_checkpoints["hf"], tmp_path / "st", "mean", False)
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(RobertaError, match="modules Transformer, Pooling, Dense; only Transformer, Pooling"):
        roberta.load(tmp_path / "st", precision="fp32")

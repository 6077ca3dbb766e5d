"""`roberta export --onnx`: the ONNX file computes this project's outputs, checked with ONNX Runtime."""
import json

import pytest
import torch

import roberta
from roberta.cli import main

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(hub_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert main(["export", "-m", str(hub_checkpoints["hf"]), "--onnx", str(out), "--offline"]) == 0
    return out


def batch(lengths, left, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.ones(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(T - n, T) if left else slice(0, n)
        ids[row, cols] = torch.randint(4, 1000, (n,), generator=g)
        ids[row, cols.start], ids[row, cols.stop - 1] = 0, 2
        mask[row, cols] = 1
    return ids, mask


@pytest.mark.parametrize("lengths, left", [([5, 31, 12], False), ([64, 3, 40, 17, 9], True), ([1], False)])
def test_onnx_runtime_gives_our_outputs_for_any_batch_and_length(exported, hub_checkpoints, lengths, left):
    meta = json.loads((exported / "onnx.json").read_text())
    assert meta["outputs"] == ["last_hidden_state", "logits_mnli"] and meta["heads"] == {"mnli": 3}
    assert meta["task"] == "sequence-classification"
    hub = roberta.load(hub_checkpoints["hf"], precision="fp32")
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = batch(lengths, left, seed=len(lengths))
    hidden, logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ours = hub.model.roberta(ids, mask).last_hidden_state
        ours_logits = hub.model.classify(ids, mask, head="mnli")
    assert hidden.shape == tuple(ours.shape) and logits.shape == (len(lengths), 3)
    assert abs(torch.from_numpy(hidden) - ours).max().item() <= 1e-4
    assert abs(torch.from_numpy(logits) - ours_logits).max().item() <= 1e-4
    assert (exported / "vocab.json").is_file() and (exported / "config.json").is_file()


def test_export_refuses_an_existing_or_unreachable_directory(exported, hub_checkpoints, tmp_path, capsys):
    model = str(hub_checkpoints["hf"])
    assert main(["export", "-m", model, "--onnx", str(exported)]) == 2
    assert main(["export", "-m", model, "--onnx", str(tmp_path / "missing" / "onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: ") and "already exists" in err[0] and "create it first" in err[1]


def test_onnx_outputs_name_their_dimensions(exported, hub_checkpoints):
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(exported / "model.onnx")).graph
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    hidden = roberta.RobertaConfig.load(hub_checkpoints["hf"] / "config.json").hidden_size
    assert dims == {"last_hidden_state": ["batch", "length", hidden], "logits_mnli": ["batch", 3]}


@pytest.mark.parametrize("cls_name", ["RobertaForTokenClassification", "RobertaForQuestionAnswering"])
def test_a_tagger_and_a_reader_export_with_their_heads(hub_checkpoints, bpe_dir, tmp_path, cls_name):
    """A token-classification checkpoint exports its per-token logits (and its labels in onnx.json), a
    question-answering one its start and end scores: ONNX Runtime gives this project's outputs for a
    batch with left padding, whose pads score float32's lowest in both."""
    import dataclasses

    config = roberta.RobertaConfig.load(hub_checkpoints["hf"] / "config.json")
    if cls_name == "RobertaForTokenClassification":
        config = dataclasses.replace(config, num_labels=3, id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    torch.manual_seed(0)
    model = getattr(roberta, cls_name)(config).eval()
    model.save_pretrained(tmp_path / "model", tokenizer=roberta.RobertaTokenizer.from_pretrained(bpe_dir))
    assert main(["export", "-m", str(tmp_path / "model"), "--onnx", str(tmp_path / "onnx"), "--offline"]) == 0
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = batch([9, 30, 4], left=True, seed=3)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ours = model(ids, mask)
    if cls_name == "RobertaForTokenClassification":
        assert meta["task"] == "token-classification" and meta["labels"] == ["O", "B-PER", "I-PER"]
        expected = {"last_hidden_state": ours.last_hidden_state, "logits": ours.logits}
    else:
        assert meta["task"] == "question-answering" and "labels" not in meta
        expected = {"last_hidden_state": ours.last_hidden_state, "start_logits": ours.start_logits,
                    "end_logits": ours.end_logits}
        assert (got[1][~mask.bool().numpy()] == torch.finfo(torch.float32).min).all()
    assert meta["outputs"] == list(expected) and meta["heads"] == {}
    for name, value in zip(meta["outputs"], got):
        real = mask.bool()
        assert value.shape == tuple(expected[name].shape), name
        assert abs(torch.from_numpy(value)[real] - expected[name][real]).max().item() <= 1e-4, name

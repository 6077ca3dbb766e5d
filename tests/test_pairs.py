"""Zero-shot classification and cross-encoder reranking against their references: transformers'
zero-shot-classification pipeline and sentence-transformers' CrossEncoder, on tiny random-weight
models saved by those libraries with the real tokenizer; pairs longer than the model's limit included.
"""
import json

import numpy as np
import pytest
import torch

import roberta
from roberta.errors import RobertaError
from roberta.pairs import fit_pair

transformers = pytest.importorskip("transformers")

TEXTS = ["The movie was a delight from start to finish.", "Prices rose sharply in the third quarter.",
         "A man is sleeping on the couch while the television is on.", "Why?"]
LABELS = ["cinema", "economy", "sleep", "questions"]
LONG = " ".join(["the long passage goes on"] * 30)  # ~150 tokens: past both models' limits
QUERY = "Which film did the critics love?"


def tiny_classifier(directory, bpe_dir, id2label, max_length):
    """A RobertaForSequenceClassification saved by transformers, with the real tokenizer."""
    torch.manual_seed(0)
    tokenizer = transformers.RobertaTokenizerFast.from_pretrained(bpe_dir, model_max_length=max_length)
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=66,
                                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = transformers.RobertaForSequenceClassification(config)
    with torch.no_grad():  # logits far enough apart that the scores differ
        model.classifier.out_proj.weight.normal_(0, 2)
        model.classifier.out_proj.bias.normal_()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory, bpe_dir):
    return tiny_classifier(tmp_path_factory.mktemp("nli") / "model", bpe_dir,
                           {0: "contradiction", 1: "neutral", 2: "entailment"}, 64)


@pytest.fixture(scope="module")
def cross_dir(tmp_path_factory, bpe_dir):
    """A CrossEncoder directory as sentence-transformers saves one: max_length 40 (under the model's 64)."""
    from sentence_transformers import CrossEncoder

    plain = tiny_classifier(tmp_path_factory.mktemp("plain") / "model", bpe_dir, {0: "LABEL_0"}, 64)
    directory = tmp_path_factory.mktemp("cross") / "model"
    CrossEncoder(str(plain), max_length=40).save(str(directory))
    return directory


def test_zero_shot_equals_the_transformers_pipeline(nli_dir):
    pipeline = transformers.pipeline("zero-shot-classification", model=str(nli_dir), device="cpu")
    hub = roberta.load(nli_dir, precision="fp32")
    texts = TEXTS + [LONG]  # the long one is cut, the hypothesis kept, as the pipeline's only_first does
    for multi_label in (False, True):
        for template in ("This example is {}.", "The topic is {}"):
            want = pipeline(texts, candidate_labels=LABELS, hypothesis_template=template, multi_label=multi_label)
            got = hub.zero_shot(texts, LABELS, hypothesis_template=template, multi_label=multi_label)
            for w, g in zip(want, got):
                assert g["sequence"] == w["sequence"] and g["labels"] == w["labels"]
                np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5, rtol=0)
            if not multi_label:
                assert all(abs(sum(g["scores"]) - 1) < 1e-5 for g in got)
    # one label: the pipeline scores it against contradiction; a comma-separated string of labels
    one = hub.zero_shot(TEXTS[0], "cinema")
    np.testing.assert_allclose(one["scores"], pipeline(TEXTS[0], candidate_labels="cinema")["scores"], atol=1e-5)
    listed = hub.zero_shot(TEXTS[1], "cinema, economy")
    assert sorted(listed["labels"]) == ["cinema", "economy"]


def test_zero_shot_refuses_a_head_without_entailment_and_bad_arguments(nli_dir, cross_dir, tmp_path):
    config = json.loads((nli_dir / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    other = tmp_path / "sentiment"
    other.mkdir()
    for f in nli_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps(config))
    hub = roberta.load(other, precision="fp32")
    with pytest.raises(RobertaError, match="no entailment class"):
        hub.zero_shot("a text", ["x", "y"])
    nli = roberta.load(nli_dir, precision="fp32")
    for labels, template, message in (([], "This is {}.", "at least one candidate label"),
                                      (["x"], "No slot.", "needs one {}"), (["x"], "{0} {1}", "needs one {}"),
                                      (["x"], "{label}", "needs one {}")):
        with pytest.raises(RobertaError, match=message):
            nli.zero_shot("a text", labels, hypothesis_template=template)
    with pytest.raises(RobertaError, match="no room for the text"):
        nli.zero_shot("a text", [LONG])
    with pytest.raises(RobertaError, match="a cross-encoder scores with one"):
        nli.rerank("q", ["a"])


def test_cross_encoder_directory_rerank_equals_sentence_transformers(cross_dir):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(cross_dir))
    hub = roberta.load(cross_dir, precision="fp32")
    assert hub.cross_encoder.activation == "Sigmoid" and hub.cross_encoder.max_tokens == 40 == reference.max_seq_length
    texts = TEXTS + [LONG, "Critics loved the film. " + LONG, LONG + " The critics loved it."]
    want = reference.rank(QUERY, texts, return_documents=True)
    got = hub.rerank(QUERY, texts, return_documents=True)
    assert [g["corpus_id"] for g in got] == [w["corpus_id"] for w in want]
    assert [g["text"] for g in got] == [w["text"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5, rtol=0)
    assert [g["corpus_id"] for g in hub.rerank(QUERY, texts, top_k=2)] == [w["corpus_id"] for w in want[:2]]
    # predict on pairs where both sides are long (the budget split between them), and a long query
    pairs = [(LONG, LONG + " more"), (LONG + " and more and more", "short"), ("short", LONG), (TEXTS[0], TEXTS[1])]
    np.testing.assert_allclose(hub.score_pairs(pairs).numpy(), reference.predict(pairs), atol=1e-5, rtol=0)
    # the raw logits under the directory's own activation (Identity), as CrossEncoder reads it
    identity = torch.nn.Identity()
    np.testing.assert_allclose(hub.score_pairs(pairs, raw=True).numpy(),
                               reference.predict(pairs, activation_fn=identity), atol=1e-5, rtol=0)


def test_an_identity_cross_encoder_and_a_plain_one_output_classifier(cross_dir, tmp_path, bpe_dir):
    from sentence_transformers import CrossEncoder

    identity_dir = tmp_path / "identity"
    CrossEncoder(str(cross_dir), activation_fn=torch.nn.Identity()).save(str(identity_dir))
    reference = CrossEncoder(str(identity_dir))
    hub = roberta.load(identity_dir, precision="fp32")
    assert hub.cross_encoder.activation == "Identity"
    pairs = [(QUERY, t) for t in TEXTS + [LONG]]
    np.testing.assert_allclose(hub.score_pairs(pairs).numpy(), reference.predict(pairs), atol=1e-5, rtol=0)
    # a one-output transformers classifier without sentence-transformers' files: CrossEncoder's defaults
    plain = tiny_classifier(tmp_path / "plain", bpe_dir, {0: "LABEL_0"}, 48)
    reference, hub = CrossEncoder(str(plain)), roberta.load(plain, precision="fp32")
    assert hub.cross_encoder.max_tokens == 48 == reference.max_seq_length
    np.testing.assert_allclose(hub.score_pairs(pairs).numpy(), reference.predict(pairs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n1, n2, limit", [(3, 4, 20), (30, 4, 20), (4, 30, 20), (30, 30, 20), (30, 31, 21),
                                           (10, 9, 20), (9, 10, 20), (16, 1, 20), (1, 17, 20)])
def test_fit_pair_cuts_as_the_hugging_face_tokenizer_does(bpe_dir, n1, n2, limit):
    tokenizer = transformers.RobertaTokenizerFast.from_pretrained(bpe_dir)
    first, second = " ".join(["a"] * n1), " ".join(["b"] * n2)
    want = tokenizer(first, second, truncation="longest_first", max_length=limit)["input_ids"]
    a, b = fit_pair(tokenizer(first, add_special_tokens=False)["input_ids"],
                    tokenizer(second, add_special_tokens=False)["input_ids"], limit)
    assert [0, *a, 2, 2, *b, 2] == want


def test_the_command_line_prints_what_the_library_gives(nli_dir, cross_dir, capsys):
    from roberta.cli import main

    nli, cross = roberta.load(nli_dir, precision="fp32"), roberta.load(cross_dir, precision="fp32")
    assert main(["zero-shot", "-m", str(nli_dir), "--precision", "fp32", "--labels", ",".join(LABELS), "--json",
                 "--multi-label", *TEXTS[:2]]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for g, w in zip(got, nli.zero_shot(TEXTS[:2], LABELS, multi_label=True)):
        assert g["labels"] == w["labels"]
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-6)
    assert main(["rerank", "-m", str(cross_dir), "--precision", "fp32", "--query", QUERY, "--top-k", "3",
                 *TEXTS]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    want = cross.rerank(QUERY, TEXTS, top_k=3)
    assert [int(i) for i, _, _ in lines] == [w["corpus_id"] for w in want]
    assert [t for _, _, t in lines] == [TEXTS[w["corpus_id"]] for w in want]
    np.testing.assert_allclose([float(s) for _, s, _ in lines], [w["score"] for w in want], atol=1e-4)
    assert main(["info", "-m", str(cross_dir)]) == 0
    assert "scores      Sigmoid of one output, max 40 tokens" in capsys.readouterr().out
    assert main(["zero-shot", "-m", str(cross_dir), "--precision", "fp32", "--labels", "a,b", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no entailment class" in err and err.count("\n") == 1, err
    assert main(["rerank", "-m", str(nli_dir), "--precision", "fp32", "--query", "q", "x"]) == 2
    assert "a cross-encoder scores with one" in capsys.readouterr().err


def test_a_served_cross_encoder_ranks_as_sentence_transformers_and_post_root_reranks(cross_dir, nli_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from sentence_transformers import CrossEncoder

    from roberta.serve import ServeSettings, create_app

    texts = TEXTS + [LONG]
    want = CrossEncoder(str(cross_dir)).rank(QUERY, texts)
    app = create_app(roberta.load(cross_dir, precision="fp32"), ServeSettings(max_wait_ms=0))
    with TestClient(app) as client:
        assert "reranker" in client.get("/info").json()["model_type"]  # one output: POST / is /rerank, as in TEI
        for path in ("/rerank", "/"):
            got = client.post(path, json={"query": QUERY, "texts": texts, "truncate": True}).json()
            assert [g["index"] for g in got] == [w["corpus_id"] for w in want]
            np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5, rtol=0)
        long = client.post("/rerank", json={"query": QUERY, "texts": [LONG]})  # past max_length 40, no truncate
        assert long.status_code == 413 and "at most 40" in long.json()["error"]
    # an NLI model served: /zero-shot equals the pipeline's numbers through the library
    nli = roberta.load(nli_dir, precision="fp32")
    with TestClient(create_app(nli, ServeSettings(max_wait_ms=0))) as client:
        got = client.post("/zero-shot", json={"inputs": TEXTS[:2], "candidate_labels": LABELS}).json()
        for g, w in zip(got, nli.zero_shot(TEXTS[:2], LABELS)):
            assert g["labels"] == w["labels"]
            np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5, rtol=0)

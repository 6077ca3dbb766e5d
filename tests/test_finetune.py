"""Fine-tuning and evaluation end to end on tiny models: SST-2 learns, RTE runs as pairs, SQuAD and
RACE run, heads reload and predict the same labels, recipes are the published ones."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import roberta
from roberta import finetune as ft
from roberta.cli import main
from roberta.errors import RobertaError
from roberta.inference import length_batches, pad_batch
from roberta.model import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification
from roberta.tokenizer import RobertaTokenizer

from conftest import shared_path


@pytest.fixture(scope="session")
def tokenizer(bpe_dir):
    return RobertaTokenizer.from_pretrained(bpe_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A tiny masked-LM checkpoint (2 x 64, 128 positions) with the real tokenizer, as pretraining
    writes one; fine-tuning keeps its encoder and adds a fresh head."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mlm")
    RobertaForMaskedLM(RobertaConfig.tiny(max_position_embeddings=130)).save_pretrained(path, tokenizer=tokenizer)
    return path


PRETRAIN_STEPS = 400


@pytest.fixture(scope="module")
def sst2_pretrained(tmp_path_factory):
    """A tiny masked LM pretrained with the project's own pipeline on unlabeled in-domain text: the
    SST-2 training sentences without their labels (in documents of 100) and WikiText-2 valid, a
    4K byte-level BPE trained on them (`preprocess`), then a short `pretrain` run."""
    from roberta.data import preprocess
    from roberta.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("sst2-pretrain")
    sentences = [line.split("\t")[0] for line in shared_path("glue", "SST-2", "train.tsv").read_text().splitlines()[1:]]
    corpus = root / "sst2-sentences.txt"
    corpus.write_text("\n\n".join("\n".join(sentences[i:i + 100]) for i in range(0, len(sentences), 100)) + "\n")
    preprocess([corpus, shared_path("corpus", "wikitext2-valid.txt")], root / "data", vocab_size=4096,
               valid_fraction=0.02, workers=2, progress=False)
    run = root / "run"
    pretrain(PretrainConfig.preset("tiny", data=str(root / "data"), max_len=64, batch_size=32, micro_batch_size=32,
                                   lr=3e-3, warmup_updates=30, total_updates=PRETRAIN_STEPS, dropout=0.0,
                                   val_every=PRETRAIN_STEPS, save_every=PRETRAIN_STEPS, threads=1, progress=False), run)
    return run



def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- recipes

def test_published_glue_recipes_and_overrides():
    r = ft.recipe_for("mnli")
    assert (r.task, r.lr, r.batch_size, r.total_updates, r.warmup_updates) == ("MNLI", None, 32, None, None)
    assert (r.max_epochs, r.weight_decay, r.adam_betas, r.adam_eps) == (10, 0.1, (0.9, 0.98), 1e-6)
    assert ft.published("mnli") == dict(lr=1e-5, batch_size=32, total_updates=123873, warmup_updates=7432)
    assert ft.published("RTE") == dict(lr=2e-5, batch_size=16, total_updates=2036, warmup_updates=122)
    assert ft.recipe_for("RTE").batch_size == 16 and ft.published("sts-b")["total_updates"] == 3598
    assert ft.published("squad")["lr"] == 1.5e-5 and ft.recipe_for("race").batch_size == 16
    with pytest.raises(RobertaError, match="unknown recipe setting"):
        ft.recipe_for("RTE", learning_rate=1)
    # the published rate for base and large; a narrow model gets a larger one, and the log says so
    wide, narrow = RobertaForMaskedLM(RobertaConfig.tiny(hidden_size=768)), RobertaForMaskedLM(RobertaConfig.tiny())
    assert ft.default_lr(r, wide)[0] == 1e-5 and ft.default_lr(r, narrow)[0] == 1e-3
    assert "set lr to choose" in ft.default_lr(r, narrow)[1]
    assert ft.default_lr(r.replace(lr=3e-5), narrow)[0] == 3e-5


def test_fine_tuning_batches_cover_everything_group_lengths_and_repeat_from_the_seed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=1000)
    batches = length_batches(lengths, batch_size=32, rng=np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches) == [8] + [32] * 31  # rows counted, not tokens
    # Similar lengths together: padding waste is small compared with one random batching.
    waste = sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches)
    random_waste = sum(lengths[b].max() * len(b) - lengths[b].sum() for b in np.array_split(rng.permutation(1000), 32))
    assert waste < 0.05 * random_waste
    # The same seed gives the same batches (what exact resume needs), another seed another order;
    # evaluation's order is fixed, shortest first.
    assert length_batches(lengths, batch_size=32, rng=np.random.default_rng(1)) == batches
    assert length_batches(lengths, batch_size=32, rng=np.random.default_rng(2)) != batches
    fixed = length_batches(lengths, batch_size=32)
    assert [lengths[b].max() for b in fixed] == sorted(lengths[b].max() for b in fixed)
    assert fixed == length_batches(lengths, batch_size=32) and fixed != batches
    with pytest.raises(RobertaError, match="batch_size must be positive"):
        length_batches(lengths, batch_size=0)
    ids, mask = pad_batch([[0, 5, 2], [0, 7, 8, 9, 2]], 1)
    assert ids.tolist() == [[0, 5, 2, 1, 1], [0, 7, 8, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------- GLUE

@pytest.mark.slow
def test_sst2_learns_from_a_pretrained_model_and_the_saved_head_reloads(sst2_pretrained, tmp_path):
    # Pretraining learned something: the masked-LM loss on held-out text fell.
    validations = [r for r in read_jsonl(sst2_pretrained / "metrics.jsonl") if "valid" in r]
    assert [r["step"] for r in validations] == [0, PRETRAIN_STEPS]
    assert validations[-1]["valid"]["loss"] < validations[0]["valid"]["loss"] - 0.5

    out = tmp_path / "sst2"
    result = ft.finetune("SST-2", shared_path("glue", "SST-2"), sst2_pretrained / "model", out,
                         max_train_examples=3000, max_epochs=2, lr=2e-3, batch_size=32, log_every=20)
    # SST-2 dev (all 872 sentences): 444 positive, so the majority class scores 50.9%.
    assert result["dev"]["accuracy"] >= 0.62  # 0.663 here; 0.642 with other seeds
    assert json.loads((out / "eval.json").read_text()) == result
    for name in ("model/config.json", "model/model.safetensors", "model/vocab.json", "model/merges.txt",
                 "curves.png", "recipe.json"):
        assert (out / name).exists(), name
    log = read_jsonl(out / "metrics.jsonl")
    train = [r for r in log if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(train[0])
    assert [r["dev"]["accuracy"] for r in log if "dev" in r][-1] <= result["dev"]["accuracy"]
    plan = result["plan"]  # derived from the 3,000 rows read: 94 updates per epoch, 6% warmup
    assert (plan["rows"], plan["updates_per_epoch"], plan["total_updates"], plan["warmup_updates"]) == (3000, 94, 188, 11)
    assert train[-1]["lr"] == pytest.approx(2e-3 / (188 - 11))  # fairseq's linear decay: 0 after the last update
    assert json.loads((out / "recipe.json").read_text())["max_len"] == 512  # as asked,
    assert plan["max_len"] == 64  # and cut to the pretrained model's positions

    # The saved head: evaluate reproduces the dev score and writes GLUE's submission format.
    preds_file = tmp_path / "SST-2.tsv"
    out = out / "model"
    again = ft.evaluate("SST-2", shared_path("glue", "SST-2"), out, predictions=preds_file, out_file=tmp_path / "m.json")
    assert again["metrics"]["accuracy"] == pytest.approx(result["dev"]["accuracy"])
    rows = [line.split("\t") for line in preds_file.read_text().splitlines()]
    assert rows[0] == ["index", "prediction"] and len(rows) == 873 and {r[1] for r in rows[1:]} <= {"0", "1"}

    # Loaded as a hub-style model, the head is found under the task's name and gives the same labels.
    config = json.loads((out / "config.json").read_text())
    assert config["head_name"] == "sst-2" and config["id2label"] == {"0": "negative", "1": "positive"}
    tok = RobertaTokenizer.from_pretrained(out)
    batch = pad_batch(tok.encode_batch(["a gorgeous , witty , seductive movie .", "dull and lifeless"]), 1)
    seq = RobertaForSequenceClassification.from_pretrained(out)
    mlm = RobertaForMaskedLM.from_pretrained(out)
    with torch.no_grad():
        expected = seq(*batch).logits
        assert torch.allclose(mlm.classify(*batch, head="sst-2"), expected, atol=1e-5)
    assert [rows[1 + i][1] for i in range(2)] == [str(int(p)) for p in
                                                  _predict_rows(seq, tok, shared_path("glue", "SST-2", "dev.tsv"))[:2]]


def _predict_rows(model, tok, dev_tsv):
    """The reloaded model's labels for the first dev rows, computed directly."""
    sentences = [line.split("\t")[0] for line in dev_tsv.read_text().splitlines()[1:3]]
    ids, mask = pad_batch(tok.encode_batch(sentences), 1)
    with torch.no_grad():
        return model(ids, mask).logits.argmax(-1).tolist()


def test_rte_runs_end_to_end_as_a_pair_task_from_the_cli(tiny_checkpoint, tmp_path, tokenizer):
    out = tmp_path / "rte"
    data = shared_path("glue", "RTE")
    assert main(["finetune", "--task", "rte", "--data", str(data), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--max-train-examples", "48", "--max-dev-examples", "24", "--max-epochs", "1", "--set", "log_every=1"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["task"] == "RTE" and result["updates"] == 3  # 48 examples / batch 16
    assert 0.0 <= result["dev"]["accuracy"] <= 1.0 and "f1" in result["dev"]
    # Pairs are encoded as <s> A </s></s> B </s>.
    recipe = ft.recipe_for("RTE", max_len=128)
    task = ft.load_task(recipe, data, tokenizer, splits=("dev",))
    (item,) = task.encode(task.data["dev"][0][:1])
    ids = item["ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) <= 128 and any(ids[i:i + 2] == [2, 2] for i in range(len(ids)))
    assert task.collate([item])["labels"].tolist() == [task.data["dev"][0][0].label]
    preds = tmp_path / "RTE.tsv"
    out = out / "model"
    assert main(["evaluate", "--task", "RTE", "--data", str(data), "--model", str(out), "--predictions", str(preds),
                 "--max-dev-examples", "24"]) == 0
    rows = preds.read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 25
    assert {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "not_entailment"}
    assert json.loads((out / "eval_dev.json").read_text())["metrics"]["accuracy"] >= 0.0  # written by default
    # The hub finds the fine-tuned head under the task's name and agrees with the written predictions.
    hub = roberta.load(out, precision="fp32")
    items = task.encode(task.data["dev"][0][:24])  # pairs cut to 128 tokens as fine-tuning cuts them
    logits = torch.cat([hub.predict("rte", torch.tensor(it["ids"]), return_logits=True) for it in items])
    assert [["entailment", "not_entailment"][i] for i in logits.argmax(-1)] == [r.split("\t")[1] for r in rows[1:]]
    with torch.no_grad():
        expected = RobertaForSequenceClassification.from_pretrained(out)(*pad_batch([it["ids"] for it in items], 1)).logits
    assert torch.allclose(logits, expected, atol=1e-5)


def test_cli_reports_bad_input_in_one_line(tiny_checkpoint, tmp_path, capsys):
    assert main(["finetune", "--task", "RTE", "--data", str(tmp_path / "none"), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tyes\n")
    assert main(["finetune", "--task", "RTE", "--data", str(tmp_path / "bad"), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "o")]) == 2
    assert "train.tsv:2: label 'yes' is not one of ['entailment', 'not_entailment']" in capsys.readouterr().err


MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def test_mnli_reports_matched_and_mismatched(tiny_checkpoint, tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    rows = "".join(f"{i}\t1\t1\tfiction\t-\t-\t-\t-\tThe cat {i} sat.\tA cat sat.\t-\t{labels[i % 3]}\n" for i in range(12))
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (tmp_path / name).write_text(MNLI_HEADER + rows)
    result = ft.finetune("MNLI", tmp_path, tiny_checkpoint, tmp_path / "out", max_epochs=1, batch_size=4)
    assert result["metric"] == "matched_accuracy"
    assert {"matched_accuracy", "mismatched_accuracy"} <= set(result["dev"])
    # Same data in both dev files: same score.
    assert result["dev"]["matched_accuracy"] == result["dev"]["mismatched_accuracy"]
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["head_name"] == "mnli" and config["id2label"] == {"0": "contradiction", "1": "neutral", "2": "entailment"}
    # RTE from the MNLI model, as in the paper: the encoder carries over, the 3-way head makes way for a 2-way one.
    rte = ft.finetune("RTE", shared_path("glue", "RTE"), tmp_path / "out" / "model", tmp_path / "rte", max_train_examples=16,
                      max_dev_examples=8, max_epochs=1)
    assert rte["head_name"] == "rte"
    config = json.loads((tmp_path / "rte" / "model" / "config.json").read_text())
    assert config["head_name"] == "rte" and config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert RobertaForSequenceClassification.from_pretrained(tmp_path / "rte" / "model").classifier.out_proj.out_features == 2


def test_stsb_trains_as_regression_on_scores_scaled_to_unit_range(tiny_checkpoint, tmp_path, tokenizer):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tg\tf\ty\t0\tn\tn\tA man {'plays ' * i}.\tA man plays.\t{i * 0.5:.3f}\n" for i in range(10))
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text(header + rows)
    recipe = ft.recipe_for("STS-B", max_len=64)
    task = ft.load_task(recipe, tmp_path, tokenizer)
    batch = task.collate(task.encode(task.data["train"][0]))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].max().item() == pytest.approx(0.9)
    result = ft.finetune("STS-B", tmp_path, tiny_checkpoint, tmp_path / "out", max_epochs=1, batch_size=5)
    assert result["metric"] == "pearson" and {"pearson", "spearman", "mse"} <= set(result["dev"])
    preds = tmp_path / "STS-B.tsv"
    ft.evaluate("STS-B", tmp_path, tmp_path / "out" / "model", predictions=preds)
    scores = [float(line.split("\t")[1]) for line in preds.read_text().splitlines()[1:]]
    assert len(scores) == 10  # printed on GLUE's 0-5 scale (scaled back from the model's [0, 1])
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["problem_type"] == "regression"
    # The test split has no scores: predictions only, with the test file's own index column.
    (tmp_path / "test.tsv").write_text(header.replace("\tscore", "") + "7\tg\tf\ty\t0\tn\tn\tA dog.\tA cat.\n")
    result = ft.evaluate("STS-B", tmp_path, tmp_path / "out" / "model", split="test", predictions=tmp_path / "test-preds.tsv")
    assert result["metrics"] == {}
    (row,) = [line.split("\t") for line in (tmp_path / "test-preds.tsv").read_text().splitlines()[1:]]
    assert row[0] == "7" and re.fullmatch(r"-?\d+\.\d{3}", row[1])  # a score with 3 decimals


# ------------------------------------------------------------------------------------ the user's data

def test_custom_multi_label_jsonl(tiny_checkpoint, tmp_path):
    tags = [["sports"], ["politics"], ["sports", "politics"], []]
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"body": f"story number {i}", "tags": tags[i % 4]}) + "\n")
    out = tmp_path / "out"
    result = ft.finetune("custom", tmp_path, tiny_checkpoint, out, text_columns=["body"], label_column="tags",
                         problem_type="multi_label", head_name="topics", max_epochs=1, batch_size=4)
    assert result["head_name"] == "topics" and {"micro_f1", "macro_f1", "subset_accuracy"} <= set(result["dev"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "politics", "1": "sports"}
    preds = tmp_path / "p.tsv"
    ft.evaluate("custom", tmp_path, out / "model", predictions=preds, text_columns=["body"], label_column="tags",
                problem_type="multi_label")
    assert len(preds.read_text().splitlines()) == 9


def test_fine_tunes_a_fairseq_release_archive_from_the_cli_then_evaluates_and_predicts(
        hub_checkpoints, bpe_dir, tmp_path, monkeypatch, capsys):
    """A fairseq .tar.gz as the releases ship it (a top folder holding model.pt and dict.txt; the GPT-2
    BPE files come from the cache a first download filled, here offline) fine-tunes to the same weights
    as the same model's Hugging Face directory, and the result evaluates and predicts alike."""
    cache = tmp_path / "cache" / "gpt2_bpe"
    cache.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(bpe_dir / name, cache / name)
    monkeypatch.setenv("ROBERTA_CACHE", str(cache.parent))
    monkeypatch.setenv("ROBERTA_OFFLINE", "1")
    data = tmp_path / "reviews"
    data.mkdir()
    texts = {split: [f"the film was {'good' if i % 2 else 'bad'}, said viewer {i}" for i in range(n)]
             for split, n in (("train", 24), ("dev", 8))}
    for split, rows in texts.items():  # headerless: label, text
        (data / f"{split}.csv").write_text("".join(f"{'pos' if i % 2 else 'neg'},{t}\n" for i, t in enumerate(rows)))
    columns = ["--task", "custom", "--data", str(data), "--text-columns", "1", "--label-column", "0"]
    for source in ("archive", "hf"):
        assert main(["finetune", *columns, "--model", str(hub_checkpoints[source]), "--out", str(tmp_path / source),
                     "--batch-size", "8", "--max-epochs", "2"]) == 0
    model = tmp_path / "archive" / "model"
    result = json.loads((tmp_path / "archive" / "eval.json").read_text())
    assert result["plan"]["rows"] == 24 and result["updates"] == 6
    weights = [load_file(tmp_path / source / "model" / "model.safetensors") for source in ("archive", "hf")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-6)
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["head_name"] == "custom"
    assert not config["classification_heads"]  # the archive's mnli head, stale once the encoder moved, is left out
    preds = tmp_path / "dev-preds.tsv"
    capsys.readouterr()
    assert main(["evaluate", *columns, "--model", str(model), "--predictions", str(preds)]) == 0
    scored = json.loads((model / "eval_dev.json").read_text())["metrics"]
    assert scored["accuracy"] == pytest.approx(result["dev"]["accuracy"])
    written = [line.split("\t")[1] for line in preds.read_text().splitlines()[1:]]
    assert len(written) == 8 and set(written) <= {"neg", "pos"}
    capsys.readouterr()
    assert main(["predict", "-m", str(model), "--precision", "fp32", "--json", *texts["dev"]]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in predicted] == written


# ----------------------------------------------------------------------------------------- SQuAD/RACE

def squad_file(path, version_2):
    context = "Beyonce was born in Houston, Texas. She rose to fame in the late 1990s as lead singer of Destiny's Child."
    qas = [{"id": "q1", "question": "Where was Beyonce born?", "answers": [{"text": "Houston, Texas", "answer_start": 20}]},
           {"id": "q2", "question": "When did she rise to fame?", "answers": [{"text": "late 1990s", "answer_start": 60}]}]
    if version_2:
        qas.append({"id": "q3", "question": "Who is the king of Mars?", "answers": [], "is_impossible": True})
    path.write_text(json.dumps({"version": "v2.0" if version_2 else "1.1",
                                "data": [{"title": "B", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return context


def test_squad_v2_runs_end_to_end_and_writes_answers(tiny_checkpoint, tmp_path):
    for split in ("train", "dev"):
        context = squad_file(tmp_path / f"{split}-v2.0.json", version_2=True)
    out = tmp_path / "out"
    # Short windows force the context into several overlapping ones.
    result = ft.finetune("squad", tmp_path, tiny_checkpoint, out, max_epochs=1, batch_size=4, max_len=24, doc_stride=8)
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1"} <= set(result["dev"])
    preds = tmp_path / "predictions.json"
    ft.evaluate("squad", tmp_path, out / "model", predictions=preds, max_len=24, doc_stride=8)
    answers = json.loads(preds.read_text())
    assert set(answers) == {"q1", "q2", "q3"} and all(a in context for a in answers.values())


def test_race_runs_end_to_end_with_levels(tiny_checkpoint, tmp_path):
    doc = {"article": "Tom has a dog. The dog is brown.", "questions": ["What does Tom have?", "The dog is _ ."],
           "options": [["a cat", "a dog", "a cow", "a pig"], ["red", "blue", "brown", "green"]], "answers": ["B", "C"]}
    for split in ("train", "dev"):
        for level in ("middle", "high"):
            (tmp_path / split / level).mkdir(parents=True)
            (tmp_path / split / level / "1.txt").write_text(json.dumps({**doc, "id": f"{level}1.txt"}))
    out = tmp_path / "out"
    result = ft.finetune("race", tmp_path, tiny_checkpoint, out, max_epochs=1, batch_size=2)
    assert {"accuracy", "accuracy_middle", "accuracy_high"} <= set(result["dev"])
    preds = tmp_path / "race.tsv"
    ft.evaluate("race", tmp_path, out / "model", predictions=preds)
    rows = [line.split("\t") for line in preds.read_text().splitlines()]
    assert rows[0] == ["id", "answer"] and len(rows) == 5 and {r[1] for r in rows[1:]} <= set("ABCD")
    assert json.loads((out / "model" / "config.json").read_text())["id2label"] == {"0": "A", "1": "B", "2": "C", "3": "D"}

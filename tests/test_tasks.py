"""Readers on small files in each official format (quirks and malformed rows included), and metrics
against scikit-learn/scipy and hand-worked SQuAD cases."""
import json

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from roberta.tasks import (
    GLUE_TASKS, SquadExample, TaskDataError, classification_metrics, glue_split_files, glue_task,
    multi_label_metrics, normalize_answer, race_metrics, race_option_text, read_glue, read_race,
    read_squad, read_table, regression_metrics, squad_decode, squad_exact, squad_f1, squad_features,
    squad_metrics,
)

from conftest import shared_path


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# ---------------------------------------------------------------------------------------------- GLUE

def test_cola_has_no_header_and_four_columns(tmp_path):
    f = write(tmp_path / "train.tsv", 'gj04\t1\t\tOur friends won\'t buy this analysis, let alone the next one.\n'
                                      'gj04\t0\t*\tThey drank the pub "dry.\n')
    split = read_glue("CoLA", f)
    assert [(e.text_a, e.label) for e in split.examples] == [
        ("Our friends won't buy this analysis, let alone the next one.", 1), ('They drank the pub "dry.', 0)]


def test_unbalanced_quotes_do_not_merge_rows(tmp_path):
    # With csv's default quoting the '"' would swallow the newline and the next row.
    f = write(tmp_path / "dev.tsv", 'sentence\tlabel\n" a quirky , "unbalanced film \t1\nbad movie \t0\n')
    split = read_glue("SST-2", f)
    assert [(e.text_a, e.label) for e in split.examples] == [('" a quirky , "unbalanced film ', 1), ("bad movie ", 0)]


def test_mrpc_columns_and_byte_order_mark(tmp_path):
    f = write(tmp_path / "train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                      "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused.\n",
              encoding="utf-8-sig")
    (ex,) = read_glue("MRPC", f).examples
    assert (ex.text_a, ex.text_b, ex.label) == ("Amrozi accused his brother.", "Referring to him, Amrozi accused.", 1)


MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")


def mnli_row(i, a, b, gold):
    return f"{i}\t1\t1n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{a}\t{b}\t{gold}\t{gold}\tneutral\t{gold}\t{gold}\t{gold}\n"


def test_mnli_matched_and_mismatched_dev_files(tmp_path):
    write(tmp_path / "dev_matched.tsv", MNLI_HEADER + mnli_row(0, "The cat sat.", "A cat sat.", "entailment"))
    write(tmp_path / "dev_mismatched.tsv", MNLI_HEADER + mnli_row(7, "Rain fell.", "It was dry.", "contradiction"))
    task = glue_task("mnli")
    files = glue_split_files(task, tmp_path, "dev")
    assert [f.name for f in files] == ["dev_matched.tsv", "dev_mismatched.tsv"]
    matched, mismatched = (read_glue(task, f).examples for f in files)
    # Label order of the published `mnli` head: contradiction, neutral, entailment.
    assert (matched[0].text_a, matched[0].text_b, matched[0].label, matched[0].guid) == ("The cat sat.", "A cat sat.", 2, "0")
    assert (mismatched[0].label, mismatched[0].guid) == (0, "7")


def test_qqp_header_and_stsb_float_scores(tmp_path):
    qqp = write(tmp_path / "qqp.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                      "201359\t303345\t303346\tWhy are \"Dutch\" so tall?\tWhy are Dutch tall?\t1\n")
    (ex,) = read_glue("QQP", qqp).examples
    assert (ex.guid, ex.text_a, ex.label) == ("201359", 'Why are "Dutch" so tall?', 1)
    stsb = write(tmp_path / "stsb.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                                        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000\n"
                                        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA man sings.\t0.8\n")
    assert [e.label for e in read_glue("sts-b", stsb).examples] == [5.0, 0.8]
    assert GLUE_TASKS["STS-B"].num_labels == 1


def test_test_files_have_no_labels(tmp_path):
    f = write(tmp_path / "test.tsv", "index\tsentence\n0\tuneasy mishmash of styles\n1\tdirector 's heart\n")
    split = read_glue("SST-2", f)
    assert [(e.guid, e.label) for e in split.examples] == [("0", None), ("1", None)]


def test_real_rte_and_sst2_files():
    rte = read_glue("RTE", shared_path("glue", "RTE", "dev.tsv"))
    assert len(rte.examples) == 139 and rte.skipped == 0
    assert {e.label for e in rte.examples} == {0, 1} and all(e.text_b for e in rte.examples)
    sst = read_glue("SST-2", shared_path("glue", "SST-2", "dev.tsv"))
    assert len(sst.examples) == 872 and sum(e.label for e in sst.examples) == 444


def test_malformed_rows_name_file_and_line_or_are_counted(tmp_path):
    f = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n"
                                      "0\tA.\tB.\tentailment\n"
                                      "1\tonly two fields\n"
                                      "2\tA.\tB.\tmaybe\n"
                                      "3\tC.\tD.\tnot_entailment\n")
    with pytest.raises(TaskDataError, match=r"train\.tsv:3: expected 4 tab-separated fields, found 2"):
        read_glue("RTE", f)
    split = read_glue("RTE", f, skip_bad_rows=True)
    assert split.skipped == 2 and [e.guid for e in split.examples] == ["0", "3"]


def test_wrong_file_for_the_task(tmp_path):
    f = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(TaskDataError, match="no column 'sentence1'"):
        read_glue("RTE", f)
    with pytest.raises(TaskDataError, match="not found"):
        read_glue("RTE", tmp_path / "missing.tsv")
    with pytest.raises(TaskDataError, match="unknown GLUE task"):
        glue_task("SST-3")


# ------------------------------------------------------------------------------------- user's files

def test_user_csv_classification_with_quoting(tmp_path):
    f = write(tmp_path / "train.csv", 'text,label\n"Great, really great",pos\n"said ""meh""",neg\n')
    split, labels = read_table(f, ["text"], "label")
    assert labels == ["neg", "pos"]
    assert [(e.text_a, e.label) for e in split.examples] == [("Great, really great", 1), ('said "meh"', 0)]


def test_user_tsv_pair_regression(tmp_path):
    f = write(tmp_path / "dev.tsv", "a\tb\tscore\nx \"y\tz\t0.25\nu\tv\toops\n")
    with pytest.raises(TaskDataError, match=r"dev\.tsv:3: label 'oops' is not a number"):
        read_table(f, ["a", "b"], "score", problem_type="regression")
    split, labels = read_table(f, ["a", "b"], "score", problem_type="regression", skip_bad_rows=True)
    assert labels is None and split.skipped == 1
    assert [(e.text_a, e.text_b, e.label) for e in split.examples] == [('x "y', "z", 0.25)]


def test_user_jsonl_multi_label(tmp_path):
    f = write(tmp_path / "train.jsonl", json.dumps({"text": "t1", "tags": ["b", "a"]}) + "\n\n"
                                        + json.dumps({"text": "t2", "tags": ["c"]}) + "\n{broken\n")
    with pytest.raises(TaskDataError, match=r"train\.jsonl:4: not valid JSON"):
        read_table(f, ["text"], "tags", problem_type="multi_label")
    split, labels = read_table(f, ["text"], "tags", problem_type="multi_label", skip_bad_rows=True)
    assert labels == ["a", "b", "c"] and [e.label for e in split.examples] == [[0, 1], [2]]
    # A dev file must use the train file's label names; an unseen one is a bad row.
    dev = write(tmp_path / "dev.csv", "text,tags\nt3,\"a,z\"\n")
    with pytest.raises(TaskDataError, match=r"dev\.csv:2: label\(s\) \['z'\] not among"):
        read_table(dev, ["text"], "tags", problem_type="multi_label", labels=labels)


def test_user_file_missing_column(tmp_path):
    f = write(tmp_path / "train.jsonl", json.dumps({"sentence": "x", "label": "a"}) + "\n")
    with pytest.raises(TaskDataError, match=r"train\.jsonl:1: no value for column\(s\) \['text'\]"):
        read_table(f, ["text"], "label")
    with pytest.raises(TaskDataError, match="unknown file type"):
        read_table(write(tmp_path / "x.txt", "a"), ["text"])


# ---------------------------------------------------------------------------------------- SQuAD/RACE

SQUAD = {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [{
    "context": "The Normans were in Normandy, a region in France.",
    "qas": [
        {"id": "q1", "question": "In what country is Normandy?", "is_impossible": False,
         "answers": [{"text": "France", "answer_start": 42}, {"text": "France.", "answer_start": 42}]},
        {"id": "q2", "question": "Who ruled Mars?", "is_impossible": True, "answers": []},
        {"id": "q3", "question": "Where?", "answers": [{"text": "Normandy", "answer_start": 3}]},
    ]}]}]}


def test_read_squad_v2_and_bad_answer_offset(tmp_path):
    f = write(tmp_path / "dev-v2.0.json", json.dumps(SQUAD))
    with pytest.raises(TaskDataError, match=r"dev-v2\.0\.json:3: question 'q3'"):
        read_squad(f)
    split = read_squad(f, skip_bad_rows=True)
    assert split.skipped == 1
    q1, q2 = split.examples
    assert q1.answers == [("France", 42), ("France.", 42)] and not q1.is_impossible
    assert q2.is_impossible and q2.answers == []


def write_race(root, level, name, doc):
    (root / level).mkdir(parents=True, exist_ok=True)
    write(root / level / name, json.dumps(doc))


def test_read_race_layout_and_levels(tmp_path):
    write_race(tmp_path, "middle", "1.txt", {"id": "middle1.txt", "article": "Tom has a dog.",
               "questions": ["Tom has a _ .", "What is true?"], "options": [["cat", "dog", "cow", "pig"],
               ["Tom is sad", "Tom has a dog", "Tom is a dog", "None"]], "answers": ["B", "B"]})
    write_race(tmp_path, "high", "7.txt", {"id": "high7.txt", "article": "A.", "questions": ["Q?"],
               "options": [["a", "b", "c"]], "answers": ["A"]})
    with pytest.raises(TaskDataError, match=r"7\.txt:1: question 0: expected 4 options"):
        read_race(tmp_path)
    split = read_race(tmp_path, skip_bad_rows=True)
    assert split.skipped == 1 and [(e.level, e.label) for e in split.examples] == [("middle", 1), ("middle", 1)]
    assert race_option_text("Tom has a _ .", "dog") == "Tom has a dog ."
    assert race_option_text("What is true?", "None") == "What is true? None"
    with pytest.raises(TaskDataError, match="no middle"):
        read_race(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ metrics

def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert m["f1"] == pytest.approx(f1_score(y, p))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    # Hand-worked: tp=2 fp=1 fn=1 tn=1 -> F1 = 2/3, MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
    m = classification_metrics([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3) and m["mcc"] == pytest.approx(1 / 6)
    assert "macro_f1" in classification_metrics([0, 1, 2], [0, 2, 2])


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 5, 100)
    p = y + rng.normal(0, 1, 100)
    m = regression_metrics(y, p)
    assert m["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert m["spearman"] == pytest.approx(spearmanr(p, y)[0])
    assert m["mse"] == pytest.approx(np.mean((y - p) ** 2))
    # A monotone but non-linear prediction: Spearman 1, Pearson below 1.
    m = regression_metrics([1, 2, 3, 4], [1, 4, 9, 100])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.9
    assert regression_metrics([1, 2, 3], [2, 2, 2])["pearson"] == 0.0


def test_multi_label_and_race_metrics():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    p = np.array([[1, 0, 0], [0, 1, 0]])
    m = multi_label_metrics(y, p)
    # micro: tp=2 fp=0 fn=1 -> 0.8; subset accuracy: only row 2 exact.
    assert m["micro_f1"] == pytest.approx(0.8) and m["subset_accuracy"] == pytest.approx(0.5)
    m = race_metrics([0, 1, 2, 3], [0, 1, 0, 0], ["middle", "middle", "high", "high"])
    assert m == {"accuracy": 0.5, "accuracy_middle": 1.0, "accuracy_high": 0.0}


def test_squad_normalisation_and_scores_as_the_official_script():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert squad_exact("the Denver Broncos.", "Denver Broncos") == 1.0
    # pred {eiffel, tower, in, paris} vs gold {eiffel, tower}: P = 1/2, R = 1 -> F1 = 2/3.
    assert squad_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert squad_f1("Paris", "London") == 0.0
    examples = [SquadExample("a", "", "", [("Denver Broncos", 0), ("The Broncos", 0)]),
                SquadExample("b", "", "", [], is_impossible=True),
                SquadExample("c", "", "", [], is_impossible=True),
                SquadExample("d", "", "", [("Santa Clara, California", 0)])]
    preds = {"a": "Broncos", "b": "", "c": "Mars", "d": "Santa Clara"}
    m = squad_metrics(examples, preds)
    # a: EM 1 against "The Broncos" (max over golds); b: no-answer right; c: wrong; d: EM 0, F1 2*(1*2/3)/(5/3) = 0.8.
    assert m["exact"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 1 + 0 + 0.8) / 4)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["NoAns_exact"] == pytest.approx(50.0)
    assert m["total"] == 4


def word_encoder():
    """A whitespace tokenizer with character offsets: input to the windowing under test."""
    vocab = {}

    def encode(text):
        ids, offsets, pos = [], [], 0
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            ids.append(vocab.setdefault(word, len(vocab) + 10))
            offsets.append((start, pos))
        return ids, offsets
    return encode


def test_squad_windows_cover_long_contexts_and_decode_back():
    context = " ".join(f"w{i}" for i in range(50)) + " answer here " + " ".join(f"v{i}" for i in range(50))
    start = context.index("answer here")
    ex = SquadExample("q", "where is it", context, [("answer here", start)])
    features = squad_features([ex], word_encoder(), max_len=30, doc_stride=10)
    assert all(len(f.input_ids) <= 30 for f in features) and len(features) > 4
    # Every context word lies in some window; the answer's label sits on its tokens where whole.
    labelled = [f for f in features if f.start]
    assert labelled and all(f.input_ids[f.start:f.end + 1] == [f.input_ids[f.start], f.input_ids[f.end]] for f in labelled)
    for f in labelled:
        assert context[f.offsets[f.start][0]:f.offsets[f.end][1]] == "answer here"
    # Logits peaking on the labelled span decode to the answer text; -inf elsewhere.
    starts, ends = [], []
    for f in features:
        s, e = np.full(len(f.input_ids), -5.0), np.full(len(f.input_ids), -5.0)
        if f.start:
            s[f.start], e[f.end] = 5.0, 5.0
        starts.append(s)
        ends.append(e)
    assert squad_decode([ex], features, starts, ends) == {"q": "answer here"}
    # v2: a high no-answer score (<s> logits) gives the empty answer.
    for s, e in zip(starts, ends):
        s[0], e[0] = 9.0, 9.0
    assert squad_decode([ex], features, starts, ends, version_2=True) == {"q": ""}
    assert squad_decode([ex], features, starts, ends, version_2=False) == {"q": "answer here"}


def test_squad_decode_respects_max_answer_length_and_order():
    ex = SquadExample("q", "q", "a b c d e", [])
    (f,) = squad_features([ex], word_encoder(), max_len=20)
    s, e = np.full(len(f.input_ids), -10.0), np.full(len(f.input_ids), -10.0)
    first = f.offsets.index((0, 1))  # token "a"
    s[first + 3], e[first] = 10.0, 10.0  # end before start: not allowed (d..a scores 20)
    s[first + 1], e[first + 2] = 4.0, 4.0
    assert squad_decode([ex], [f], [s], [e]) == {"q": "b c"}
    s[first + 3], e[first] = -10.0, -10.0
    s[first], e[first + 4] = 20.0, 20.0  # a..e: five tokens, too long when max_answer_len=3
    assert squad_decode([ex], [f], [s], [e]) == {"q": "a b c d e"}
    # Without a..e (40) the best is a..c: 20 + 4.
    assert squad_decode([ex], [f], [s], [e], max_answer_len=3) == {"q": "a b c"}

"""`tag` and `answer` against transformers on the same random-weight models, short and long texts.

The token-classification side runs transformers' own pipeline. transformers 5 removed the
question-answering pipeline, so its side is what that pipeline (4.57) did, built from transformers'
parts: its tokenizer's overflowing windows (`stride`, `only_second`), its model, its span scorer
`select_starts_ends` (which 5.x keeps in document_question_answering), and the pipeline's word
alignment through the tokenizer's `token_to_word` / `word_to_chars`.
"""
import re

import numpy as np
import pytest
import torch

import roberta
from conftest import shared_path
from roberta import RobertaConfig, RobertaError

transformers = pytest.importorskip("transformers")

HELLO = [0, 31414, 232, 328, 2]
LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "MISC"}
TINY = dict(vocab_size=50265, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=514, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomize(model, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1 + noise if "LayerNorm.weight" in name else noise)
    return model.eval()


@pytest.fixture(scope="module")
def bpe_dir():
    return shared_path("roberta-bpe")


@pytest.fixture(scope="module")
def hf_tok(bpe_dir):
    tok = transformers.RobertaTokenizerFast.from_pretrained(str(bpe_dir))
    assert tok("Hello world!")["input_ids"] == HELLO
    tok.model_max_length = 512  # the folder has no tokenizer_config.json to say so
    return tok


def checkpoint(tmp_path_factory, bpe_dir, cls_name, seed, **config):
    directory = tmp_path_factory.mktemp(cls_name)
    model = randomize(getattr(roberta, cls_name)(RobertaConfig(**{**TINY, **config})), seed)
    model.save_pretrained(directory, tokenizer=roberta.RobertaTokenizer.from_pretrained(bpe_dir))
    hub = roberta.load(directory, precision="fp32")
    hub.directory = str(directory)
    return hub, getattr(transformers, cls_name).from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, bpe_dir):
    return checkpoint(tmp_path_factory, bpe_dir, "RobertaForTokenClassification", 1, id2label=LABELS)


@pytest.fixture(scope="module")
def reader(tmp_path_factory, bpe_dir):
    return checkpoint(tmp_path_factory, bpe_dir, "RobertaForQuestionAnswering", 2)


@pytest.fixture(scope="module")
def lines():
    text = shared_path("corpus", "wikitext2-valid.txt").read_text(encoding="utf-8")
    # transformers parses '<unk>' in text as the special token; this project keeps it as text
    return [line.strip().replace("<unk>", "unk") for line in text.splitlines() if len(line.split()) > 8]


@pytest.fixture(scope="module")
def long_text(lines):
    return " ".join([line for line in lines if line.isascii()][100:140])


def same_entities(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b)
        assert abs(a["score"] - float(b["score"])) <= 1e-5
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}


@pytest.mark.parametrize("aggregation", ["none", "simple", "first", "max", "average"])
def test_tag_equals_the_token_classification_pipeline(tagger, hf_tok, lines, aggregation):
    hub, hf_model = tagger
    pipe = transformers.pipeline("token-classification", model=hf_model, tokenizer=hf_tok,
                                 aggregation_strategy=aggregation)
    texts = [line for line in lines[:60] if line.isascii()][:12] + ["Hello world!", " leading space", "a  b"]
    found = 0
    for text in texts:
        ours = hub.tag(text, aggregation=aggregation)
        same_entities(ours, pipe(text))
        for entity in ours:
            assert text[entity["start"]:entity["end"]] == (entity["word"].lstrip(" ") if aggregation != "none"
                                                           else text[entity["start"]:entity["end"]])
        found += len(ours)
    assert found > 25  # random weights still name many entities: the comparison has content


@pytest.mark.parametrize("aggregation", ["simple", "first", "average"])
def test_tag_long_text_in_windows_equals_the_pipeline_with_stride(tagger, hf_tok, long_text, aggregation):
    hub, hf_model = tagger
    assert len(hf_tok(long_text)["input_ids"]) > 1500
    pipe = transformers.pipeline("token-classification", model=hf_model, tokenizer=hf_tok,
                                 aggregation_strategy=aggregation, stride=64)
    ours = hub.tag(long_text, aggregation=aggregation, stride=64)
    same_entities(ours, pipe(long_text))
    assert ours[-1]["end"] > len(long_text) - 300  # the windows reach the end of the text
    with pytest.raises(RobertaError, match="stride"):
        hub.tag(long_text)


@pytest.mark.parametrize("aggregation", ["none", "first"])
def test_tagging_many_texts_runs_them_in_batches_and_equals_the_pipeline(tagger, hf_tok, lines, long_text, aggregation):
    """A list of texts (what `roberta tag` sends from a pipe) runs as batches of similar lengths, its
    windows and its short lines mixed, and gives each text the pipeline's entities."""
    hub, hf_model = tagger
    texts = [line for line in lines[:200] if line.isascii()][:40] + ["Hello world!", "a"]
    stride = None if aggregation == "none" else 64
    if stride:
        texts.insert(7, long_text)
    pipe = transformers.pipeline("token-classification", model=hf_model, tokenizer=hf_tok,
                                 aggregation_strategy=aggregation, **({"stride": stride} if stride else {}))
    ours = hub.tag(texts, aggregation=aggregation, stride=stride)
    assert len(ours) == len(texts) and sum(map(len, ours)) > 40
    for text, entities in zip(texts, ours):
        same_entities(entities, pipe(text))
    with pytest.raises(RobertaError, match="stride"):
        hub.tag(["short", long_text])


def test_tag_words_are_text_spans_beyond_ascii(tagger):
    hub, _ = tagger
    text = "Zoë met Jürgen in Kraków 😀 and São Paulo"
    for aggregation in ("simple", "first", "max", "average"):
        entities = hub.tag(text, aggregation=aggregation, ignore_labels=())
        assert entities[0]["start"] == 0 and entities[-1]["end"] == len(text)
        for entity in entities:
            # a group boundary inside the emoji's two byte-level tokens leaves half of it in each word
            if "\ufffd" not in entity["word"]:
                assert entity["word"].lstrip(" ") == text[entity["start"]:entity["end"]]


# ---- question answering: transformers 4.57's pipeline, from transformers' parts -----------------

def reference_answer(hf_model, hf_tok, question, context, top_k=1, max_answer_len=15, max_seq_len=None,
                     doc_stride=None, handle_impossible_answer=False):
    from transformers.pipelines.document_question_answering import select_starts_ends

    max_seq_len = max_seq_len or min(hf_tok.model_max_length, 384)
    doc_stride = doc_stride if doc_stride is not None else min(max_seq_len // 2, 128)
    enc = hf_tok(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                 return_overflowing_tokens=True, return_offsets_mapping=True)
    min_null, answers = 1000000, []
    for i in range(len(enc["input_ids"])):
        ids = torch.tensor([enc["input_ids"][i]])
        p_mask = np.array([[tok != 1 for tok in enc.sequence_ids(i)]], dtype=int)
        p_mask[0, 0] = 0  # <s> stays (no-answer)
        with torch.no_grad():
            out = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        starts, ends, scores, min_null = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask, np.ones_like(p_mask), min_null,
            top_k * 2 + 10, handle_impossible_answer, max_answer_len)
        window = enc[i]
        for s, e, score in zip(starts, ends, scores):
            try:
                start = window.word_to_chars(window.token_to_word(s), sequence_index=1)[0]
                end = window.word_to_chars(window.token_to_word(e), sequence_index=1)[1]
            except Exception:
                start, end = window.offsets[s][0], window.offsets[e][1]
            same = [a for a in answers if a["answer"].lower() == context[start:end].lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end, "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]


def same_answers(ours, theirs):
    ours = ours if isinstance(ours, list) else [ours]
    assert [(a["answer"], a["start"], a["end"]) for a in ours] == [(b["answer"], b["start"], b["end"]) for b in theirs]
    assert np.allclose([a["score"] for a in ours], [b["score"] for b in theirs], rtol=0, atol=1e-5)


QUESTIONS = ["Who was the first to arrive?", "When did the war end?", "What is the name of the album?"]


def test_answer_equals_the_question_answering_pipeline(reader, hf_tok, lines):
    hub, hf_model = reader
    for i, question in enumerate(QUESTIONS):
        context = " ".join(lines[10 * i:10 * i + 3])
        for top_k, impossible in ((1, False), (3, False), (2, True)):
            ours = hub.answer(question, context, topk=top_k, no_answer=impossible)
            same_answers(ours, reference_answer(hf_model, hf_tok, question, context, top_k,
                                                handle_impossible_answer=impossible))
            for a in ours if isinstance(ours, list) else [ours]:
                assert context[a["start"]:a["end"]] == a["answer"]


def test_answer_reads_contexts_longer_than_the_model_in_windows(reader, hf_tok, long_text):
    hub, hf_model = reader
    assert len(hf_tok(long_text)["input_ids"]) > 1500
    for question, options in zip(QUESTIONS, (dict(), dict(max_seq_len=200, doc_stride=50),
                                             dict(max_seq_len=512, doc_stride=0))):
        ours = hub.answer(question, long_text, topk=3, no_answer=True, **options)
        same_answers(ours, reference_answer(hf_model, hf_tok, question, long_text, 3,
                                            handle_impossible_answer=True, **options))
    # a long question leaves less room than the default overlap (half a window): it overlaps by half the room
    question = "Which of the many names that this rather long question keeps on listing " * 4 + "came first?"
    room = 100 - len(hub.tokenizer.encode(question, add_special_tokens=False)) - 4
    assert room <= 50, room
    same_answers(hub.answer(question, long_text[:3000], topk=2, max_seq_len=100),
                 reference_answer(hf_model, hf_tok, question, long_text[:3000], 2, max_seq_len=100,
                                  doc_stride=room // 2))


def test_answering_many_questions_runs_them_in_batches_and_equals_the_pipeline(reader, hf_tok, lines, long_text):
    """A list of questions (what `roberta answer` sends from a pipe) runs its pairs' windows together,
    short contexts and a long one mixed, and gives each pair the pipeline's answers; one context may
    serve every question."""
    hub, hf_model = reader
    contexts = [" ".join(lines[10 * i:10 * i + 3]) for i in range(len(QUESTIONS))]
    contexts[1] = long_text
    ours = hub.answer(list(QUESTIONS), contexts, topk=2, no_answer=True)
    assert len(ours) == len(QUESTIONS)
    for question, context, found in zip(QUESTIONS, contexts, ours):
        same_answers(found, reference_answer(hf_model, hf_tok, question, context, 2, handle_impossible_answer=True))
    for question, found in zip(QUESTIONS, hub.answer(list(QUESTIONS), contexts[0])):  # one context for all
        alone = hub.answer(question, contexts[0])
        assert (found["start"], found["end"]) == (alone["start"], alone["end"])
        assert abs(found["score"] - alone["score"]) <= 1e-5
    with pytest.raises(RobertaError, match="2 questions and 3 contexts"):
        hub.answer(["a?", "b?"], ["x", "y", "z"])


def test_no_answer_threshold(reader, lines):
    hub, _ = reader
    question, context = QUESTIONS[0], " ".join(lines[:3])
    best, null = hub.answer(question, context, topk=2, no_answer=True, null_threshold=-1.0)
    assert null["answer"] == "" and null["score"] < best["score"] <= 1.0 or best["answer"] == ""
    # a threshold of -1 lets the empty answer outrank every span, whose scores are probabilities
    assert hub.answer(question, context, no_answer=True, null_threshold=-1.0)["answer"] == ""
    assert hub.answer(question, context, no_answer=True, null_threshold=1.0)["answer"] != ""


def test_wrong_head_and_bad_settings_are_one_line_errors(tagger, reader):
    tag_hub, qa_hub = tagger[0], reader[0]
    with pytest.raises(RobertaError, match="question-answering checkpoint"):
        tag_hub.answer("q", "c")
    with pytest.raises(RobertaError, match="token-classification checkpoint"):
        qa_hub.tag("text")
    with pytest.raises(RobertaError, match="masked-LM"):
        tag_hub.fill_mask("a <mask>")
    with pytest.raises(RobertaError, match="aggregation"):
        tag_hub.tag("text", aggregation="mean")
    with pytest.raises(RobertaError, match="stride needs"):
        tag_hub.tag("text", aggregation="none", stride=10)
    with pytest.raises(RobertaError, match="doc_stride must be between 0 and max_seq_len 100 .*, got 200"):
        qa_hub.answer("q", "c", max_seq_len=100, doc_stride=200)
    with pytest.raises(RobertaError, match="doc_stride must be between 0 and max_seq_len 384 .*, got -5"):
        qa_hub.answer("q", "c", doc_stride=-5)  # refused though this context needs no second window
    with pytest.raises(RobertaError, match="stride must be at least 0 .*, got -1"):
        tag_hub.tag("short", stride=-1)
    with pytest.raises(RobertaError, match="no room"):
        qa_hub.answer("word " * 200, "c", max_seq_len=100)
    for call, message in ((lambda: tag_hub.tag(None), "tag takes a text (str) or a list of them, got NoneType"),
                          (lambda: tag_hub.tag(b"bytes"), "tag takes a text (str) or a list of them, got bytes"),
                          (lambda: qa_hub.answer(None, "c"), "answer takes a question (str) or a list of them, got NoneType"),
                          (lambda: qa_hub.answer(["q"], 5), "answer takes a context (str) or a list of them, got int"),
                          (lambda: tag_hub.embed(None), "embed takes a sentence (str) or a list of them, got NoneType"),
                          (lambda: tag_hub.encode(7), "encode takes a sentence (str) or a list of them, got int")):
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            call()
    for call in (lambda: tag_hub.tag(["fine", "caf\udce9"]), lambda: qa_hub.answer("q", "caf\udce9"),
                 lambda: tag_hub.embed("caf\udce9")):
        with pytest.raises(RobertaError, match=r"not valid Unicode: a lone surrogate \(U\+DCE9\) at character 3"):
            call()


def test_a_long_text_without_stride_is_refused_after_its_first_chunks(tagger, monkeypatch):
    """Tagging a text past the model's limit without `stride` is refused; a long one after its first
    chunks of characters, not after tokenizing all of it (2 MB: about 1.5 s). Under the limit's worth
    of characters the message gives the exact count."""
    from roberta.tokenizer import CHUNK_CHARS

    hub = tagger[0]
    limit = hub.model.config.max_tokens
    tokenized = []
    encode = hub.tokenizer.encode
    monkeypatch.setattr(hub.tokenizer, "encode", lambda text, *a, **k: tokenized.append(len(text)) or encode(text, *a, **k))
    text = "word " * (4 * CHUNK_CHARS // 5)
    with pytest.raises(RobertaError, match=f"has more than {limit} tokens but the model takes at most {limit}; pass stride"):
        hub.tag(text)
    assert sum(tokenized) <= 2 * CHUNK_CHARS < len(text), tokenized
    with pytest.raises(RobertaError, match=f"has {limit + 8} tokens but the model takes at most {limit}; pass stride"):
        hub.tag(" ".join(["word"] * (limit + 6)))


def test_cli_tag_and_answer_print_the_library_results(tagger, reader, tmp_path, capsys):
    import json

    from roberta.cli import main

    text = "Hello world, from Paris and New York."
    assert main(["tag", "-m", tagger[0].directory, "--precision", "fp32", "--json", "--aggregation", "first",
                 text]) == 0
    assert json.loads(capsys.readouterr().out) == tagger[0].tag(text, aggregation="first")
    context = tmp_path / "context.txt"
    context.write_text("The meeting in Paris ended on Monday. Everyone went home to New York.", encoding="utf-8")
    assert main(["answer", "-m", reader[0].directory, "--precision", "fp32", "--json", "--topk", "2",
                 "--context-file", str(context), "Where was the meeting?", "When did it end?"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [reader[0].answer(q, context.read_text(), topk=2) for q in ("Where was the meeting?",
                                                                                  "When did it end?")]
    assert main(["answer", "-m", reader[0].directory, "no tab here"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("error: argument 1 has no context: give QUESTION<TAB>CONTEXT, "
                                                        "JSONL with a context field (--pair-field), or --context")
    # JSONL, SQuAD's fields by default: a context may hold what a line cannot (newlines, TABs)
    rows = [{"question": "Where was the meeting?", "context": "The meeting\nin Paris\tended on Monday.", "id": 1},
            {"question": "Who went home?", "context": "Everyone went home to New York."}]
    squad = tmp_path / "dev.jsonl"
    squad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["answer", "-m", reader[0].directory, "--precision", "fp32", "--json", "-i", str(squad)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [[reader[0].answer(r["question"], r["context"])] for r in rows]
    assert main(["answer", "-m", reader[0].directory, "--precision", "fp32", "--json", "-i", str(squad),
                 "--context", "Everyone met in Paris."]) == 0  # the one context for every question
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [[reader[0].answer(r["question"], "Everyone met in Paris.")] for r in rows]
    tabbed = tmp_path / "questions.txt"
    tabbed.write_text("Who?\nWhere?\tIn Paris.\n", encoding="utf-8")
    tagged = tmp_path / "texts.jsonl"
    tagged.write_text(json.dumps({"body": "A\ttab and a\nnewline in Paris."}) + "\n" + json.dumps({"body": text}) + "\n")
    assert main(["tag", "-m", tagger[0].directory, "--precision", "fp32", "--json", "-i", str(tagged),
                 "--field", "body"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == tagger[0].tag(["A\ttab and a\nnewline in Paris.", text])
    single = tmp_path / "texts.tsv"  # tag takes single texts: its .tsv lines are text, a TAB is part of one
    single.write_text(f"{text}\nA\ttab in Paris.\n", encoding="utf-8")
    assert main(["tag", "-m", tagger[0].directory, "--precision", "fp32", "--json", "-i", str(single)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == tagger[0].tag([text, "A\ttab in Paris."])
    for argv, said in ((["answer", "-i", str(tabbed), "--context", "One for all."],
                        f"{tabbed} line 2 has a context after a TAB, and --context gives another: drop one"),
                       (["answer", "-i", str(squad), "--pair-field", "passage"],
                        f"{squad} line 1 has no string field 'passage'; name the field with --field"),
                       (["tag", "-i", str(tagged)], f"{tagged} line 1 has no string field 'text'; name the field with --field")):
        assert main([argv[0], "-m", (reader if argv[0] == "answer" else tagger)[0].directory, *argv[1:]]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == "error: " + said


def test_convert_keeps_a_taggers_or_a_readers_head_and_fairseq_refuses_it(tagger, reader, tmp_path, capsys):
    from roberta.cli import main

    for (hub, _), kind in ((tagger, "TokenClassification"), (reader, "QuestionAnswering")):
        out = tmp_path / kind
        assert main(["convert", hub.directory, str(out)]) == 0
        again = roberta.load(out, precision="fp32")
        assert type(again.model) is type(hub.model)
        for (name, want), got in zip(hub.model.state_dict().items(), again.model.state_dict().values(), strict=True):
            assert torch.equal(want, got), name
        assert main(["convert", hub.directory, str(tmp_path / f"{kind}-fairseq"), "--to", "fairseq"]) == 2
        assert f"is a {kind} checkpoint; fairseq's layout" in capsys.readouterr().err
        assert not (tmp_path / f"{kind}-fairseq").exists()

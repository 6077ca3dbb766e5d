"""`roberta serve` as users run it: a real subprocess on a free loopback port, real HTTP clients.

Every answer is compared with what the library gives for the same request alone, on a tiny model saved
here with the real tokenizer and three classification heads (sentiment, mnli, and a one-output rank).
Each text-embeddings-inference route's request and answer is checked against TEI's published OpenAPI
description (tei_openapi.json), and huggingface_hub's InferenceClient drives the server as a TEI client.
"""
import asyncio
import base64
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import roberta
from roberta.hub import RobertaHub
from roberta.model import RobertaConfig, RobertaForMaskedLM
from roberta.tokenizer import RobertaTokenizer

SENTENCES = [
    "The movie was a delight from start to finish.",
    "I would not recommend this restaurant to anyone.",
    "Hello world!",
    "A man is sleeping on the couch while the television is on.",
    "Prices rose sharply in the third quarter.",
    "She said nothing.",
    "The committee will meet again next Tuesday to discuss the budget for the new library.",
    "Why?",
]
LONG = " ".join(["word"] * 100)  # past the tiny model's 64 tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The library's side of each comparison on one thread: the servers run beside it on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir):
    torch.manual_seed(0)
    tokenizer = RobertaTokenizer.from_pretrained(bpe_dir)
    config = RobertaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=66, head_name="sentiment",
                                id2label={0: "negative", 1: "positive"})
    model = RobertaForMaskedLM(config)
    with torch.no_grad():
        model.lm_head.bias.normal_()  # so that fill-mask scores are not all alike
    for name, classes in (("sentiment", 2), ("mnli", 3), ("rank", 1)):
        head = model.register_classification_head(name, classes)
        with torch.no_grad():
            head.out_proj.bias.normal_()
    directory = tmp_path_factory.mktemp("serve") / "model"
    RobertaHub(model, tokenizer).save(directory)  # the way a user saves a hub object with its heads
    return directory


@pytest.fixture(scope="module")
def hub(model_dir):
    return roberta.load(model_dir, precision="fp32")  # exact, to compare the server's fp32 answers with


class Server:
    """`python -m roberta serve` on port 0 (any free port); stopped with SIGTERM at the end."""

    def __init__(self, model_dir, *flags, env=None):
        # one thread: the suite runs beside other work, where more threads contend for the cores
        self.proc = subprocess.Popen([sys.executable, "-m", "roberta", "serve", "-m", str(model_dir), "--port", "0",
                                      "--threads", "1", "--precision", "fp32", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 90
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("the server exited before serving:\n" + "".join(self.log))
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)
                break
        while True:  # the socket is bound before the model loads; /health answers once the app has started
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "".join(self.log)
            time.sleep(0.1)

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-wait-ms", "20", "--max-inputs", "8", "--max-body-bytes", "20000",
               "--max-response-bytes", "200000")
    yield s
    assert s.stop() == 0, "".join(s.log)


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def features(hub, text, truncate=False):
    ids = hub.encode(*([text] if isinstance(text, str) else text))
    return hub.extract_features(ids, truncate=truncate)[0].float()


# ---- every endpoint equals the library, in text-embeddings-inference's shapes ----------------------

SPEC = json.loads((Path(__file__).parent / "tei_openapi.json").read_text())


def conforms(value, schema, where="$"):
    """Assert that `value` fits an OpenAPI 3 schema of TEI's description (the subset it uses)."""
    if "$ref" in schema:
        return conforms(value, SPEC["schemas"][schema["$ref"].rsplit("/", 1)[1]], where)
    for part in schema.get("allOf", []):
        conforms(value, part, where)
    if "oneOf" in schema:
        fits = 0
        for option in schema["oneOf"]:
            try:
                conforms(value, option, where)
                fits += 1
            except AssertionError:
                pass
        assert fits == 1, f"{where}: {str(value)[:80]} fits {fits} of the schema's oneOf"
    if value is None:
        assert schema.get("nullable"), f"{where} is null"
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key} missing"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                conforms(value[key], sub, f"{where}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                conforms(item, schema["additionalProperties"], f"{where}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{where}: {str(value)[:80]} is not an array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), where
        for i, item in enumerate(value):
            conforms(item, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
        assert value in schema.get("enum", [value]), f"{where}: {value!r} not in {schema['enum']}"
    elif kind in ("number", "integer"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        assert kind == "number" or isinstance(value, int), f"{where}: {value!r} is not an integer"
        assert value >= schema.get("minimum", value), f"{where}: {value} < {schema['minimum']}"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"


def tei(server, path, body, status=200, method="post"):
    """A TEI route's answer, its request and answer checked against TEI's OpenAPI description."""
    route = SPEC["paths"][path][method]
    if body is not None and route["request"]:
        conforms(body, route["request"], "request")
    response = httpx.request(method.upper(), server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    if route["responses"].get(str(status)):
        conforms(response.json(), route["responses"][str(status)], f"{path} {status}")
    return response.json() if response.content else None


def test_embed_and_embed_all_equal_the_library(server, hub):
    inputs = SENTENCES[:4]
    single = tei(server, "/embed", {"inputs": "Hello world!"})  # a text: one vector, <s>, unit length
    torch.testing.assert_close(torch.tensor(single[0]), F.normalize(features(hub, "Hello world!")[0], dim=0),
                               atol=1e-5, rtol=1e-5)
    for pooling in ("cls", "mean"):  # --pooling's choice, or the request's (this server's addition)
        for normalize in (False, True):
            out = ok(post(server, "/embed", {"inputs": inputs, "pooling": pooling, "normalize": normalize}))
            for text, got in zip(inputs, out):
                f = features(hub, text)
                want = f[0] if pooling == "cls" else f.mean(0)
                want = F.normalize(want, dim=0) if normalize else want
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)
    ids = hub.encode(SENTENCES[0]).tolist()  # token ids are taken as they are, alone or in a list
    by_ids = tei(server, "/embed", {"inputs": ids, "normalize": False})
    mixed = tei(server, "/embed", {"inputs": [SENTENCES[1], ids], "normalize": False, "truncate": False,
                                   "truncation_direction": "Right"})
    for got in (by_ids[0], mixed[1]):
        torch.testing.assert_close(torch.tensor(got), features(hub, SENTENCES[0])[0], atol=1e-5, rtol=1e-5)
    cut = tei(server, "/embed", {"inputs": LONG, "truncate": True, "normalize": False})
    torch.testing.assert_close(torch.tensor(cut[0]), features(hub, LONG, truncate=True)[0], atol=1e-5, rtol=1e-5)
    every = tei(server, "/embed_all", {"inputs": [SENTENCES[2], LONG], "truncate": True})
    for text, got in zip([SENTENCES[2], LONG], every):
        want = features(hub, text, truncate=True)
        assert len(got) == want.shape[0]  # every token, <s> and </s> included
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)


def test_openai_embeddings_equal_the_library(server, hub):
    out = tei(server, "/v1/embeddings", {"input": SENTENCES[:3], "model": "tiny"})
    assert out["object"] == "list" and out["model"] == "tiny"
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == sum(len(hub.encode(s)) for s in SENTENCES[:3])
    encoded = tei(server, "/v1/embeddings", {"input": SENTENCES[0], "encoding_format": "base64"})
    for text, item in zip(SENTENCES, out["data"]):
        want = F.normalize(features(hub, text)[0], dim=0)
        torch.testing.assert_close(torch.tensor(item["embedding"]), want, atol=1e-5, rtol=1e-5)
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, out["data"][0]["embedding"], rtol=1e-6, atol=1e-7)
    # over the limit: OpenAI's API cannot truncate, so the error does not offer it (TEI's OpenAI error shape)
    long = tei(server, "/v1/embeddings", {"input": LONG}, status=413)
    assert "shorten it" in long["message"] and "truncate" not in long["message"] and long["code"] == 413


def scores_of(hub, head, text, function):
    ids = hub.encode(*([text] if isinstance(text, str) else text))
    logits = hub.predict(head, ids, return_logits=True)[0].float()
    return {"softmax": logits.softmax(-1), "sigmoid": logits.sigmoid(), "none": logits}[function]


def test_predict_equals_the_library(server, hub):
    names = {"sentiment": ["negative", "positive"], "mnli": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    pair = ["A man sleeps.", "A person rests."]
    single = tei(server, "/predict", {"inputs": SENTENCES[0]})  # one input: a list of classes, best first
    double = tei(server, "/predict", {"inputs": pair})  # a [first, second] list is one pair
    batch = tei(server, "/predict", {"inputs": [[SENTENCES[1]], pair, [SENTENCES[2]]], "head": "mnli"})
    raw = tei(server, "/predict", {"inputs": [pair], "raw_scores": True})
    cases = [(single, "sentiment", SENTENCES[0], "softmax"), (double, "sentiment", pair, "softmax"),
             (raw[0], "sentiment", pair, "none")]
    cases += [(got, "mnli", text, "softmax") for got, text in zip(batch, [SENTENCES[1], pair, SENTENCES[2]])]
    for got, head, text, function in cases:
        want = scores_of(hub, head, text, function)
        order = want.argsort(descending=True).tolist()
        assert [p["label"] for p in got] == [names[head][i] for i in order]
        np.testing.assert_allclose([p["score"] for p in got], want[order].numpy(), atol=1e-5, rtol=1e-5)
    # the parameters huggingface_hub's InferenceClient sends: top_k and function_to_apply
    top = tei(server, "/predict", {"inputs": SENTENCES[3], "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}})
    want = scores_of(hub, "sentiment", SENTENCES[3], "sigmoid")
    assert len(top) == 1 and top[0]["label"] == names["sentiment"][int(want.argmax())]
    assert abs(top[0]["score"] - float(want.max())) < 1e-5
    # POST /: this model's main head classifies, so / answers as /predict (TEI's dispatch)
    assert ok(post(server, "/", {"inputs": SENTENCES[0]})) == single


def test_rerank_similarity_and_zero_shot_equal_the_library(server, hub):
    texts = SENTENCES[:5] + [LONG]
    ranks = tei(server, "/rerank", {"query": "Who liked the film?", "texts": texts, "head": "rank",
                                    "truncate": True, "return_text": True})
    want = hub.rerank("Who liked the film?", texts, head="rank", return_documents=True)  # longest-first cuts
    assert [r["index"] for r in ranks] == [w["corpus_id"] for w in want]
    assert [r["text"] for r in ranks] == [w["text"] for w in want]
    np.testing.assert_allclose([r["score"] for r in ranks], [w["score"] for w in want], atol=1e-5, rtol=1e-5)
    raw = tei(server, "/rerank", {"query": "q", "texts": SENTENCES[:3], "head": "rank", "raw_scores": True})
    logits = hub.score_pairs([("q", t) for t in SENTENCES[:3]], head="rank", raw=True)
    np.testing.assert_allclose([r["score"] for r in sorted(raw, key=lambda r: r["index"])], logits.numpy(),
                               atol=1e-5, rtol=1e-5)
    assert "text" not in raw[0]
    # a model whose main head does not have one output is no reranker: TEI's 424
    assert tei(server, "/rerank", {"query": "q", "texts": ["a"]}, status=424)["error_type"] == "Backend"

    similar = tei(server, "/similarity", {"inputs": {"source_sentence": SENTENCES[0], "sentences": SENTENCES[1:4]}})
    source = F.normalize(features(hub, SENTENCES[0])[0], dim=0)
    want = [float(F.normalize(features(hub, s)[0], dim=0) @ source) for s in SENTENCES[1:4]]
    np.testing.assert_allclose(similar, want, atol=1e-5, rtol=1e-5)
    # --max-inputs (8) counts the sentences, not the source sentence on top of them
    assert len(tei(server, "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"] * 8}})) == 8

    # zero-shot: an MNLI head (fairseq's class order) on its own route
    # a text past the limit is cut to what each hypothesis leaves (only_first), as the library cuts it
    labels = ["film", "food", "a much longer label of money and banks"]
    out = ok(post(server, "/zero-shot", {"inputs": SENTENCES[:1] + [LONG], "candidate_labels": labels,
                                         "head": "mnli", "multi_label": True, "truncate": True}))
    for got, wanted in zip(out, hub.zero_shot(SENTENCES[:1] + [LONG], labels, multi_label=True, head="mnli"),
                           strict=True):
        assert got["labels"] == wanted["labels"]
        np.testing.assert_allclose(got["scores"], wanted["scores"], atol=1e-5, rtol=1e-5)
    too_long = post(server, "/zero-shot", {"inputs": [LONG], "candidate_labels": labels, "head": "mnli"})
    assert too_long.status_code == 413 and too_long.json()["error_type"] == "Validation"


def test_fill_mask_equals_the_library(server, hub):
    texts = ["The capital of France is <mask>.", "A <mask> sat on the <mask> all day."]
    out = ok(post(server, "/fill-mask", {"inputs": texts, "topk": 3}))
    for text, got in zip(texts, out["results"]):
        want = hub.fill_mask(text, topk=3, as_dicts=True)
        want = want if text.count("<mask>") > 1 else [want]  # the server always answers per mask
        assert len(got) == len(want) == text.count("<mask>")
        for got_mask, want_mask in zip(got, want):
            assert [c["token"] for c in got_mask] == [c["token"] for c in want_mask]
            assert [c["sequence"] for c in got_mask] == [c["sequence"] for c in want_mask]
            assert [c["token_str"] for c in got_mask] == [c["token_str"] for c in want_mask]
            np.testing.assert_allclose([c["score"] for c in got_mask], [c["score"] for c in want_mask], rtol=1e-4)
    single = ok(post(server, "/fill-mask", {"inputs": texts[0]}))
    assert len(single["results"]) == 1 and len(single["results"][0][0]) == 5


def test_tokenize_decode_info_health(server, hub):
    out = tei(server, "/tokenize", {"inputs": ["Hello world!", "héllo"]})
    assert out[0] == [{"id": 0, "text": "<s>", "special": True, "start": None, "stop": None},
                      {"id": 31414, "text": "Hello", "special": False, "start": 0, "stop": 5},
                      {"id": 232, "text": "world", "special": False, "start": 6, "stop": 11},
                      {"id": 328, "text": "!", "special": False, "start": 11, "stop": 12},
                      {"id": 2, "text": "</s>", "special": True, "start": None, "stop": None}]
    assert [t["id"] for t in out[1]] == hub.encode("héllo").tolist()
    assert [(t["start"], t["stop"]) for t in out[1][1:-1]] == [(0, 1), (1, 3), (3, 6)]  # bytes, as TEI counts
    bare = tei(server, "/tokenize", {"inputs": "Hello world!", "add_special_tokens": False})
    assert [t["id"] for t in bare[0]] == [31414, 232, 328]
    pair = hub.encode("A man sleeps.", "A person rests.").tolist()
    assert tei(server, "/decode", {"ids": [0, 31414, 232, 328, 2]}) == ["Hello world!"]
    assert tei(server, "/decode", {"ids": [[0, 31414, 232, 328, 2], pair]}) == \
        ["Hello world!", hub.tokenizer.decode(pair, skip_special_tokens=True)]
    assert tei(server, "/decode", {"ids": [0, 31414, 2], "skip_special_tokens": False}) == ["<s>Hello</s>"]
    info = tei(server, "/info", None, method="get")
    assert info["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "positive"},
                                                 "label2id": {"negative": 0, "positive": 1}}}
    assert info["max_input_length"] == hub.max_tokens and info["max_client_batch_size"] == 8
    assert info["heads"] == {"sentiment": {"classes": 2, "labels": ["negative", "positive"]},
                             "mnli": {"classes": 3, "labels": ["LABEL_0", "LABEL_1", "LABEL_2"]},
                             "rank": {"classes": 1, "labels": ["LABEL_0"]}}
    assert info["config"]["hidden_size"] == 64 and info["fill_mask"]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.content == b""  # TEI answers an empty 200
    assert [httpx.head(server.url + path).status_code for path in ("/health", "/info", "/metrics")] == [200] * 3
    # byte offsets of 2-, 3- and 4-byte characters: what slicing and encoding the text up to each token gives
    text = "naïve 東京 🙂 ok"
    _, spans = hub.encode(text, return_offsets=True)
    got = tei(server, "/tokenize", {"inputs": text, "add_special_tokens": False})[0]
    assert [(t["start"], t["stop"]) for t in got] == [(len(text[:a].encode()), len(text[:b].encode()))
                                                      for a, b in spans[1:-1]]
    assert "/rerank" in ok(httpx.get(server.url + "/openapi.json"))["paths"]


def test_huggingface_hub_inference_client_against_the_server(server, hub):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    # POST / of a classifier is /predict: the client gets the best class first
    best = client.text_classification(SENTENCES[0])
    want = scores_of(hub, "sentiment", SENTENCES[0], "softmax")
    assert best.label == ["negative", "positive"][int(want.argmax())] and abs(best.score - float(want.max())) < 1e-5
    vectors = client.feature_extraction(SENTENCES[:3], normalize=False, truncate=True, truncation_direction="right",
                                        model=server.url + "/embed")
    assert vectors.shape == (3, 64)
    for text, got in zip(SENTENCES, vectors):
        torch.testing.assert_close(torch.from_numpy(got), features(hub, text)[0], atol=1e-5, rtol=1e-5)
    similar = client.sentence_similarity(SENTENCES[0], SENTENCES[1:3], model=server.url + "/similarity")
    source = F.normalize(features(hub, SENTENCES[0])[0], dim=0)
    np.testing.assert_allclose(similar, [float(F.normalize(features(hub, s)[0], dim=0) @ source)
                                         for s in SENTENCES[1:3]], atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="prompt_name is not supported"):  # a field it cannot honour: 422
        client.feature_extraction("a", prompt_name="query", model=server.url + "/embed")


# ---- load: 64 concurrent clients ----------------------------------------------------------------


def test_64_concurrent_clients_are_batched_and_correct(server, hub):
    def metric(text, name):
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    before = httpx.get(server.url + "/metrics").text
    # 64 clients at once, each its own request: embeddings, predictions and masks mixed in one queue
    requests = []
    for i in range(64):
        text = f"{SENTENCES[i % len(SENTENCES)]} (client {i})"
        if i % 8 == 7:
            requests.append(("/rerank", {"query": text, "texts": SENTENCES[:2], "head": "rank"}))
        elif i % 4 == 3:
            requests.append(("/predict", {"inputs": text, "head": "mnli" if i % 8 == 3 else "sentiment"}))
        elif i % 4 == 2:
            requests.append(("/fill-mask", {"inputs": text + " It was <mask>.", "topk": 2}))
        else:
            requests.append(("/embed", {"inputs": [text, SENTENCES[i % 3]], "normalize": False}))

    async def clients():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    responses = asyncio.run(clients())
    after = httpx.get(server.url + "/metrics").text
    for (path, body), response in zip(requests, responses):
        out = ok(response)
        if path == "/embed":
            for text, got in zip(body["inputs"], out):
                torch.testing.assert_close(torch.tensor(got), features(hub, text)[0], atol=1e-5, rtol=1e-5)
        elif path == "/predict":
            want = hub.predict(body["head"], hub.encode(body["inputs"]))[0].exp().sort(descending=True).values
            torch.testing.assert_close(torch.tensor([p["score"] for p in out]), want, atol=1e-5, rtol=1e-5)
        elif path == "/rerank":
            want = hub.rerank(body["query"], body["texts"], head="rank")
            np.testing.assert_allclose([r["score"] for r in out], [w["score"] for w in want], atol=1e-5, rtol=1e-5)
        else:
            want = hub.fill_mask(body["inputs"], topk=2, as_dicts=True)
            assert [c["token"] for c in out["results"][0][0]] == [c["token"] for c in want]
    batches = metric(after, "roberta_batch_requests_count") - metric(before, "roberta_batch_requests_count")
    requests_run = metric(after, "roberta_batch_requests_sum") - metric(before, "roberta_batch_requests_sum")
    singles = (metric(after, 'roberta_batch_requests_bucket{le="1.0"}')
               - metric(before, 'roberta_batch_requests_bucket{le="1.0"}'))
    assert requests_run == 64
    assert batches < 64 and singles < batches, f"{batches} batches for 64 requests, {singles} of one request"
    for name in ("roberta_queue_depth", "roberta_tokens_per_second", "roberta_tokens_total",
                 'roberta_requests_total{endpoint="/embed",status="200"}', "roberta_forward_seconds_count"):
        assert metric(after, name) >= 0
    assert metric(after, "roberta_tokens_per_second") > 0


# ---- bad requests: 4xx JSON, and the server goes on serving ---------------------------------------

BAD = [  # (method, path, body (bytes: sent raw), status, TEI's error type)
    ("POST", "/embed", b'{"inputs": "unterminated', 400, "Validation"),
    ("POST", "/embed", b"", 400, "Validation"),
    ("POST", "/embed", {"inputs": 3}, 422, "Validation"),
    ("POST", "/embed", {"inputs": ["fine", 3]}, 422, "Validation"),
    ("POST", "/embed", {"inputs": "a", "normalize": "yes"}, 422, "Validation"),
    ("POST", "/embed", {"inputs": "a", "pooling": "max"}, 422, "Validation"),
    ("POST", "/embed", {"input": "a"}, 422, "Validation"),  # a typo of a field is not ignored
    ("POST", "/embed", [1, 2], 422, "Validation"),
    ("POST", "/embed", {"inputs": ""}, 422, "Validation"),
    ("POST", "/embed", {"inputs": []}, 400, "Empty"),
    ("POST", "/embed", {"inputs": ["a", ""]}, 422, "Validation"),
    ("POST", "/embed", {"inputs": [0, 10**9]}, 422, "Validation"),  # token ids outside the vocabulary
    ("POST", "/embed", {}, 422, "Validation"),
    ("POST", "/embed", {"inputs": ["a", "b", "c"] * 3}, 413, "Validation"),  # --max-inputs 8
    ("POST", "/embed", {"inputs": LONG}, 413, "Validation"),
    ("POST", "/embed", {"inputs": "x" * 30000}, 413, "Validation"),  # --max-body-bytes 20000
    # TEI fields this server cannot honour: 422, never ignored
    ("POST", "/embed", {"inputs": "a", "prompt_name": "query"}, 422, "Validation"),
    ("POST", "/embed", {"inputs": "a", "truncation_direction": "Left"}, 422, "Validation"),
    ("POST", "/embed", {"inputs": "a", "dimensions": 3}, 422, "Validation"),
    ("POST", "/embed_all", {"inputs": [LONG] * 8, "truncate": True}, 422, "Validation"),  # --max-response-bytes
    ("POST", "/predict", {"inputs": "a", "head": "nli"}, 404, "Validation"),
    # the tagger's and the reader's routes: their schemas first, then the head this model lacks
    ("POST", "/tag", {"inputs": "a", "parameters": {"aggregation_strategy": "best"}}, 422, "Validation"),
    ("POST", "/tag", {"inputs": "a", "parameters": {"stride": -1}}, 422, "Validation"),
    ("POST", "/tag", {"inputs": ["a", 3]}, 422, "Validation"),
    ("POST", "/tag", {"inputs": "a"}, 424, "Backend"),
    ("POST", "/answer", {"inputs": {"question": "q"}}, 422, "Validation"),
    ("POST", "/answer", {"inputs": {"question": "q", "context": "c"}, "parameters": {"top_k": 0}}, 422, "Validation"),
    ("POST", "/answer", {"inputs": {"question": "q", "context": "c"}}, 424, "Backend"),
    ("POST", "/predict", {"inputs": ["a", "b", "c"]}, 422, "Validation"),  # neither a text, a pair nor a batch
    ("POST", "/predict", {"inputs": [["a", "b", "c"]]}, 422, "Validation"),
    ("POST", "/predict", {"inputs": "a", "parameters": {"function_to_apply": "tanh"}}, 422, "Validation"),
    ("POST", "/predict", {"inputs": "a", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}}, 422,
     "Validation"),  # logits and probabilities asked for at once
    ("POST", "/predict", {"inputs": [LONG, LONG]}, 413, "Validation"),  # a long pair without truncate
    ("POST", "/rerank", {"query": "q", "texts": [], "head": "rank"}, 400, "Empty"),
    ("POST", "/rerank", {"query": "q", "texts": ["a"] * 9, "head": "rank"}, 413, "Validation"),
    ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty"),
    ("POST", "/zero-shot", {"inputs": "a", "candidate_labels": ["x"], "head": "sentiment"}, 422, "Validation"),
    ("POST", "/zero-shot", {"inputs": "a", "candidate_labels": [LONG], "head": "mnli"}, 422, "Validation"),  # no room
    *[("POST", "/zero-shot", {"inputs": "a", "candidate_labels": ["x"], "head": "mnli", "hypothesis_template": t},
       422, "Validation") for t in ("no slot", "{:>10000000}", "{0.__class__}", "{0[x]}", "{!r}", "{}{}")],
    ("POST", "/predict", {"inputs": []}, 400, "Empty"),
    ("POST", "/predict", {"inputs": "a", "head": ""}, 404, "Validation"),  # an empty name is a name
    ("POST", "/fill-mask", {"inputs": "no mask here"}, 422, "Validation"),
    ("POST", "/fill-mask", {"inputs": "a <mask>", "topk": 0}, 422, "Validation"),
    ("POST", "/fill-mask", {"inputs": "a <mask>", "topk": 10**6}, 422, "Validation"),
    # every choice repeats the text: 20 masks x topk 1000 is refused before any work (--max-response-bytes)
    ("POST", "/fill-mask", {"inputs": "a <mask> " * 20, "topk": 1000}, 422, "Validation"),
    ("POST", "/fill-mask", {"inputs": LONG + " <mask>"}, 413, "Validation"),
    ("POST", "/decode", {"ids": []}, 400, "Empty"),
    ("POST", "/decode", {"ids": [[31414], []]}, 400, "Empty"),
    ("POST", "/decode", {"ids": [0, 10**9]}, 422, "Validation"),
    ("POST", "/decode", {"ids": ["a"]}, 422, "Validation"),
    ("POST", "/tokenize", {"inputs": "a", "prompt_name": "query"}, 422, "Validation"),
    ("POST", "/tokenize", {"inputs": ""}, 422, "Validation"),
    ("POST", "/tokenize", b'{"inputs": "a\\ud800b"}', 422, "Validation"),  # a lone surrogate: not text
    ("POST", "/v1/embeddings", b'{"input": "a", "model": "m\\ud800"}', 422, "Validation"),  # echoed back
    ("POST", "/v1/embeddings", {"input": []}, 400, "Empty"),
    ("POST", "/v1/embeddings", {"input": "a", "dimensions": 3}, 400, "Validation"),
    ("POST", "/embed", "inputs=a", 415, "Validation"),  # a form, as curl -d sends without -H
    ("GET", "/embed", None, 405, "Validation"),
    ("POST", "/health", None, 405, "Validation"),
    ("GET", "/nowhere", None, 404, "Validation"),
]


def test_a_long_list_of_bad_items_stops_at_its_first_bad_item():
    """Collecting an error per item, in every branch of a union, took 30 s and 2 GB for 2 MB of nulls
    while the event loop waited: every list of a request stops at its first bad item."""
    from pydantic import ValidationError

    from roberta import serve

    n = 10**5
    for schema, body in ((serve.EmbedRequest, {"inputs": [None] * n}), (serve.EmbedRequest, {"inputs": [[None] * n]}),
                         (serve.EmbedRequest, {"inputs": [[-1]] * n}), (serve.PredictRequest, {"inputs": [[None]] * n}),
                         (serve.RerankRequest, {"query": "q", "texts": [None] * n}),
                         (serve.SimilarityRequest, {"inputs": {"source_sentence": "a", "sentences": [1] * n}}),
                         (serve.OpenAIEmbeddingsRequest, {"input": [None] * n}),
                         (serve.TokenizeRequest, {"inputs": [None] * n}), (serve.DecodeRequest, {"ids": [[None]] * n}),
                         (serve.FillMaskRequest, {"inputs": [""] * n}),
                         (serve.ZeroShotRequest, {"inputs": "a", "candidate_labels": [None] * n})):
        for validate in (schema.model_validate, lambda b: schema.model_validate_json(json.dumps(b))):
            with pytest.raises(ValidationError) as caught:
                validate(body)
            assert len(caught.value.errors()) <= 4, (schema.__name__, len(caught.value.errors()))


def test_bad_requests_get_4xx_json_errors_and_serving_goes_on(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, body, status, kind in BAD:
            if isinstance(body, str):  # a form
                response = client.request(method, path, content=body,
                                          headers={"content-type": "application/x-www-form-urlencoded"})
            elif isinstance(body, bytes):
                response = client.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                response = client.request(method, path, json=body)
            assert response.status_code == status, (path, body, response.text)
            error = response.json()
            if path == "/v1/embeddings":  # TEI's OpenAI error
                conforms(error, {"$ref": "#/components/schemas/OpenAICompatErrorResponse"})
                assert error["code"] == status
                message = error["message"]
            else:
                conforms(error, {"$ref": "#/components/schemas/ErrorResponse"})
                assert set(error) == {"error", "error_type"}
                message = error["error"]
            assert error["error_type"] == kind, (path, body, error)
            assert isinstance(message, str) and len(message) > 10 and "\n" not in message, error
            assert client.get("/health").status_code == 200
        assert len(ok(client.post("/embed", json={"inputs": "still here"}))) == 1
        # a route that can truncate says so when the caller left `truncate` out
        assert '"truncate": true' in client.post("/embed", json={"inputs": LONG}).json()["error"]
        metrics = client.get("/metrics").text
    assert re.search(r'roberta_requests_total\{endpoint="/embed",status="422"\} [1-9]', metrics)


# ---- API key, a full queue, SIGTERM with requests in flight ---------------------------------------


def test_api_key_full_queue_and_sigterm_with_requests_in_flight(model_dir, hub):
    # a long --max-wait-ms keeps requests queued (batches never fill), so they are in flight for sure
    s = Server(model_dir, "--max-wait-ms", "1500", "--max-queue", "6", "--max-inputs", "4",
               env={"ROBERTA_API_KEY": "sesame"})
    try:
        key = {"Authorization": "Bearer sesame"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            # every path but /health: the routes, the OpenAPI description and its pages, unknown paths
            for path in ("/embed", "/", "/info", "/metrics", "/openapi.json", "/docs", "/redoc", "/nowhere"):
                response = httpx.request("POST" if path in ("/embed", "/") else "GET", s.url + path, headers=headers,
                                         json={"inputs": "a"} if path in ("/embed", "/") else None, timeout=30)
                assert response.status_code == 401, (path, headers, response.text)
                assert "API key" in response.json()["error"] and response.json()["error_type"] == "Validation"
                assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(s.url + path, headers=key, timeout=30).status_code == 200

        results: dict = {}

        def call(i, inputs):
            results[i] = httpx.post(s.url + "/embed", json={"inputs": inputs, "normalize": False}, headers=key, timeout=60)

        # queue 4 inputs, then 3 more do not fit in --max-queue 6: 429 with Retry-After
        first = threading.Thread(target=call, args=("first", SENTENCES[:4]))
        first.start()
        wait_for_depth(s, key, 4)
        full = httpx.post(s.url + "/embed", json={"inputs": SENTENCES[4:7]}, headers=key, timeout=30)
        assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
        assert full.json()["error_type"] == "Overloaded"
        first.join(timeout=30)
        assert len(ok(results["first"])) == 4

        # a client that leaves while its input waits for a batch has it withdrawn at once: counted as
        # dropped, its request as a 499, and the input never runs (the batches' input count stays put)
        before = httpx.get(s.url + "/metrics", headers=key, timeout=10).text
        ran = float(re.search(r"^roberta_batch_inputs_sum (\S+)$", before, re.M).group(1))
        body = json.dumps({"inputs": SENTENCES[0]}).encode()
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for_depth(s, key, 1)
        deadline = time.monotonic() + 20
        while not re.search(r"^roberta_dropped_inputs_total 1\.0$", text := httpx.get(
                s.url + "/metrics", headers=key, timeout=10).text, re.M) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert re.search(r"^roberta_dropped_inputs_total 1\.0$", text, re.M), text
        assert re.search(r"^roberta_queue_depth 0\.0$", text, re.M)
        assert re.search(r'roberta_requests_total\{endpoint="/embed",status="499"\} 1\.0', text), text
        time.sleep(2)  # past --max-wait-ms: had it stayed queued, it would have run by now
        after = httpx.get(s.url + "/metrics", headers=key, timeout=10).text
        assert float(re.search(r"^roberta_batch_inputs_sum (\S+)$", after, re.M).group(1)) == ran

        # six requests queued, then SIGTERM: all six are answered, then the process exits 0
        threads = [threading.Thread(target=call, args=(i, SENTENCES[i])) for i in range(6)]
        for t in threads:
            t.start()
        wait_for_depth(s, key, 6)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        for i in range(6):
            got = ok(results[i])[0]
            torch.testing.assert_close(torch.tensor(got), features(hub, SENTENCES[i])[0], atol=1e-5, rtol=1e-5)
        assert s.proc.wait(timeout=30) == 0, "".join(s.log)
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


def wait_for_depth(s, key, depth, limit=20.0):
    deadline = time.monotonic() + limit
    while True:
        text = httpx.get(s.url + "/metrics", headers=key, timeout=10).text
        if float(re.search(r"^roberta_queue_depth (\S+)$", text, re.M).group(1)) >= depth:
            return
        assert time.monotonic() < deadline, f"the queue never held {depth} inputs"
        time.sleep(0.02)


def test_a_request_not_answered_in_time_gets_503_and_a_classifier_has_no_fill_mask(model_dir, bpe_dir, tmp_path):
    from roberta.model import RobertaForSequenceClassification

    classifier = tmp_path / "classifier"  # a fine-tuned classifier's checkpoint: no masked-LM head in it
    RobertaForSequenceClassification(RobertaConfig.load(model_dir / "config.json")).save_pretrained(
        classifier, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    s = Server(classifier, "--max-wait-ms", "60000", "--max-batch-requests", "2", "--timeout", "0.3",
               "--read-timeout", "1")
    try:
        no_lm = httpx.post(s.url + "/fill-mask", json={"inputs": "a <mask>"}, timeout=30)
        assert no_lm.status_code == 424 and no_lm.json()["error_type"] == "Backend", no_lm.text
        assert ok(httpx.get(s.url + "/info"))["fill_mask"] is False
        slow = httpx.post(s.url + "/embed", json={"inputs": "waits for a batch that never fills"}, timeout=30)
        assert slow.status_code == 503 and slow.headers["retry-after"] == "1", slow.text
        assert slow.json()["error_type"] == "Unhealthy"
        text = httpx.get(s.url + "/metrics", timeout=10).text  # withdrawn at once, not when a batch comes
        assert re.search(r"^roberta_queue_depth 0\.0$", text, re.M) and \
            re.search(r"^roberta_dropped_inputs_total 1\.0$", text, re.M), text
        # a full batch (two inputs) does not wait, and the timed-out input was dropped from the queue
        assert len(ok(httpx.post(s.url + "/embed", json={"inputs": ["a", "b"]}, timeout=30))) == 2
        text = httpx.get(s.url + "/metrics", timeout=10).text
        assert re.search(r"^roberta_queue_depth 0\.0$", text, re.M)
        # slow connections are closed (--read-timeout 1): a request head sent a byte at a time ...
        assert closed_while_trickling(s, b"POST /embed HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000)
        # ... and a body that stops coming: 408, then the connection goes
        head = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30) as sock:
            sock.sendall(head + b'{"inputs": ')
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"--read-timeout" in answer, answer
        # a client that leaves halfway through its body is counted as such (499), not as a server error
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30) as sock:
            sock.sendall(head + b'{"inputs": ')
        deadline = time.monotonic() + 20
        while not re.search(r'roberta_requests_total\{endpoint="/embed",status="499"\} 1', text) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            text = httpx.get(s.url + "/metrics", timeout=10).text
        assert re.search(r'roberta_requests_total\{endpoint="/embed",status="499"\} 1', text), text
        assert 'status="500"' not in text, text
    finally:
        assert s.stop() == 0, "".join(s.log)


def closed_while_trickling(s, data: bytes) -> bool:
    """Whether the server closes a connection that sends `data` a byte every 50 ms (it never finishes)."""
    with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.settimeout(0.05)
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    return True
            except socket.timeout:
                continue
            except OSError:  # reset by the server
                return True
    return False


def test_a_long_text_is_tokenized_off_the_event_loop_and_other_requests_are_answered_meanwhile(model_dir):
    """Tokenizing a text of 1.9 MB (under the default --max-body-bytes) takes seconds; it runs in a
    worker thread, so /health, /metrics and short requests are answered while it does. (On the event
    loop, every one of them waited for it: no answer came between the long request's start and its end.)"""
    s = Server(model_dir, "--max-response-bytes", "1000000")  # the long /tokenize is refused after tokenizing
    try:
        text = " ".join(SENTENCES * 25000)[:1_900_000]
        done: dict = {}
        thread = threading.Thread(target=lambda: done.update(
            long=httpx.post(s.url + "/tokenize", json={"inputs": text}, timeout=120)))
        thread.start()
        time.sleep(0.5)  # its body sent and read (2 ms here); if it were not yet, the test could only pass
        answered = 0
        while thread.is_alive():
            for path in ("/health", "/metrics"):
                assert httpx.get(s.url + path, timeout=60).status_code == 200
            assert ok(post(s, "/tokenize", {"inputs": "Hello world!"}))[0][1]["id"] == 31414
            answered += thread.is_alive()
        thread.join()
        assert done["long"].status_code == 422 and "this tokenize request would answer" in done["long"].json()["error"]
        assert answered >= 3, answered
    finally:
        assert s.stop() == 0, "".join(s.log)


def test_bad_settings_and_a_busy_port_are_one_line_errors(model_dir, capsys):
    from roberta.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        for flags, expected in ((["--port", str(port)], "cannot listen on 127.0.0.1"),
                                (["--max-batch-tokens", "0"], "max-batch-tokens must be at least 1"),
                                (["--max-queue", "2", "--max-inputs", "4"], "max-queue (2) must hold"),
                                (["--port", "70000"], "port must be between 0 and 65535"),
                                (["--api-key", "sésame"], "the API key must be printable ASCII"),
                                (["--read-timeout", "0"], "read-timeout > 0"),
                                (["--max-response-bytes", "0"], "max-response-bytes must be at least 1")):
            assert main(["serve", "-m", str(model_dir), *flags]) == 2  # refused before the model loads
            err = capsys.readouterr().err
            assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    finally:
        busy.close()


def task_checkpoint(model_dir, bpe_dir, directory, cls_name, **overrides):
    """A tagger or a reader of the served model's size, with random weights (its head's wide, so that
    the labels and spans vary), and the hub that reads it exactly."""
    import dataclasses

    torch.manual_seed(1)
    config = dataclasses.replace(RobertaConfig.load(model_dir / "config.json"),
                                 **{"classification_heads": {}, "head_name": None, "id2label": None, **overrides})
    model = getattr(roberta, cls_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("classifier.", "qa_outputs.")):
                p.normal_(0, 1.0)
    model.save_pretrained(directory, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    return roberta.load(directory, precision="fp32")


def same(ours, theirs):
    """Answers alike: every field equal, scores within float rounding."""
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (ours, theirs)
        return all(same(a, b) for a, b in zip(ours, theirs))
    assert {k: v for k, v in ours.items() if k != "score"} == {k: v for k, v in theirs.items() if k != "score"}
    assert abs(ours["score"] - theirs["score"]) <= 1e-5
    return True


def test_a_tagger_serves_tag_and_a_reader_answer_as_the_library_and_the_inference_client(model_dir, bpe_dir, tmp_path):
    """A token-classification checkpoint answers /tag (and POST /), a question-answering one /answer
    (and POST /), each as the library does; the windows of a long text or context run through the
    batcher; huggingface_hub's client reads both; the other task's route is a 424."""
    from huggingface_hub import InferenceClient

    labels = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    tagger = task_checkpoint(model_dir, bpe_dir, tmp_path / "tagger", "RobertaForTokenClassification",
                             num_labels=5, id2label=labels)
    reader = task_checkpoint(model_dir, bpe_dir, tmp_path / "reader", "RobertaForQuestionAnswering")
    s = Server(tmp_path / "tagger", "--max-wait-ms", "20")
    try:
        assert ok(httpx.get(s.url + "/info"))["model_type"] == {"tagger": {"id2label": {str(i): n for i, n in labels.items()}}}
        found = ok(post(s, "/tag", {"inputs": SENTENCES[:4], "parameters": {"aggregation_strategy": "first"}}))
        assert sum(map(len, found)) > 3 and same(found, [tagger.tag(t, aggregation="first") for t in SENTENCES[:4]])
        assert same(ok(post(s, "/", {"inputs": SENTENCES[0]})), tagger.tag(SENTENCES[0]))
        assert same(ok(post(s, "/tag", {"inputs": LONG, "parameters": {"stride": 16, "ignore_labels": []}})),
                    tagger.tag(LONG, stride=16, ignore_labels=()))
        refused = post(s, "/tag", {"inputs": LONG})  # past the model's limit without a stride
        assert refused.status_code == 422 and "stride" in refused.json()["error"], refused.text
        # 3,100 tokens in windows of 62 that share 16 start every 46 tokens: 68 windows, each an input against 64
        too_many = post(s, "/tag", {"inputs": " ".join(["word"] * 3100), "parameters": {"stride": 16}})
        assert too_many.status_code == 413 and too_many.json()["error"].startswith(
            "the texts make 68 windows of at most 64 tokens, over this server's 64 (--max-inputs)"), too_many.text
        client = InferenceClient(base_url=s.url)
        entities = client.token_classification(SENTENCES[1])
        assert [(e.entity_group, e.start, e.end) for e in entities] == \
            [(e["entity_group"], e["start"], e["end"]) for e in tagger.tag(SENTENCES[1])]
        wrong = post(s, "/answer", {"inputs": {"question": "Who?", "context": "Ada."}})
        assert wrong.status_code == 424 and "question-answering" in wrong.json()["error"], wrong.text
    finally:
        assert s.stop() == 0, "".join(s.log)
    s = Server(tmp_path / "reader", "--max-wait-ms", "20")
    try:
        asked = [{"question": "Who came?", "context": SENTENCES[i]} for i in range(3)] + \
            [{"question": "What words?", "context": LONG}, {"question": "Any?", "context": " "}]
        got = ok(post(s, "/answer", {"inputs": asked, "parameters": {"top_k": 2, "handle_impossible_answer": True}}))
        assert same(got, [reader.answer(q["question"], q["context"], topk=2, no_answer=True) for q in asked])
        assert same(ok(post(s, "/", {"inputs": asked[0]})), reader.answer(asked[0]["question"], asked[0]["context"]))
        best = InferenceClient(base_url=s.url).question_answering(question="Who came?", context=SENTENCES[0])
        want = reader.answer("Who came?", SENTENCES[0])
        assert (best.answer, best.start, best.end) == (want["answer"], want["start"], want["end"])
        wrong = post(s, "/tag", {"inputs": "Ada"})
        assert wrong.status_code == 424 and "token-classification" in wrong.json()["error"], wrong.text
        for parameters, said in (({"max_question_len": 10}, "max_question_len is not supported"),  # never ignored
                                 ({"max_seq_len": 500}, "over this server's 64 tokens"),  # never cut silently
                                 ({"max_seq_len": 32, "doc_stride": 40}, "doc_stride must be between 0 and max_seq_len 32")):
            bad = post(s, "/answer", {"inputs": asked[0], "parameters": parameters})
            assert bad.status_code == 422 and said in bad.json()["error"], (parameters, bad.text)
    finally:
        assert s.stop() == 0, "".join(s.log)

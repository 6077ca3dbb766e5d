"""`roberta serve` as users run it: a real subprocess on a free loopback port, real HTTP clients.

Every answer is compared with what the library gives for the same request alone, on a tiny model saved
here with the real tokenizer and two classification heads.
"""
import asyncio
import base64
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

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
    for name, classes in (("sentiment", 2), ("nli", 3)):
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
    s = Server(model_dir, "--max-wait-ms", "20", "--max-inputs", "8", "--max-body-bytes", "20000")
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


# ---- every endpoint equals the library ------------------------------------------------------------


def test_embed_equals_the_library(server, hub):
    inputs = SENTENCES[:4] + [["A man sleeps.", "A person rests."]]
    for pooling in ("cls", "mean"):
        for normalize in (False, True):
            out = ok(post(server, "/embed", {"inputs": inputs, "pooling": pooling, "normalize": normalize}))
            for text, got, n in zip(inputs, out["embeddings"], out["tokens"]):
                f = features(hub, text)
                want = f[0] if pooling == "cls" else f.mean(0)
                want = F.normalize(want, dim=0) if normalize else want
                assert n == f.shape[0]
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)
    single = ok(post(server, "/embed", {"inputs": "Hello world!"}))  # a string: one vector, <s>, unit length
    torch.testing.assert_close(torch.tensor(single["embeddings"][0]), F.normalize(features(hub, "Hello world!")[0], dim=0),
                               atol=1e-5, rtol=1e-5)
    cut = ok(post(server, "/embed", {"inputs": LONG, "truncate": True, "normalize": False}))
    assert cut["tokens"] == [hub.max_tokens]
    torch.testing.assert_close(torch.tensor(cut["embeddings"][0]), features(hub, LONG, truncate=True)[0], atol=1e-5, rtol=1e-5)


def test_openai_embeddings_equal_the_library(server, hub):
    out = ok(post(server, "/v1/embeddings", {"input": SENTENCES[:3], "model": "tiny"}))
    assert out["object"] == "list" and out["model"] == "tiny"
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == sum(len(hub.encode(s)) for s in SENTENCES[:3])
    encoded = ok(post(server, "/v1/embeddings", {"input": SENTENCES[0], "encoding_format": "base64"}))
    for text, item in zip(SENTENCES, out["data"]):
        want = F.normalize(features(hub, text)[0], dim=0)
        torch.testing.assert_close(torch.tensor(item["embedding"]), want, atol=1e-5, rtol=1e-5)
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, out["data"][0]["embedding"], rtol=1e-6, atol=1e-7)


def test_predict_equals_the_library(server, hub):
    inputs = SENTENCES[:3] + [["A man sleeps.", "A person rests."]]
    default = ok(post(server, "/predict", {"inputs": inputs}))
    assert default["head"] == "sentiment"  # the model's main head
    nli = ok(post(server, "/predict", {"inputs": inputs, "head": "nli"}))
    for out, head, labels in ((default, "sentiment", ["negative", "positive"]), (nli, "nli", ["LABEL_0", "LABEL_1", "LABEL_2"])):
        for text, p in zip(inputs, out["predictions"]):
            want = hub.predict(head, hub.encode(*([text] if isinstance(text, str) else text)))[0].exp()
            torch.testing.assert_close(torch.tensor([s["score"] for s in p["scores"]]), want, atol=1e-5, rtol=1e-5)
            assert [s["label"] for s in p["scores"]] == labels
            assert p["id"] == int(want.argmax()) and p["label"] == labels[p["id"]]
            assert p["score"] == max(s["score"] for s in p["scores"])


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
    out = ok(post(server, "/tokenize", {"inputs": ["Hello world!", ["A man sleeps.", "A person rests."]]}))
    assert out["tokenized"][0] == {"ids": [0, 31414, 232, 328, 2], "tokens": ["<s>", "Hello", "Ġworld", "!", "</s>"]}
    assert out["tokenized"][1]["ids"] == hub.encode("A man sleeps.", "A person rests.").tolist()
    pair = hub.encode("A man sleeps.", "A person rests.").tolist()
    assert ok(post(server, "/decode", {"ids": [0, 31414, 232, 328, 2]})) == {"texts": ["Hello world!"]}
    assert ok(post(server, "/decode", {"ids": [[0, 31414, 232, 328, 2], pair]}))["texts"] == \
        ["Hello world!", ["A man sleeps.", "A person rests."]]
    info = ok(httpx.get(server.url + "/info"))
    assert info["heads"] == {"sentiment": {"classes": 2, "labels": ["negative", "positive"]},
                             "nli": {"classes": 3, "labels": ["LABEL_0", "LABEL_1", "LABEL_2"]}}
    assert info["max_input_tokens"] == hub.max_tokens and info["config"]["hidden_size"] == 64 and info["fill_mask"]
    assert ok(httpx.get(server.url + "/health")) == {"status": "ok"}
    assert "/embed" in ok(httpx.get(server.url + "/openapi.json"))["paths"]


# ---- load: 64 concurrent clients ----------------------------------------------------------------


def test_64_concurrent_clients_are_batched_and_correct(server, hub):
    def metric(text, name):
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    before = httpx.get(server.url + "/metrics").text
    # 64 clients at once, each its own request: embeddings, predictions and masks mixed in one queue
    requests = []
    for i in range(64):
        text = f"{SENTENCES[i % len(SENTENCES)]} (client {i})"
        if i % 4 == 3:
            requests.append(("/predict", {"inputs": [text], "head": "nli" if i % 8 == 3 else "sentiment"}))
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
            for text, got in zip(body["inputs"], out["embeddings"]):
                torch.testing.assert_close(torch.tensor(got), features(hub, text)[0], atol=1e-5, rtol=1e-5)
        elif path == "/predict":
            want = hub.predict(body["head"], hub.encode(body["inputs"][0]))[0].exp()
            got = torch.tensor([s["score"] for s in out["predictions"][0]["scores"]])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
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

BAD = [  # (method, path, body (bytes: sent raw), status, error type)
    ("POST", "/embed", b'{"inputs": "unterminated', 400, "invalid_json"),
    ("POST", "/embed", b"", 400, "invalid_json"),
    ("POST", "/embed", {"inputs": 3}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": ["fine", 3]}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": "a", "normalize": "yes"}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": "a", "pooling": "max"}, 422, "invalid_request"),
    ("POST", "/embed", {"input": "a"}, 422, "invalid_request"),  # a typo of a field is not ignored
    ("POST", "/embed", [1, 2], 422, "invalid_request"),
    ("POST", "/embed", {"inputs": ""}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": []}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": ["a", ""]}, 422, "invalid_request"),
    ("POST", "/embed", {}, 422, "invalid_request"),
    ("POST", "/embed", {"inputs": ["a", "b", "c"] * 3}, 413, "payload_too_large"),  # --max-inputs 8
    ("POST", "/embed", {"inputs": LONG}, 413, "payload_too_large"),
    ("POST", "/embed", {"inputs": "x" * 30000}, 413, "payload_too_large"),  # --max-body-bytes 20000
    ("POST", "/predict", {"inputs": "a", "head": "mnli"}, 404, "unknown_head"),
    ("POST", "/predict", {"inputs": [["only one"]]}, 422, "invalid_request"),
    ("POST", "/fill-mask", {"inputs": "no mask here"}, 400, "invalid_request"),
    ("POST", "/fill-mask", {"inputs": "a <mask>", "topk": 0}, 422, "invalid_request"),
    ("POST", "/fill-mask", {"inputs": "a <mask>", "topk": 10**6}, 422, "invalid_request"),
    ("POST", "/fill-mask", {"inputs": LONG + " <mask>"}, 413, "payload_too_large"),
    ("POST", "/decode", {"ids": []}, 422, "invalid_request"),
    ("POST", "/decode", {"ids": [0, 10**9]}, 422, "invalid_request"),
    ("POST", "/decode", {"ids": ["a"]}, 422, "invalid_request"),
    ("POST", "/v1/embeddings", {"input": "a", "dimensions": 3}, 400, "invalid_request"),
    ("POST", "/embed", "inputs=a", 415, "unsupported_media_type"),  # a form, as curl -d sends without -H
    ("GET", "/embed", None, 405, "http_error"),
    ("GET", "/nowhere", None, 404, "not_found"),
]


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
            error = response.json()["error"]
            assert error["type"] == kind and error["code"] == status, (path, body, error)
            assert isinstance(error["message"], str) and len(error["message"]) > 10, error
            assert ok(client.get("/health")) == {"status": "ok"}
        assert len(ok(client.post("/embed", json={"inputs": "still here"}))["embeddings"]) == 1
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
            for path in ("/embed", "/info", "/metrics"):
                response = httpx.request("POST" if path == "/embed" else "GET", s.url + path, headers=headers,
                                         json={"inputs": "a"} if path == "/embed" else None, timeout=30)
                assert response.status_code == 401, (path, headers, response.text)
                assert response.json()["error"]["type"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        assert ok(httpx.get(s.url + "/health"))["status"] == "ok"  # probes need no key

        results: dict = {}

        def call(i, inputs):
            results[i] = httpx.post(s.url + "/embed", json={"inputs": inputs, "normalize": False}, headers=key, timeout=60)

        # queue 4 inputs, then 3 more do not fit in --max-queue 6: 429 with Retry-After
        first = threading.Thread(target=call, args=("first", SENTENCES[:4]))
        first.start()
        wait_for_depth(s, key, 4)
        full = httpx.post(s.url + "/embed", json={"inputs": SENTENCES[4:7]}, headers=key, timeout=30)
        assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
        assert full.json()["error"]["type"] == "overloaded"
        first.join(timeout=30)
        assert len(ok(results["first"])["embeddings"]) == 4

        # six requests queued, then SIGTERM: all six are answered, then the process exits 0
        threads = [threading.Thread(target=call, args=(i, SENTENCES[i])) for i in range(6)]
        for t in threads:
            t.start()
        wait_for_depth(s, key, 6)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        for i in range(6):
            got = ok(results[i])["embeddings"][0]
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
    s = Server(classifier, "--max-wait-ms", "60000", "--max-batch-requests", "2", "--timeout", "0.3")
    try:
        no_lm = httpx.post(s.url + "/fill-mask", json={"inputs": "a <mask>"}, timeout=30)
        assert no_lm.status_code == 409 and no_lm.json()["error"]["type"] == "no_lm_head", no_lm.text
        assert ok(httpx.get(s.url + "/info"))["fill_mask"] is False
        slow = httpx.post(s.url + "/embed", json={"inputs": "waits for a batch that never fills"}, timeout=30)
        assert slow.status_code == 503 and slow.headers["retry-after"] == "1", slow.text
        assert slow.json()["error"]["type"] == "timeout"
        # a full batch (two inputs) does not wait, and the timed-out input was dropped from the queue
        assert len(ok(httpx.post(s.url + "/embed", json={"inputs": ["a", "b"]}, timeout=30))["embeddings"]) == 2
        text = httpx.get(s.url + "/metrics", timeout=10).text
        assert re.search(r"^roberta_queue_depth 0\.0$", text, re.M)
    finally:
        assert s.stop() == 0, "".join(s.log)


def test_predict_naming_no_head_on_a_model_without_one_is_404(bpe_dir, tmp_path):
    encoder = tmp_path / "encoder"  # a pretrained masked LM: no classification head to default to
    RobertaForMaskedLM(RobertaConfig.tiny(max_position_embeddings=66)).save_pretrained(
        encoder, tokenizer=RobertaTokenizer.from_pretrained(bpe_dir))
    s = Server(encoder)
    try:
        response = httpx.post(s.url + "/predict", json={"inputs": "a great movie"}, timeout=30)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == {
            "message": "no head was named and this model has no single one (this model has: none); name one in \"head\"",
            "type": "unknown_head", "code": 404}
    finally:
        assert s.stop() == 0, "".join(s.log)


def test_bad_settings_and_a_busy_port_are_one_line_errors(model_dir, capsys):
    import socket

    from roberta.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        for flags, expected in ((["--port", str(port)], "cannot listen on 127.0.0.1"),
                                (["--max-batch-tokens", "0"], "max-batch-tokens must be at least 1"),
                                (["--max-queue", "2", "--max-inputs", "4"], "max-queue (2) must hold"),
                                (["--port", "70000"], "port must be between 0 and 65535")):
            assert main(["serve", "-m", str(model_dir), *flags]) == 2  # refused before the model loads
            err = capsys.readouterr().err
            assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    finally:
        busy.close()

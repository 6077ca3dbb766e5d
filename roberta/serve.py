"""`roberta serve`: one model behind text-embeddings-inference's HTTP API, with requests from many
callers batched together.

    roberta serve -m demo-out/pretrain/final --port 8080
    curl -s localhost:8080/embed -H 'content-type: application/json' -d '{"inputs": ["Hello world!"]}'

The routes, request fields and answers are those of Hugging Face's text-embeddings-inference (TEI):
/embed, /embed_all, /predict, /rerank, /similarity, /tokenize, /decode, /info, /health, /metrics, POST /
(dispatched by the model's kind, as TEI does) and OpenAI's /v1/embeddings, so TEI's clients
(huggingface_hub's InferenceClient, LangChain's and LlamaIndex's TEI classes) work unchanged. This
project's own pipelines keep routes of their own: /fill-mask and /zero-shot. See docs/serving.md.

A server that runs each request alone wastes what makes the encoder fast: the padding-free batches.
Here every request is split into its inputs, the inputs wait in one bounded queue, and one worker thread
takes them in arrival order into batches of at most `max_batch_tokens` real tokens and
`max_batch_requests` inputs (as text-embeddings-inference does; padding costs nothing, so the budget
counts real tokens). A batch closes when a budget is full or when no input has come for `max_wait_ms`
(at most ten such waits in all): while a forward pass has the cores, requests pile up unread in the
sockets, and the event loop hands them over one by one afterwards, so a fixed wait after the oldest
input would close the next batch on the first one or two of them. Then the worker runs the batch
through the encoder once (`inference.extract_features_batched`), applies each input's head (pooling,
a classification head, the masked-LM head at the masks), and hands each caller its own rows: the
numbers the library gives for that request alone, within float rounding.

The HTTP side is FastAPI on uvicorn: the request and response schemas below are pydantic models, so
they are validated on the way in and listed at /openapi.json (/docs renders them). Every error is
TEI's JSON, {"error", "error_type"}, with a 4xx status when the caller can fix it.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import hmac
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Union

import torch
import torch.nn.functional as F

from .errors import RobertaError
from .inference import extract_features_batched

try:
    import orjson
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the web stack is the `serve` extra: the library itself does not need it
    raise RobertaError(f"roberta serve needs {exc.name}: pip install 'roberta[serve]'") from None

API_KEY_ENV = "ROBERTA_API_KEY"
INLINE_CHARS = 1 << 14  # a request's text tokenized on the event loop, past it in a worker thread (about 10 ms)


@dataclass
class ServeSettings:
    """How the server batches and what it refuses; checked when built (bad values are one-line errors)."""

    max_batch_tokens: int = 8192     # real tokens in one forward pass
    max_batch_requests: int = 128    # inputs in one forward pass (1: no batching)
    max_wait_ms: float = 2.0         # a batch closes when no input has come for this long (or budgets are full)
    max_queue: int = 2048            # inputs waiting; past it requests get 429 with Retry-After
    max_inputs: int = 64             # inputs in one request (413 past it)
    max_input_tokens: int | None = None  # tokens in one input (default: the model's limit); 413 or truncate
    max_body_bytes: int = 2 * 2**20  # request body size (413 past it)
    timeout_s: float = 30.0          # a request not answered by then gets 503 and its queued inputs are dropped
    pooling: Literal["cls", "mean"] = "cls"  # the default of /embed and what /v1/embeddings uses
    max_response_bytes: int = 64 * 2**20  # an answer's size, estimated before any work (422 past it)
    read_timeout_s: float = 15.0     # a request's head, and then its body, must arrive within this (else closed / 408)
    api_key: str | None = field(default=None, repr=False)  # Bearer key every endpoint but /health asks for

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_batch_requests", "max_queue", "max_inputs", "max_body_bytes",
                     "max_response_bytes"):
            if getattr(self, name) < 1:
                raise RobertaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.read_timeout_s <= 0:
            raise RobertaError("max-wait-ms must be >= 0, and timeout and read-timeout > 0")
        if self.max_input_tokens is not None and self.max_input_tokens < 3:
            raise RobertaError(f"max-input-tokens must be at least 3 (<s>, a token, </s>), got {self.max_input_tokens}")
        if self.max_queue < self.max_inputs:
            raise RobertaError(f"max-queue ({self.max_queue}) must hold at least one full request "
                               f"(max-inputs {self.max_inputs})")
        if self.pooling not in ("cls", "mean"):
            raise RobertaError(f"pooling must be cls or mean, got {self.pooling!r}")
        if self.api_key == "":
            raise RobertaError(f"the API key is empty; pass a non-empty --api-key (or {API_KEY_ENV}), or none")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            # an HTTP header carries ASCII: such a key could never be sent, so no request could match it
            raise RobertaError("the API key must be printable ASCII (an HTTP header cannot carry other characters); "
                               f"choose another --api-key (or {API_KEY_ENV})")


class HTTPError(Exception):
    """An answer other than 200, as TEI's JSON error: {"error", "error_type"}; `kind` is one of TEI's
    error types (Validation, Empty, Overloaded, Unhealthy, Backend, Tokenizer)."""

    def __init__(self, status: int, message: str, kind: str = "Validation", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class JSONResponse(Response):
    """JSON through orjson: a 768-float embedding is encoded ~10x faster than by the json module (which
    took a quarter of the server's time under load), and float32 arrays as their shortest float32 text,
    which reads back to the same float32 values."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, kind: str, headers: dict | None = None,
                   path: str | None = None) -> JSONResponse:
    """TEI's error body, {"error", "error_type"}; on /v1/embeddings TEI's OpenAI one, {"message", "code",
    "error_type"}."""
    if path == "/v1/embeddings":
        return JSONResponse({"message": message, "code": status, "error_type": kind}, status, headers=headers)
    return JSONResponse({"error": message, "error_type": kind}, status, headers=headers)


def byte_offsets(text: str) -> "np.ndarray":
    """The UTF-8 byte offset of each character position of `text`, its end included: the tokenizer gives
    character offsets, TEI's /tokenize answers bytes (one pass, where slicing and encoding the text up
    to every token took time quadratic in its length)."""
    import numpy as np

    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    widths = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])


# ---- metrics ------------------------------------------------------------------------------------


class Metrics:
    """Prometheus counters and histograms, in a registry of their own (one per server)."""

    def __init__(self, queue_depth):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("roberta_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("roberta_request_seconds", "time from request to response", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        counts = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_inputs = Histogram("roberta_batch_inputs", "inputs in one forward pass", buckets=counts, registry=r)
        self.batch_requests = Histogram("roberta_batch_requests", "distinct requests in one forward pass",
                                        buckets=counts, registry=r)
        self.batch_tokens = Histogram("roberta_batch_tokens", "real tokens in one forward pass",
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.queue_wait = Histogram("roberta_queue_seconds", "time an input waited in the queue",
                                    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5), registry=r)
        self.forward = Histogram("roberta_forward_seconds", "time of one batch's forward pass and heads",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.tokens = Counter("roberta_tokens", "tokens run through the model", registry=r)
        self.rejected = Counter("roberta_rejected", "requests refused because the queue was full", registry=r)
        self.dropped = Counter("roberta_dropped_inputs", "queued inputs dropped unrun: their request timed out or "
                               "its client left", registry=r)
        Gauge("roberta_queue_depth", "inputs waiting for a batch", registry=r).set_function(queue_depth)
        self._recent: collections.deque = collections.deque()  # (time, tokens) of the last batches
        self._lock = threading.Lock()
        Gauge("roberta_tokens_per_second", "tokens run through the model per second over the last 10 s",
              registry=r).set_function(self.tokens_per_second)

    def batch(self, inputs: int, requests: int, tokens: int, seconds: float) -> None:
        self.batch_inputs.observe(inputs)
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)
        self.forward.observe(seconds)
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))

    def tokens_per_second(self, window: float = 10.0) -> float:
        with self._lock:
            while self._recent and self._recent[0][0] < time.monotonic() - window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---- the batcher --------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's inputs for one kind of answer, and where the worker puts the answers."""

    kind: Literal["embed", "embed_all", "predict", "fill-mask", "tokens", "spans"]
    sequences: list[torch.Tensor]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    options: dict[str, Any] = field(default_factory=dict)  # pooling, normalize / head / topk
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # timed out, its client left, or its batch failed: nothing more is run for it

    def __post_init__(self):
        self.results: list = [None] * len(self.sequences)
        self.remaining = len(self.sequences)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """Resolve the caller's future from the worker thread (the loop owns it)."""
        def done():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)
        self.loop.call_soon_threadsafe(done)


class Overloaded(Exception):
    pass


class Batcher:
    """A bounded queue of inputs and one worker thread that runs them through the model in batches."""

    def __init__(self, hub, settings: ServeSettings):
        self.hub, self.settings = hub, settings
        self.metrics = Metrics(lambda: self.depth)
        self._queue: collections.deque[tuple[Job, int]] = collections.deque()  # (job, input index)
        self._queued_tokens = 0
        self._last_arrival = 0.0  # when the newest input came
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="roberta-batcher", daemon=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise HTTPError(503, "the server is shutting down; retry on another replica",
                                "unavailable", {"Retry-After": "1"})
            if len(self._queue) + len(job.sequences) > self.settings.max_queue:
                self.metrics.rejected.inc()
                raise Overloaded()
            for i, ids in enumerate(job.sequences):
                self._queue.append((job, i))
                self._queued_tokens += len(ids)
            self._last_arrival = job.arrived
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Drop `job`'s inputs still queued (its request timed out or its client left), so that they
        neither run nor hold room in the queue; inputs already in a batch run to the end."""
        job.cancelled = True
        with self._cond:
            kept = collections.deque(entry for entry in self._queue if entry[0] is not job)
            dropped = len(self._queue) - len(kept)
            if dropped:
                self._queued_tokens -= sum(len(job.sequences[i]) for j, i in self._queue if j is job)
                self._queue = kept
        self.metrics.dropped.inc(dropped)

    # -- the worker thread

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._process(batch)

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Up to the budgets, oldest first; waits for more while inputs keep coming: until none has come
        for max_wait_ms (counted from now at the earliest), at most 10 x max_wait_ms in all."""
        s = self.settings
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            now = time.monotonic()
            gap, last_deadline = s.max_wait_ms / 1000, now + 10 * s.max_wait_ms / 1000
            while (not self._stopping and len(self._queue) < s.max_batch_requests
                   and self._queued_tokens < s.max_batch_tokens):
                deadline = min(max(self._last_arrival, now) + gap, last_deadline)
                if time.monotonic() >= deadline:
                    break
                self._cond.wait(deadline - time.monotonic())
            batch, tokens = [], 0
            while self._queue and len(batch) < s.max_batch_requests:
                job, i = self._queue[0]
                n = len(job.sequences[i])
                if batch and tokens + n > s.max_batch_tokens:
                    break  # it leads the next batch
                self._queue.popleft()
                self._queued_tokens -= n
                if not job.cancelled:
                    batch.append((job, i))
                    tokens += n
            return batch

    def _process(self, batch: list[tuple[Job, int]]) -> None:
        start = time.monotonic()
        for job, _ in batch:
            self.metrics.queue_wait.observe(start - job.arrived)
        jobs = list(dict.fromkeys(job for job, _ in batch))
        try:
            outputs = self._forward([job.sequences[i] for job, i in batch], batch)
        except Exception as exc:  # a bug or an out-of-memory: these callers get a 500, the server goes on
            for job in jobs:
                job.cancelled = True
                job.settle(error=exc)
            return
        for (job, i), out in zip(batch, outputs):
            job.results[i] = out
            job.remaining -= 1
            if job.remaining == 0:
                job.settle(job.results)
        self.metrics.batch(len(batch), len(jobs), sum(len(job.sequences[i]) for job, i in batch),
                           time.monotonic() - start)

    @torch.inference_mode()
    def _forward(self, sequences: list[torch.Tensor], batch: list[tuple[Job, int]]) -> list:
        """One encoder pass over every input of the batch, then each input's own head."""
        model = self.hub.model
        longest = max(len(s) for s in sequences)
        # One forward pass: the budget given covers the whole batch padded to its longest input.
        features = extract_features_batched(model, sequences, batch_tokens=longest * len(sequences))
        dtype = model.get_input_embeddings().weight.dtype  # the heads' dtype (bf16 in bf16 mode)
        outputs: list = [None] * len(batch)
        by_head: dict[str, list[int]] = collections.defaultdict(list)
        masked: list[int] = []
        per_token: list[int] = []  # a tagger's or a reader's windows: their head on every token
        embedded: dict[int, torch.Tensor] = {}
        for row, ((job, _), f) in enumerate(zip(batch, features)):
            if job.kind == "embed":
                v = f[0] if job.options["pooling"] == "cls" else f.mean(0)
                embedded[row] = F.normalize(v, dim=0) if job.options["normalize"] else v
            elif job.kind == "embed_all":
                outputs[row] = f.float().cpu().numpy()
            elif job.kind == "predict":
                by_head[job.options["head"]].append(row)
            elif job.kind in ("tokens", "spans"):
                per_token.append(row)
            else:
                masked.append(row)
        if per_token:  # token-classification logits [T, labels], or a reader's (start [T], end [T])
            head = model.classifier if hasattr(model, "classifier") else model.qa_outputs
            scores = head(torch.cat([features[r] for r in per_token]).to(dtype)).float().cpu().numpy()
            first = 0
            for r in per_token:
                n = len(sequences[r])
                outputs[r] = scores[first:first + n] if batch[r][0].kind == "tokens" else \
                    (scores[first:first + n, 0], scores[first:first + n, 1])
                first += n
        if embedded:  # float32 on the host in one copy (features stay on the model's device; a GPU waits once)
            for row, v in zip(embedded, torch.stack(list(embedded.values())).cpu().numpy()):
                outputs[row] = v
        for head, rows in by_head.items():
            first = torch.stack([features[r][0] for r in rows]).to(dtype)
            logits = model.classification_heads[head](first).float()  # each route makes its own scores
            for r, row in zip(rows, logits.tolist()):
                outputs[r] = row
        if masked:
            mask_id = self.hub.tokenizer.mask_token_id
            # the masks' places found in the host's ids: chosen on a GPU, they would make it wait
            at = [sequences[r].eq(mask_id).nonzero().squeeze(1) for r in masked]
            hidden = torch.cat([features[r].index_select(0, m.to(features[r].device, non_blocking=True))
                                for r, m in zip(masked, at)]).to(dtype)
            logits = model.lm_head(hidden, model.roberta.embeddings.word_embeddings.weight)
            topk = max(batch[r][0].options["topk"] for r in masked)
            probs, predicted = logits.float().softmax(-1).topk(topk, dim=-1)
            probs, predicted = probs.tolist(), predicted.tolist()
            start = 0
            for r, m in zip(masked, at):
                n, k = len(m), batch[r][0].options["topk"]
                outputs[r] = ([p[:k] for p in probs[start:start + n]], [t[:k] for t in predicted[start:start + n]])
                start += n
        return outputs


# ---- request and response schemas: text-embeddings-inference's ------------------------------------
# The fields, defaults and answer shapes of TEI's OpenAPI description (docs/openapi.json in
# huggingface/text-embeddings-inference), so that its clients work unchanged. A TEI field this server
# cannot honour (prompt_name, truncation_direction "Left", dimensions other than the model's) is
# answered 422 naming it, never ignored; `head` and `pooling` are this server's additions.

# Every list stops at its first bad item (fail_fast): collecting an error per item of a 2 MB list of
# nulls, in every branch of a union, took pydantic 30 s and 2 GB, the event loop blocked meanwhile.
FAST = Field(fail_fast=True)
Text = Annotated[str, StringConstraints(min_length=1)]  # a constraint makes pydantic refuse lone surrogates too
Texts = Annotated[list[Text], FAST]
Ids = Annotated[list[Annotated[int, Field(ge=0)]], FAST]
# TEI's Input: a text, token ids, or a list of them
Input = Union[Text, Ids, Annotated[list[Union[Text, Ids]], FAST]]
Pair = Annotated[list[Text], Field(min_length=1, max_length=2)]
# a text, a [text] or [first, second], or a list of those
PredictInput = Union[Text, Pair, Annotated[list[Pair], FAST]]
Direction = Literal["Right", "right", "Left", "left"]
INPUTS_DOC = "a text, a list of token ids, or a list of texts / token id lists"

TEXTS_HINT = "a non-empty text or a list of them"
FIELD_HINTS = {  # by field, or by (route, field) where a route takes another shape
    "inputs": "a non-empty text, a list of token ids, or a list of those",
    ("/predict", "inputs"): "a text, a [first, second] pair, or a list of [text] / [first, second]",
    ("/tokenize", "inputs"): TEXTS_HINT, ("/fill-mask", "inputs"): TEXTS_HINT, ("/zero-shot", "inputs"): TEXTS_HINT,
    "input": TEXTS_HINT,
    "ids": "a list of token ids, or a list of such lists",
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Truncation(Body):
    truncate: bool | None = Field(None, description="cut inputs past the token limit instead of answering 413 "
                                  "(default false)")
    truncation_direction: Direction = Field("Right", description="only Right (the end is cut) is supported")


class Prompted(Truncation):
    prompt_name: str | None = Field(None, description="not supported: prepend the prompt to the text")


class EmbedRequest(Prompted):
    inputs: Input = Field(description=INPUTS_DOC)
    normalize: bool = Field(True, description="scale each vector to unit length")
    dimensions: int | None = Field(None, description="only the model's own width (or null) is supported")
    pooling: Literal["cls", "mean"] | None = Field(None, description="this server's addition: the <s> vector, or "
                                                   "the mean over the tokens (default: the server's --pooling)")


class EmbedAllRequest(Prompted):
    inputs: Input = Field(description=INPUTS_DOC)


class ClassificationParameters(Body):  # what huggingface_hub's InferenceClient.text_classification sends
    top_k: int | None = Field(None, ge=1, description="the best k classes only")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class PredictRequest(Truncation):
    inputs: PredictInput = Field(description="a text, a [first, second] pair, or a list of [text] / [first, second]")
    raw_scores: bool = Field(False, description="logits instead of probabilities")
    head: str | None = Field(None, description="this server's addition: the classification head (default: the "
                             "model's main or only one)")
    parameters: ClassificationParameters | None = None


class Prediction(BaseModel):
    score: float
    label: str


class RerankRequest(Truncation):
    query: Text
    texts: Texts
    raw_scores: bool = Field(False, description="logits instead of the cross-encoder's activation")
    return_text: bool = False
    head: str | None = Field(None, description="this server's addition: the one-output head")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class SimilarityInput(Body):
    source_sentence: Text
    sentences: Texts


class SimilarityRequest(Body):
    inputs: SimilarityInput
    parameters: Prompted | None = None


class OpenAIEmbeddingsRequest(Body):
    input: Union[Text, Texts]
    model: Annotated[str, StringConstraints(max_length=1000)] | None = None  # echoed back: valid UTF-8 only
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 with base64")


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class TokenizeRequest(Body):
    inputs: Union[Text, Texts]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, description="not supported: prepend the prompt to the text")


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="byte offset in the input (null for special tokens)")
    stop: int | None


class DecodeRequest(Body):
    ids: Union[Ids, Annotated[list[Ids], FAST]] = Field(description="one sequence of token ids, or a list of them")
    skip_special_tokens: bool = True


class FillMaskRequest(Body):
    inputs: Union[Text, Texts] = Field(description="a text holding one or more <mask>, or a list of them")
    topk: int = Field(5, ge=1, le=1000, description="candidates per mask")


class FillMaskChoice(BaseModel):
    sequence: str
    score: float
    token: int
    token_str: str


class FillMaskResponse(BaseModel):
    results: list[list[list[FillMaskChoice]]] = Field(description="per input, per <mask>, the topk choices")


class ZeroShotRequest(Truncation):
    inputs: Union[Text, Texts]
    candidate_labels: Union[Text, Texts] = Field(description="a list of labels, or one comma-separated text")
    hypothesis_template: Text = "This example is {}."
    multi_label: bool = False
    head: str | None = Field(None, description="the NLI head (default: the model's main or only one, or mnli)")


class ZeroShotResult(BaseModel):
    sequence: str
    labels: list[str]
    scores: list[float]


class TagParameters(Body):  # what huggingface_hub's InferenceClient.token_classification sends
    aggregation_strategy: Literal["none", "simple", "first", "max", "average"] = "simple"
    stride: int | None = Field(None, ge=0, description="tokens shared by neighbouring windows of a long text "
                               "(without it, a text past the model's limit is refused)")
    ignore_labels: list[str] | None = Field(None, description="labels left out (default [\"O\"])")


class TagRequest(Body):
    inputs: Union[Text, Texts]
    parameters: TagParameters | None = None


class Entity(BaseModel):
    entity_group: str | None = None  # aggregated
    entity: str | None = None        # aggregation "none"
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


class Question(Body):
    question: Text
    context: str


class AnswerParameters(Body):  # what huggingface_hub's InferenceClient.question_answering sends
    top_k: int = Field(1, ge=1, le=100)
    doc_stride: int | None = Field(None, ge=0)
    max_answer_len: int = Field(15, ge=1)
    max_seq_len: int | None = Field(None, ge=5)
    max_question_len: int | None = Field(None, description="not supported (422): a question is never cut")
    handle_impossible_answer: bool = Field(False, description="allow the empty answer (SQuAD 2.0)")
    align_to_words: bool = True


class AnswerRequest(Body):
    inputs: Union[Question, Annotated[list[Question], FAST]]
    parameters: AnswerParameters | None = None


class Answer(BaseModel):
    answer: str
    score: float
    start: int
    end: int


class TEIError(BaseModel):
    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


# ---- the application ----------------------------------------------------------------------------


def create_app(hub, settings: ServeSettings, model_name: str = "roberta", precision: str = "fp32") -> FastAPI:
    """The ASGI application serving `hub` (a loaded `RobertaHub`, in eval mode)."""
    from . import pairs, spans
    from .hub import encode_within
    from .model import RobertaForMaskedLM, RobertaForQuestionAnswering, RobertaForTokenClassification

    batcher = Batcher(hub, settings)
    metrics = batcher.metrics
    config = hub.model.config
    limit = min(settings.max_input_tokens or hub.max_tokens, hub.max_tokens)
    pair_limit = min(limit, hub.pair_limit())
    vocab = len(hub.tokenizer)
    heads = {name: head.out_proj.out_features for name, head in getattr(hub.model, "classification_heads", {}).items()}
    # a fine-tuned classifier's id2label (`hub.labels`), LABEL_i where the checkpoint names none
    labels = {name: hub.labels(name) or [f"LABEL_{i}" for i in range(n)] for name, n in heads.items()}
    # a checkpoint without its masked-LM head (a fine-tuned classifier) got a random one when loaded
    has_lm_head = isinstance(hub.model, RobertaForMaskedLM) and hub.has_lm_head()
    # TEI's model type, which decides what POST / does: a model whose main head has one output ranks,
    # one with another main head classifies, a tagger tags and a reader answers (the Inference API's
    # token-classification and question-answering tasks), any other embeds
    main = config.head_name if config.head_name in heads else None
    tagger, reader = (isinstance(hub.model, cls) and not any(k.startswith(prefix)
                                                             for k in getattr(hub.model, "missing_keys", []))
                      for cls, prefix in ((RobertaForTokenClassification, "classifier."),
                                          (RobertaForQuestionAnswering, "qa_outputs.")))
    model_type = "tagger" if tagger else "reader" if reader else \
        "reranker" if main and heads[main] == 1 else "classifier" if main else "embedding"

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # uvicorn has stopped accepting and finished the requests in flight: drain and stop the worker
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title="roberta serve", version=_version(), lifespan=lifespan,
                  description="RoBERTa inference with dynamic batching, on text-embeddings-inference's API. "
                              "Errors: {\"error\", \"error_type\"} (/v1/embeddings: {\"message\", \"code\", "
                              "\"error_type\"}). Every endpoint but /health takes `Authorization: Bearer KEY` "
                              "when the server has an API key.")
    app.state.batcher = batcher

    # -- errors: always JSON, 4xx for what the caller can fix

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.headers, request.url.path)

    @app.exception_handler(RobertaError)
    async def _roberta_error(request, exc: RobertaError):  # what the library refuses of a request's input
        return error_response(422, str(exc), "Validation", path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors, path = exc.errors(), request.url.path
        if any(e.get("type") == "json_invalid" or (e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",))
               for e in errors):
            return error_response(400, "the body is not valid JSON: send a JSON object, e.g. "
                                       "{\"inputs\": \"Hello world!\"}", "Validation", path=path)
        first = errors[0]
        loc = [part for part in first.get("loc", ()) if part != "body"]
        name = str(loc[0]) if loc else "body"
        hint = FIELD_HINTS.get((path, name), FIELD_HINTS.get(name))
        if sum(1 for e in errors if e.get("loc", ())[1:2] == (name,)) > 1 and hint:
            message = f"{name} must be {hint}"  # a union: one error per branch says less than this
        elif first.get("type") == "extra_forbidden":
            message = f"{'.'.join(map(str, loc))}: this server has no such field (a typo, or a field of another API)"
        else:
            message = f"{'.'.join(map(str, loc)) or 'body'}: {first.get('msg')}"
        return error_response(422, f"{message}; see /openapi.json for the schema", "Validation", path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc: StarletteHTTPException):
        where, path = f"{request.method} {request.url.path}", request.url.path
        if exc.status_code == 404:
            return error_response(404, f"no endpoint {where}; /openapi.json lists them", "Validation", path=path)
        if exc.status_code == 405:
            allowed = exc.headers.get("Allow", "another method") if exc.headers else "another method"
            return error_response(405, f"{where} is not allowed: {request.url.path} takes {allowed}", "Validation",
                                  exc.headers, path)
        return error_response(exc.status_code, f"{where}: {exc.detail}", "Validation", exc.headers, path)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "Backend", path=request.url.path)

    # -- the work

    def check_count(n: int, what: str = "inputs") -> None:
        if n == 0:
            raise HTTPError(400, f"`{what}` cannot be empty", "Empty")
        if n > settings.max_inputs:
            raise HTTPError(413, f"batch size {n} > maximum allowed batch size {settings.max_inputs} (--max-inputs): "
                                 "split the request", "Validation")

    def check_windows(n: int) -> None:
        """A long text's windows each count as an input of the request (/tag, /answer)."""
        if n > settings.max_inputs:
            raise HTTPError(413, f"the texts make {n} windows of at most {limit} tokens, over this server's "
                                 f"{settings.max_inputs} (--max-inputs); send fewer or shorter texts, or overlap the "
                                 "windows less (stride, doc_stride)", "Validation")

    def unsupported(body) -> None:
        """422 for the TEI fields this server cannot honour (never silently ignored)."""
        options = body.parameters if isinstance(getattr(body, "parameters", None), Prompted) else body
        if getattr(options, "prompt_name", None) is not None:
            raise HTTPError(422, "prompt_name is not supported by this server: prepend the prompt to the text",
                            "Validation")
        if getattr(options, "truncation_direction", "Right").lower() != "right":
            raise HTTPError(422, "truncation_direction Left is not supported by this server: it cuts the end of an "
                                 "input (Right); drop the field or send Right", "Validation")

    def too_long(n: int, tokens: int | None, most: int, truncate: bool | None) -> HTTPError:
        offer = "" if truncate is None else "send \"truncate\": true to cut it to fit, or "
        count = f"{tokens} tokens" if tokens is not None else f"more than {most} tokens"
        return HTTPError(413, f"input {n} has {count} but this server takes at most {most}; {offer}shorten it",
                         "Validation")

    async def off_loop(texts, work):
        """`work()`, in a worker thread where `texts` (strings, pairs or token-id lists) are long: tokenizing
        2 MB of text takes about 1.5 s, and on the event loop that would hold every other request, /health
        and /metrics as long. Short ones run in line, without the hand-off to a thread."""
        if sum(len(t) if isinstance(t, str) else sum(len(x) for x in t if isinstance(x, str)) for t in texts) \
                <= INLINE_CHARS:
            return work()
        return await asyncio.to_thread(work)

    async def prepare(inputs, truncate: bool | None, encode=None, what: str = "inputs") -> list[torch.Tensor]:
        """Token ids of each input (a text, token ids, or a (first, second) pair) within the limits;
        truncate None: the endpoint cannot truncate (False: it can, and the caller did not ask)."""
        check_count(len(inputs), what)
        return await off_loop(inputs, lambda: tokenized(inputs, truncate, encode))

    def tokenized(inputs, truncate: bool | None, encode) -> list[torch.Tensor]:
        sequences = []
        for n, item in enumerate(inputs):
            if isinstance(item, tuple):  # a sentence pair: cut longest-first, as the tokenizers do, tokenizing
                try:                     # no more of two long texts than that needs
                    ids = torch.tensor(encode_within(hub.tokenizer, list(item), pair_limit, truncate))
                except RobertaError:
                    raise too_long(n, None, pair_limit, truncate) from None
            else:
                if isinstance(item, list):  # token ids, taken as they are (TEI's InputIds)
                    bad = [i for i in item if i >= vocab]
                    if bad or not item:
                        raise HTTPError(422, f"input {n}: token id {bad[0]} is outside this vocabulary (0 to "
                                             f"{vocab - 1})" if bad else f"input {n} has no token ids", "Validation")
                    ids = torch.tensor(item, dtype=torch.long)
                elif encode:
                    ids = encode(item)
                else:  # a chunk at a time, no further than the limit needs: a 2 MB text is not tokenized whole
                    try:
                        ids = torch.tensor(encode_within(hub.tokenizer, [item], limit, truncate))
                    except RobertaError:
                        raise too_long(n, None, limit, truncate) from None
                if len(ids) > limit:
                    if not truncate:
                        raise too_long(n, len(ids), limit, truncate)
                    ids = hub._fit(ids[None], True, limit)[0]
            sequences.append(ids)
        return sequences

    def check_answer_size(estimate: int, what: str) -> None:
        """Refuse, before any work, a request whose answer would be over --max-response-bytes."""
        if estimate > settings.max_response_bytes:
            raise HTTPError(422, f"{what} would answer about {estimate:,} bytes, over this server's "
                                 f"{settings.max_response_bytes:,} (--max-response-bytes); ask for less", "Validation")

    async def run(kind: str, sequences: list[torch.Tensor], **options) -> list:
        """The answers for `sequences`, from the batcher; while they wait, a client that closes its
        connection has its inputs withdrawn from the queue (a 499 that nobody reads), as does one not
        answered within --timeout (503)."""
        loop = asyncio.get_running_loop()
        job = Job(kind, sequences, loop, loop.create_future(), options)
        try:
            batcher.submit(job)
        except Overloaded:
            raise HTTPError(429, f"Model is overloaded: the queue is full ({settings.max_queue} inputs waiting, "
                                 "--max-queue); retry after a second", "Overloaded", {"Retry-After": "1"}) from None
        receive = _client.get(None)  # the connection's own, its body already read: it next says "disconnect"
        left = asyncio.ensure_future(receive()) if receive is not None else loop.create_future()
        try:
            done, _ = await asyncio.wait({job.future, left}, timeout=settings.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if job.future.done():
            return job.future.result()
        batcher.withdraw(job)
        if left in done:
            raise HTTPError(499, "the client closed the connection before its answer", "Validation")
        raise HTTPError(503, f"not answered within {settings.timeout_s:g} s (--timeout); the server is "
                             "overloaded: retry later", "Unhealthy", {"Retry-After": "1"})

    def pick_head(name: str | None, one_output: bool = False) -> str:
        try:
            head = hub.pair_head(name)
        except RobertaError as exc:
            raise HTTPError(404 if name is not None else 424, str(exc),
                            "Validation" if name is not None else "Backend") from None
        if one_output and heads[head] != 1:
            raise HTTPError(424, f"model is not a re-ranker model: head {head!r} has {heads[head]} outputs, a "
                                 "cross-encoder has one", "Backend")
        return head

    def as_inputs(inputs) -> list:
        return [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else list(inputs)

    def probabilities(logits: list[float], function: str) -> list[float]:
        row = torch.tensor(logits)
        if function == "softmax":
            return row.softmax(-1).tolist()
        return row.sigmoid().tolist() if function == "sigmoid" else logits

    @app.post("/embed", response_model=list[list[float]], responses={422: {"model": TEIError}})
    async def embed(body: EmbedRequest):
        """One vector per input: the `<s>` vector or the mean over the tokens, of the last layer."""
        unsupported(body)
        if body.dimensions is not None and body.dimensions != config.hidden_size:
            raise HTTPError(422, f"dimensions {body.dimensions} is not supported: this model's embeddings have "
                                 f"{config.hidden_size}; omit it or send that", "Validation")
        sequences = await prepare(as_inputs(body.inputs), bool(body.truncate))
        vectors = await run("embed", sequences, pooling=body.pooling or settings.pooling, normalize=body.normalize)
        return JSONResponse(vectors)

    @app.post("/embed_all", response_model=list[list[list[float]]], responses={422: {"model": TEIError}})
    async def embed_all(body: EmbedAllRequest):
        """Every token's last-layer vector, `<s>` and `</s>` included, per input."""
        unsupported(body)
        sequences = await prepare(as_inputs(body.inputs), bool(body.truncate))
        # about 12 bytes of JSON per float
        check_answer_size(12 * config.hidden_size * sum(len(s) for s in sequences), "this embed_all request")
        return JSONResponse(await run("embed_all", sequences))

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse)
    async def openai_embeddings(body: OpenAIEmbeddingsRequest):
        """OpenAI's embeddings API: unit-length vectors pooled as the server's --pooling says."""
        if body.dimensions is not None and body.dimensions != config.hidden_size:
            raise HTTPError(400, f"this model's embeddings have {config.hidden_size} dimensions; omit "
                                 "\"dimensions\" or pass that", "Validation")
        # OpenAI's API has no truncation to offer
        sequences = await prepare(as_inputs(body.input), truncate=None, what="input")
        vectors = await run("embed", sequences, pooling=settings.pooling, normalize=True)
        if body.encoding_format == "base64":
            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        n = sum(len(s) for s in sequences)
        return JSONResponse({"object": "list", "model": body.model or model_name,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.post("/predict", response_model=Union[list[Prediction], list[list[Prediction]]],
              responses={422: {"model": TEIError}})
    async def predict(body: PredictRequest):
        """Class scores of a classification head, best first, named by the model's id2label: a list for
        one input (a text or a [first, second] pair), a list of such lists for a batch."""
        unsupported(body)
        function = body.parameters.function_to_apply if body.parameters else None
        if body.raw_scores and function not in (None, "none"):
            raise HTTPError(422, f"raw_scores asks for logits and parameters.function_to_apply for {function}: send "
                                 "one of them", "Validation")
        head = pick_head(body.head)
        single = isinstance(body.inputs, str) or (body.inputs and isinstance(body.inputs[0], str))
        items = [body.inputs] if single else body.inputs
        items = [item if isinstance(item, str) else item[0] if len(item) == 1 else tuple(item) for item in items]
        sequences = await prepare(items, bool(body.truncate))
        rows = await run("predict", sequences, head=head)
        options = body.parameters or ClassificationParameters()
        # TEI's scores: a softmax over the classes, or a sigmoid of a single output
        function = "none" if body.raw_scores else options.function_to_apply or ("softmax" if heads[head] > 1 else "sigmoid")
        names = labels[head]
        answers = []
        for logits in rows:
            scores = probabilities(logits, function)
            answers.append([{"score": s, "label": names[i]} for i, s in
                            sorted(enumerate(scores), key=lambda item: item[1], reverse=True)][:options.top_k])
        return JSONResponse(answers[0] if single else answers)

    @app.post("/rerank", response_model=list[Rank], responses={422: {"model": TEIError}})
    async def rerank(body: RerankRequest):
        """The texts ranked by a cross-encoder's score against the query, best first (the model's
        activation of its one output, as `RobertaHub.rerank` gives)."""
        unsupported(body)
        check_count(len(body.texts), "texts")  # before the head: an empty list is the caller's to fix
        head = pick_head(body.head, one_output=True)
        sequences = await prepare([(body.query, text) for text in body.texts], bool(body.truncate), what="texts")
        logits = torch.tensor([row[0] for row in await run("predict", sequences, head=head)])
        scores = (logits if body.raw_scores else (hub.cross_encoder or pairs.CrossEncoderHead()).score(logits)).tolist()
        return JSONResponse([{"index": i, "score": s, **({"text": body.texts[i]} if body.return_text else {})}
                             for i, s in pairs.ranked(scores, list(range(len(scores))))])

    @app.post("/similarity", response_model=list[float], responses={422: {"model": TEIError}})
    async def similarity(body: SimilarityRequest):
        """The cosine similarity of the source sentence's embedding with each sentence's (--pooling)."""
        unsupported(body)
        truncate = bool((body.parameters or Prompted()).truncate)
        # --max-inputs counts the sentences; the source sentence comes on top
        sequences = (await prepare([body.inputs.source_sentence], truncate)
                     + await prepare(body.inputs.sentences, truncate, what="sentences"))
        vectors = await run("embed", sequences, pooling=settings.pooling, normalize=True)
        return JSONResponse([float(v @ vectors[0]) for v in vectors[1:]])

    @app.post("/tokenize", response_model=list[list[SimpleToken]], responses={422: {"model": TEIError}})
    async def tokenize(body: TokenizeRequest):
        """The tokens the model would see for each input: id, text, whether special, byte offsets."""
        unsupported(body)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_count(len(texts))

        def tokens_of_texts():
            encoded = [hub.encode(text, return_offsets=True) for text in texts]
            # about 80 bytes of JSON per token, plus its text
            check_answer_size(sum(80 * len(ids) + len(text.encode()) for text, (ids, _) in zip(texts, encoded)),
                              "this tokenize request")
            answers = []
            for text, (ids, spans) in zip(texts, encoded):
                at = byte_offsets(text)  # TEI counts bytes
                tokens = []
                for i, (start, stop) in zip(ids.tolist(), spans):
                    special = i in (hub.tokenizer.bos_token_id, hub.tokenizer.eos_token_id) and start == stop
                    if special and not body.add_special_tokens:
                        continue
                    begin, end = int(at[start]), int(at[stop])
                    tokens.append({"id": i, "text": hub.tokenizer.id_to_token(i) if special else text[start:stop],
                                   "special": special, "start": None if special else begin,
                                   "stop": None if special else end})
                answers.append(tokens)
            return answers

        answers = await off_loop(texts, tokens_of_texts)
        return JSONResponse(answers)

    @app.post("/decode", response_model=list[str], responses={422: {"model": TEIError}})
    async def decode(body: DecodeRequest):
        """The text of each sequence of ids."""
        sequences = [body.ids] if not body.ids or isinstance(body.ids[0], int) else body.ids
        check_count(len(sequences) if all(sequences) else 0, "ids")
        for ids in sequences:
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise HTTPError(422, f"token id {bad[0]} is outside this vocabulary (0 to {vocab - 1})", "Validation")
        return JSONResponse([hub.tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens)
                             for ids in sequences])

    @app.post("/fill-mask", response_model=FillMaskResponse)
    async def fill_mask(body: FillMaskRequest):
        """The topk tokens at each `<mask>` (several per text allowed), as `RobertaHub.fill_mask` gives them."""
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not has_lm_head:
            raise HTTPError(424, f"{model_name} has no masked-LM head (lm_head.*): it was initialised at random "
                                 "when loaded, so fill-mask would answer noise; serve a checkpoint saved with its "
                                 "LM head", "Backend")
        if body.topk > vocab:
            raise HTTPError(422, f"topk {body.topk} exceeds the vocabulary size {vocab}", "Validation")
        # every choice repeats its text: refuse an answer past the limit before computing it
        check_answer_size(sum(text.count("<mask>") * body.topk * (len(text.encode()) + 96) for text in texts),
                          f"fill-mask with topk {body.topk}")
        sequences = await prepare(texts, truncate=None, encode=hub._encode_masked)
        rows = await run("fill-mask", sequences, topk=body.topk)
        return JSONResponse({"results": [hub.mask_choices(t, probs, tokens, as_dicts=True)
                                         for t, (probs, tokens) in zip(texts, rows)]})

    @app.post("/zero-shot", response_model=list[ZeroShotResult])
    async def zero_shot(body: ZeroShotRequest):
        """Zero-shot classification with an NLI head, as `RobertaHub.zero_shot`: per input the
        candidate labels best first and their scores."""
        unsupported(body)
        head = pick_head(body.head)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        try:
            names = pairs.parse_labels(body.candidate_labels)
            hypotheses = pairs.hypotheses(names, body.hypothesis_template)
            entailment, contradiction = pairs.nli_classes(hub.nli_labels(head), head)
        except RobertaError as exc:
            raise HTTPError(422, str(exc), "Validation") from None
        check_count(len(texts) * len(names), "inputs x candidate_labels")
        tails = [hub.tokenizer.encode(h, add_special_tokens=False) for h in hypotheses]

        def pairs_of_texts():
            sequences = []
            for n, text in enumerate(texts):  # the text is cut, never the hypothesis
                try:
                    made, fits = pairs.hypothesis_pairs(hub.tokenizer, text, tails, pair_limit)
                except RobertaError as exc:  # a hypothesis that leaves the text no room
                    raise HTTPError(422, str(exc), "Validation") from None
                if not fits and not body.truncate:
                    raise too_long(n, None, pair_limit, False)
                sequences += made
            return sequences

        sequences = await off_loop(texts, pairs_of_texts)
        logits = torch.tensor(await run("predict", sequences, head=head)).reshape(len(texts), len(names), -1)
        scores = pairs.zero_shot_scores(logits, entailment, contradiction, body.multi_label).tolist()
        answers = []
        for text, row in zip(texts, scores):
            best = pairs.ranked(row, names)
            answers.append({"sequence": text, "labels": [l for l, _ in best], "scores": [s for _, s in best]})
        return JSONResponse(answers)

    def task_head(wanted: str, route: str) -> None:
        """424 for a route whose head this model lacks, as /rerank without a one-output head."""
        if model_type != wanted:
            need = "a token-classification" if wanted == "tagger" else "a question-answering"
            raise HTTPError(424, f"{route} needs {need} checkpoint with its trained head; {model_name} is "
                                 f"{hub.checkpoint_kind()}", "Backend")

    @app.post("/tag", response_model=Union[list[Entity], list[list[Entity]]], response_model_exclude_none=True)
    async def tag(body: TagRequest):
        """The entities in each text, from a token-classification checkpoint, as `RobertaHub.tag` (the
        Inference API's token-classification task: `parameters.aggregation_strategy`, `stride`,
        `ignore_labels`). A long text needs `stride`; its windows count as inputs."""
        task_head("tagger", "/tag")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_count(len(texts))
        options = body.parameters or TagParameters()
        ignore = ("O",) if options.ignore_labels is None else tuple(options.ignore_labels)
        spans.check_tag_options(options.aggregation_strategy, options.stride)
        plans = await off_loop(texts, lambda: [spans.tag_windows(hub.tokenizer, text, limit - 2, options.stride)
                                               for text in texts])
        sequences = [torch.tensor(window) for window in spans.windows_of(plans)]
        check_windows(len(sequences))
        found = [spans.entities(plan, outputs, options.aggregation_strategy, config.labels(), hub.tokenizer, ignore)
                 for plan, outputs in spans.per_plan(plans, await run("tokens", sequences))]
        return JSONResponse(found[0] if isinstance(body.inputs, str) else found)

    @app.post("/answer", response_model=Union[Answer, list[Answer], list[Union[Answer, list[Answer]]]])
    async def answer(body: AnswerRequest):
        """The answer to each question in its context, from a question-answering checkpoint, as
        `RobertaHub.answer` (the Inference API's question-answering task: `parameters.top_k`,
        `doc_stride`, `max_answer_len`, `max_seq_len`, `handle_impossible_answer`). A long context is
        read in windows, which count as inputs."""
        task_head("reader", "/answer")
        questions = [body.inputs] if isinstance(body.inputs, Question) else body.inputs
        check_count(len(questions))
        o = body.parameters or AnswerParameters()
        if o.max_question_len is not None:  # never ignored: the pipeline would cut the question there
            raise HTTPError(422, "max_question_len is not supported by this server: a question is never cut; drop "
                                 "the field, or shorten the question", "Validation")
        if o.max_seq_len is not None and o.max_seq_len > limit:
            raise HTTPError(422, f"max_seq_len {o.max_seq_len} is over this server's {limit} tokens a window; ask "
                                 f"for at most {limit}", "Validation")
        plans = await off_loop([(q.question, q.context) for q in questions], lambda: [
            spans.answer_windows(hub.model, hub.tokenizer, (q.question, q.context), o.max_seq_len or min(384, limit),
                                 o.doc_stride, o.handle_impossible_answer) for q in questions])
        sequences = [torch.tensor(window) for window in spans.windows_of(plans)]
        check_windows(len(sequences))  # none where every context is empty: only empty answers
        outputs = await run("spans", sequences) if sequences else []
        found = [spans.answer_from(plan, mine, o.top_k, o.max_answer_len, o.handle_impossible_answer, 0.0,
                                   o.align_to_words) for plan, mine in spans.per_plan(plans, outputs)]
        return JSONResponse(found[0] if isinstance(body.inputs, Question) else found)

    routes = {"reranker": (RerankRequest, rerank), "classifier": (PredictRequest, predict),
              "embedding": (EmbedRequest, embed), "tagger": (TagRequest, tag), "reader": (AnswerRequest, answer)}

    @app.post("/", responses={422: {"model": TEIError}})
    async def root(request: Request):
        """As text-embeddings-inference: /rerank for a model whose main head has one output, /predict
        for a classifier, /tag for a tagger, /answer for a reader, else /embed."""
        schema, route = routes[model_type]
        try:
            body = schema.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        return await route(body)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers probe with
    async def health():
        """200 while the worker runs; 503 while shutting down (for load balancers and orchestrators)."""
        if batcher.alive:
            return Response(status_code=200)
        return error_response(503, "shutting down", "Unhealthy", {"Retry-After": "1"})

    @app.api_route("/info", methods=["GET", "HEAD"])  # HEAD: what load balancers probe with
    async def info():
        """TEI's model description, and this server's heads, labels and limits."""
        dtype = str(hub.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        described = {"embedding": {"pooling": settings.pooling}}
        if model_type == "tagger":
            names = [config.labels()[i] for i in range(config.num_labels)]
            described = {"tagger": {"id2label": {str(i): name for i, name in enumerate(names)}}}
        elif model_type == "reader":
            described = {"reader": {}}
        elif main:
            names = labels[main]
            described = {model_type: {"id2label": {str(i): name for i, name in enumerate(names)},
                                      "label2id": {name: i for i, name in enumerate(names)}}}
        return {"model_id": model_name, "model_sha": None, "model_dtype": dtype, "model_type": described,
                "served_model_name": model_name, "max_concurrent_requests": settings.max_queue,
                "max_input_length": limit, "max_batch_tokens": settings.max_batch_tokens,
                "max_batch_requests": settings.max_batch_requests, "max_client_batch_size": settings.max_inputs,
                "auto_truncate": False, "tokenization_workers": 1, "version": _version(), "sha": None,
                "docker_label": None,
                # this server's additions
                "precision": precision, "device": str(hub.device),
                "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                           "num_attention_heads", "intermediate_size")},
                "fill_mask": has_lm_head, "cross_encoder": asdict(hub.cross_encoder) if hub.cross_encoder else None,
                "heads": {name: {"classes": n, "labels": labels[name]} for name, n in heads.items()},
                "settings": {k: v for k, v in asdict(settings).items() if k != "api_key"} | {"api_key": settings.api_key is not None}}

    @app.api_route("/metrics", methods=["GET", "HEAD"])  # HEAD: what load balancers probe with
    async def prometheus():
        """Prometheus text: requests, latency, batch sizes, queue depth and wait, tokens/s."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, settings, metrics)


_client: contextvars.ContextVar = contextvars.ContextVar("client")  # the request's ASGI receive (`_Guard`)


class _Guard:
    """ASGI middleware: asks for the API key on every path but /health (the OpenAPI description and
    its pages included), refuses bodies that are not JSON (415), over the size limit (413) or slower
    than --read-timeout (408) before they are parsed, and counts each request with its status and
    latency in the metrics. It hands the endpoints (`run`) the connection's own receive, on which a
    client that leaves shows once its body has been read."""

    POSTED = {"/", "/embed", "/embed_all", "/v1/embeddings", "/predict", "/rerank", "/similarity", "/fill-mask",
              "/zero-shot", "/tokenize", "/decode", "/tag", "/answer"}
    ENDPOINTS = POSTED | {"/health", "/info", "/metrics"}

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key is not None else None
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        status = {"code": 499}  # no answer was started: the client went away (nginx's "client closed request")

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def refuse(code: int, message: str, kind: str, headers: dict | None = None):
            await error_response(code, message, kind, headers, path)(scope, receive, send_counted)

        try:
            headers = dict(scope["headers"])
            if self.key is not None and path != "/health" and \
                    not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return await refuse(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                    "Validation", {"WWW-Authenticate": "Bearer"})
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if scope["method"] == "POST" and path in self.POSTED and kind != b"application/json":
                return await refuse(415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                                         f"(got {kind.decode('latin-1') or 'none'}); curl: -H "
                                         "'content-type: application/json'", "Validation")
            try:
                body = await asyncio.wait_for(self._read(receive), self.settings.read_timeout_s)
            except asyncio.TimeoutError:
                return await refuse(408, f"the request body did not arrive within {self.settings.read_timeout_s:g} s "
                                         "(--read-timeout)", "Validation", {"Connection": "close"})
            if body is None:  # the client went away
                return
            if len(body) > self.settings.max_body_bytes:
                return await refuse(413, f"request body over {self.settings.max_body_bytes} bytes (--max-body-bytes);"
                                         " split the request", "Validation")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            _client.set(receive)
            await self.app(scope, replay, send_counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)

    async def _read(self, receive) -> bytes | None:
        """The whole body (it is small), stopping once past the limit; None if the client left."""
        body, more = b"", True
        while more and len(body) <= self.settings.max_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body


def _bounded_protocol(seconds: float):
    """uvicorn's HTTP protocol with a deadline on each request's headers: a connection that has not sent
    a complete request head within `seconds` of opening (or of its last answer) is closed. uvicorn's own
    keep-alive timer stops at the first byte, so one byte at a time would hold a connection forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Bounded(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            cycle = self.cycle  # the request answered last: a new one replaces it once its head is read
            self._head_deadline = self.loop.call_later(seconds, self._expire, cycle)

        def _disarm(self):
            timer = getattr(self, "_head_deadline", None)
            if timer is not None:
                timer.cancel()

        def _expire(self, cycle):
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    return Bounded


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("roberta")
    except PackageNotFoundError:
        return "unknown"


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for host:port (0: any free port), or a one-line error naming the fix."""
    if not 0 <= port <= 65535:
        raise RobertaError(f"port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise RobertaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host/--port") from None
    return sock


def serve(hub, sock: socket.socket, settings: ServeSettings, model_name: str = "roberta", precision: str = "fp32",
          access_log: bool = False) -> None:
    """Serve `hub` on the bound socket until SIGTERM or Ctrl-C; on SIGTERM stop accepting, answer what is
    queued and in flight, and return."""
    app = create_app(hub, settings, model_name, precision)
    # keep-alive connections idle for 5 s are closed, and so is one whose request head is slower than
    # --read-timeout (its body is bounded in _Guard)
    config = uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on", timeout_keep_alive=5,
                            http=_bounded_protocol(settings.read_timeout_s),
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"serving {model_name} on http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"(precision {precision}, device {hub.device}); SIGTERM or Ctrl-C stops it", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; a handler of ours makes that SIGTERM
    # the end of a clean shutdown (exit 0) instead of the default action (death by signal).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise RobertaError(f"the server on {host}:{port} did not start; see the log above")
    sys.stdout.flush()

"""`roberta serve`: one model behind an HTTP API, with requests from many callers batched together.

    roberta serve -m demo-out/pretrain/final --port 8080
    curl -s localhost:8080/embed -H 'content-type: application/json' -d '{"inputs": ["Hello world!"]}'

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
they are validated on the way in and listed at /openapi.json (/docs renders them). Every error is JSON,
{"error": {"message", "type", "code"}}, with a 4xx status when the caller can fix it.
"""
from __future__ import annotations

import asyncio
import base64
import collections
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
from .model import find_head

try:
    import orjson
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the web stack is the `serve` extra: the library itself does not need it
    raise RobertaError(f"roberta serve needs {exc.name}: pip install 'roberta[serve]'") from None

API_KEY_ENV = "ROBERTA_API_KEY"


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
    api_key: str | None = field(default=None, repr=False)  # Bearer key every endpoint but /health asks for

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_batch_requests", "max_queue", "max_inputs", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RobertaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise RobertaError("max-wait-ms must be >= 0 and timeout must be > 0")
        if self.max_input_tokens is not None and self.max_input_tokens < 3:
            raise RobertaError(f"max-input-tokens must be at least 3 (<s>, a token, </s>), got {self.max_input_tokens}")
        if self.max_queue < self.max_inputs:
            raise RobertaError(f"max-queue ({self.max_queue}) must hold at least one full request "
                               f"(max-inputs {self.max_inputs})")
        if self.pooling not in ("cls", "mean"):
            raise RobertaError(f"pooling must be cls or mean, got {self.pooling!r}")
        if self.api_key == "":
            raise RobertaError(f"the API key is empty; pass a non-empty --api-key (or {API_KEY_ENV}), or none")


class HTTPError(Exception):
    """An answer other than 200, as JSON: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class JSONResponse(Response):
    """JSON through orjson: a 768-float embedding is encoded ~10x faster than by the json module (which
    took a quarter of the server's time under load), and float32 arrays as their shortest float32 text,
    which reads back to the same float32 values."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


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

    kind: Literal["embed", "predict", "fill-mask"]
    sequences: list[torch.Tensor]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    options: dict[str, Any] = field(default_factory=dict)  # pooling, normalize / head / topk
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # timed out: its inputs still queued are dropped

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
        embedded: dict[int, torch.Tensor] = {}
        for row, ((job, _), f) in enumerate(zip(batch, features)):
            if job.kind == "embed":
                v = f[0] if job.options["pooling"] == "cls" else f.mean(0)
                embedded[row] = F.normalize(v, dim=0) if job.options["normalize"] else v
            elif job.kind == "predict":
                by_head[job.options["head"]].append(row)
            else:
                masked.append(row)
        if embedded:  # float32 on the host in one copy (features stay on the model's device; a GPU waits once)
            for row, v in zip(embedded, torch.stack(list(embedded.values())).cpu().numpy()):
                outputs[row] = v
        for head, rows in by_head.items():
            first = torch.stack([features[r][0] for r in rows]).to(dtype)
            probs = model.classification_heads[head](first).float().softmax(-1)
            for r, p in zip(rows, probs.tolist()):
                outputs[r] = p
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


# ---- request and response schemas ---------------------------------------------------------------

Text = Annotated[str, StringConstraints(min_length=1)]
Pair = Annotated[list[Text], Field(min_length=2, max_length=2)]
Inputs = Union[Text, Annotated[list[Union[Text, Pair]], Field(min_length=1)]]
INPUTS_DOC = "a text, or a list of texts; a [first, second] list inside the list is a sentence pair"


FIELD_HINTS = {
    "inputs": "a non-empty text or a non-empty list of them (a [first, second] list inside it is a pair)",
    "input": "a non-empty text or a non-empty list of them",
    "ids": "a non-empty list of token ids, or a non-empty list of such lists",
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbedRequest(Body):
    inputs: Inputs = Field(description=INPUTS_DOC)
    pooling: Literal["cls", "mean"] | None = Field(None, description="<s> vector, or the mean over the tokens "
                                                   "(default: the server's --pooling)")
    normalize: bool = Field(True, description="scale each vector to unit length")
    truncate: bool = Field(False, description="cut inputs past the token limit instead of answering 413")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    tokens: list[int] = Field(description="tokens of each input, after truncation")


class OpenAIEmbeddingsRequest(Body):
    input: Union[Text, Annotated[list[Text], Field(min_length=1)]]
    model: str | None = None
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


class PredictRequest(Body):
    inputs: Inputs = Field(description=INPUTS_DOC)
    head: str | None = Field(None, description="classification head (default: the model's only or main one)")
    truncate: bool = False


class LabelScore(BaseModel):
    id: int
    label: str
    score: float


class Prediction(BaseModel):
    label: str = Field(description="the most likely class")
    id: int
    score: float
    scores: list[LabelScore] = Field(description="every class, in id order (probabilities)")


class PredictResponse(BaseModel):
    head: str
    predictions: list[Prediction]


class FillMaskRequest(Body):
    inputs: Union[Text, Annotated[list[Text], Field(min_length=1)]] = Field(
        description="a text holding one or more <mask>, or a list of them")
    topk: int = Field(5, ge=1, description="candidates per mask")


class FillMaskChoice(BaseModel):
    sequence: str
    score: float
    token: int
    token_str: str


class FillMaskResponse(BaseModel):
    results: list[list[list[FillMaskChoice]]] = Field(description="per input, per <mask>, the topk choices")


class TokenizeRequest(Body):
    inputs: Inputs = Field(description=INPUTS_DOC)
    truncate: bool = False


class Tokenized(BaseModel):
    ids: list[int]
    tokens: list[str]


class TokenizeResponse(BaseModel):
    tokenized: list[Tokenized]


class DecodeRequest(Body):
    ids: Union[Annotated[list[int], Field(min_length=1)],
               Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]] = Field(
        description="one sequence of token ids, or a list of them")


class DecodeResponse(BaseModel):
    texts: list[str | list[str]] = Field(description="a list of sentences where </s></s> separates several")


# ---- the application ----------------------------------------------------------------------------


def create_app(hub, settings: ServeSettings, model_name: str = "roberta", precision: str = "fp32") -> FastAPI:
    """The ASGI application serving `hub` (a loaded `RobertaHub`, in eval mode)."""
    batcher = Batcher(hub, settings)
    metrics = batcher.metrics
    config = hub.model.config
    limit = min(settings.max_input_tokens or hub.max_tokens, hub.max_tokens)
    heads = {name: head.out_proj.out_features for name, head in hub.model.classification_heads.items()}
    # a fine-tuned classifier's id2label (`hub.labels`), LABEL_i where the checkpoint names none
    labels = {name: hub.labels(name) or [f"LABEL_{i}" for i in range(n)] for name, n in heads.items()}
    # a checkpoint without its masked-LM head (a fine-tuned classifier) got a random one when loaded
    has_lm_head = not any(k.startswith("lm_head.") for k in getattr(hub.model, "missing_keys", []))

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # uvicorn has stopped accepting and finished the requests in flight: drain and stop the worker
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title="roberta serve", version=_version(), lifespan=lifespan,
                  description="RoBERTa inference with dynamic batching. Errors: {\"error\": {\"message\", "
                              "\"type\", \"code\"}}. Every endpoint but /health takes `Authorization: Bearer KEY` "
                              "when the server has an API key.")
    app.state.batcher = batcher
    bearer = HTTPBearer(auto_error=False)

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if settings.api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), settings.api_key.encode()):
            raise HTTPError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            "unauthorized", {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    # -- errors: always JSON, 4xx for what the caller can fix

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RobertaError)
    async def _roberta_error(request, exc: RobertaError):
        return error_response(400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or (e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",))
               for e in errors):
            return error_response(400, "the body is not valid JSON: send a JSON object, e.g. "
                                       "{\"inputs\": \"Hello world!\"}", "invalid_json")
        first = errors[0]
        loc = [part for part in first.get("loc", ()) if part != "body"]
        name = str(loc[0]) if loc else "body"
        if sum(1 for e in errors if e.get("loc", ())[1:2] == (name,)) > 1 and name in FIELD_HINTS:
            message = f"{name} must be {FIELD_HINTS[name]}"  # a union: one error per branch says less than this
        else:
            message = f"{'.'.join(map(str, loc)) or 'body'}: {first.get('msg')}"
        return error_response(422, f"{message}; see /openapi.json for the schema", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(404, f"no endpoint {where}; /openapi.json lists them", "not_found")
        if exc.status_code == 405:
            return error_response(405, f"{where} is not allowed: {request.url.path} takes "
                                       f"{exc.headers.get('Allow', 'another method') if exc.headers else 'another method'}",
                                  "http_error", exc.headers)
        return error_response(exc.status_code, f"{where}: {exc.detail}", "http_error", exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    # -- the work

    def check_count(n: int) -> None:
        if n > settings.max_inputs:
            raise HTTPError(413, f"{n} inputs in one request; this server takes at most {settings.max_inputs} "
                                 "(--max-inputs): split the request", "payload_too_large")

    def prepare(inputs, truncate: bool | None, encode=None) -> list[torch.Tensor]:
        """Token ids of each input, within the limits; truncate None: the endpoint cannot truncate."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        check_count(len(texts))
        sequences = []
        for n, text in enumerate(texts):
            ids = encode(text) if encode else hub.encode(*([text] if isinstance(text, str) else text))
            if len(ids) > limit:
                if not truncate:
                    offer = "" if truncate is None else "send \"truncate\": true to keep the first ones, or "
                    raise HTTPError(413, f"input {n} has {len(ids)} tokens but this server takes at most {limit}; "
                                         f"{offer}shorten it", "payload_too_large")
                ids = hub._fit(ids[None], True, limit)[0]
            sequences.append(ids)
        return sequences

    async def run(kind: str, sequences: list[torch.Tensor], **options) -> list:
        loop = asyncio.get_running_loop()
        job = Job(kind, sequences, loop, loop.create_future(), options)
        try:
            batcher.submit(job)
        except Overloaded:
            raise HTTPError(429, f"the queue is full ({settings.max_queue} inputs waiting, --max-queue); "
                                 "retry after a second", "overloaded", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(job.future, settings.timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise HTTPError(503, f"not answered within {settings.timeout_s:g} s (--timeout); the server is "
                                 "overloaded: retry later", "timeout", {"Retry-After": "1"}) from None

    def pick_head(name: str | None) -> str:
        if name is None:
            if config.head_name in heads:
                return config.head_name
            if len(heads) == 1:
                return next(iter(heads))
        if find_head(name, heads) is None:  # 404 too when none was named: there is no default head to find
            known = ", ".join(heads) or "none"
            what = f"no classification head named {name!r}" if name else "no head was named and this model has no single one"
            raise HTTPError(404, f"{what} (this model has: {known}); name one in \"head\"", "unknown_head")
        return find_head(name, heads)

    @app.post("/embed", response_model=EmbedResponse, dependencies=guarded)
    async def embed(body: EmbedRequest):
        """One vector per input: the `<s>` vector or the mean over the tokens, of the last layer."""
        sequences = prepare(body.inputs, body.truncate)
        vectors = await run("embed", sequences, pooling=body.pooling or settings.pooling, normalize=body.normalize)
        return JSONResponse({"embeddings": vectors, "tokens": [len(s) for s in sequences]})

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingsResponse, dependencies=guarded)
    async def openai_embeddings(body: OpenAIEmbeddingsRequest):
        """OpenAI's embeddings API: unit-length vectors pooled as the server's --pooling says."""
        if body.dimensions is not None and body.dimensions != config.hidden_size:
            raise HTTPError(400, f"this model's embeddings have {config.hidden_size} dimensions; omit "
                                 "\"dimensions\" or pass that", "invalid_request")
        sequences = prepare(body.input, truncate=False)
        vectors = await run("embed", sequences, pooling=settings.pooling, normalize=True)
        if body.encoding_format == "base64":
            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        n = sum(len(s) for s in sequences)
        return JSONResponse({"object": "list", "model": body.model or model_name,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded)
    async def predict(body: PredictRequest):
        """Class probabilities of a classification head, with the class names of the model's id2label."""
        head = pick_head(body.head)
        sequences = prepare(body.inputs, body.truncate)
        rows = await run("predict", sequences, head=head)
        names = labels[head]
        predictions = []
        for probs in rows:
            best = max(range(len(probs)), key=probs.__getitem__)
            predictions.append({"label": names[best], "id": best, "score": probs[best],
                                "scores": [{"id": i, "label": names[i], "score": p} for i, p in enumerate(probs)]})
        return JSONResponse({"head": head, "predictions": predictions})

    @app.post("/fill-mask", response_model=FillMaskResponse, dependencies=guarded)
    async def fill_mask(body: FillMaskRequest):
        """The topk tokens at each `<mask>` (several per text allowed), as `RobertaHub.fill_mask` gives them."""
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not has_lm_head:
            raise HTTPError(409, f"{model_name} has no masked-LM head (lm_head.*): it was initialised at random "
                                 "when loaded, so fill-mask would answer noise; serve a checkpoint saved with its "
                                 "LM head", "no_lm_head")
        if body.topk > len(hub.tokenizer):
            raise HTTPError(422, f"topk {body.topk} exceeds the vocabulary size {len(hub.tokenizer)}")
        sequences = prepare(texts, truncate=None, encode=hub._encode_masked)
        rows = await run("fill-mask", sequences, topk=body.topk)
        return JSONResponse({"results": [hub.mask_choices(t, probs, tokens, as_dicts=True)
                                         for t, (probs, tokens) in zip(texts, rows)]})

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        """The token ids the model would see for each input (with <s>, </s>), and their BPE strings."""
        sequences = prepare(body.inputs, body.truncate)
        return JSONResponse({"tokenized": [{"ids": s.tolist(), "tokens": [hub.tokenizer.id_to_token(i) for i in s.tolist()]}
                                           for s in sequences]})

    @app.post("/decode", response_model=DecodeResponse, dependencies=guarded)
    async def decode(body: DecodeRequest):
        """Text of each sequence of ids (a list of sentences where `</s></s>` separates several)."""
        sequences = [body.ids] if isinstance(body.ids[0], int) else body.ids
        check_count(len(sequences))
        vocab = len(hub.tokenizer)
        for ids in sequences:
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise HTTPError(422, f"token id {bad[0]} is outside this vocabulary (0 to {vocab - 1})")
        return JSONResponse({"texts": [hub.decode(torch.tensor(ids, dtype=torch.long)) for ids in sequences]})

    @app.get("/health")
    async def health():
        """200 while the worker runs; 503 while shutting down (for load balancers and orchestrators)."""
        if batcher.alive:
            return {"status": "ok"}
        return error_response(503, "shutting down", "unavailable", {"Retry-After": "1"})

    @app.get("/info", dependencies=guarded)
    async def info():
        """The model, its heads and their labels, and the server's limits."""
        return {"model": model_name, "version": _version(), "precision": precision, "device": str(hub.device),
                "dtype": str(hub.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                           "num_attention_heads", "intermediate_size")},
                "max_input_tokens": limit, "fill_mask": has_lm_head, "heads": {name: {"classes": n, "labels": labels[name]} for name, n in heads.items()},
                "settings": {k: v for k, v in asdict(settings).items() if k != "api_key"} | {"api_key": settings.api_key is not None}}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        """Prometheus text: requests, latency, batch sizes, queue depth and wait, tokens/s."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, settings.max_body_bytes, metrics)


class _Guard:
    """ASGI middleware: refuses bodies that are not JSON (415) or over the size limit (413) before they
    are parsed, and counts each request with its status and latency in the metrics."""

    ENDPOINTS = {"/embed", "/v1/embeddings", "/predict", "/fill-mask", "/tokenize", "/decode", "/health", "/info",
                 "/metrics"}

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if scope["method"] == "POST" and endpoint != "other" and kind != b"application/json":
                response = error_response(415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                                               f"(got {kind.decode('latin-1') or 'none'}); curl: -H "
                                               "'content-type: application/json'", "unsupported_media_type")
                return await response(scope, receive, send_counted)
            body, more = b"", True
            while more:  # read the whole body first (it is small), refusing it once past the limit
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    response = error_response(413, f"request body over {self.max_body_bytes} bytes (--max-body-bytes);"
                                                   " split the request", "payload_too_large")
                    return await response(scope, receive, send_counted)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)


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
    config = uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on",
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

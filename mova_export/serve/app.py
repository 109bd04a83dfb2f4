"""The FastAPI app: `/v1/chat/completions` (plain and SSE streaming), `/v1/models`, `/health`, `/metrics`.

One MoVARuntime answers one request at a time: each request is `rt.submit`ted on its own stream with the `queue`
policy, so the runtime's worker takes them in arrival order. Requests beyond `max_queue` waiting get 429 with
Retry-After (the recent median request time times the queue ahead). A client that leaves (a closed stream, a
dropped connection while waiting) cancels its future: a queued request is dropped, a running one stops after its
current token, so the next request does not wait for an abandoned answer.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import statistics
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..core.errors import MoVAExportError, RuntimeInputError
from ..runtime import sampling_of
from ..runtime.session import MAX_NEW_TOKENS_LIMIT
from . import protocol as p
from .metrics import ServerMetrics

LOG = logging.getLogger("mova_export.serve")


@dataclass
class ServeOptions:
    model: str                                  # the id clients pass as `model`
    api_key: str | None = None                  # Bearer token required on everything but /health
    max_queue: int = 8                          # requests waiting behind the running one; more get 429
    max_image_pixels: int = 40_000_000          # checked from the image header, before decoding
    max_body_mb: float = 20.0                   # 413 above (a base64 image grows by 4/3)
    default_max_tokens: int = 256               # when the request gives neither max_tokens nor max_completion_tokens
    warmup: bool = True                         # one request before /health says 200


class _State:
    """What the endpoints share: the runtime once loaded, the requests in flight, recent request times."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.runtime: Any = None
        self.status, self.error = "loading", ""
        self.in_flight = 0
        self.lock = threading.Lock()
        self.recent_s: deque[float] = deque(maxlen=32)
        self.metrics = ServerMetrics()

    def load(self, runtime: Any, loader: Callable[[], Any] | None, on_failure: Callable[[str], None] | None) -> None:
        """On a background thread: load (or take) the runtime and warm it up; /health says 200 after."""
        try:
            rt = loader() if runtime is None else runtime
            if self.options.warmup:
                rt.warmup()
        except MoVAExportError as exc:
            self.status, self.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - reported in one line by /health and the CLI
            self.status, self.error = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        else:
            self.runtime, self.status = rt, "ready"
            return
        LOG.error("loading the bundle failed: %s", self.error)
        if on_failure is not None:
            on_failure(self.error)

    def admit(self) -> None:
        with self.lock:
            if self.in_flight > self.options.max_queue:      # one running, max_queue waiting
                typical = statistics.median(self.recent_s) if self.recent_s else 1.0
                retry = max(1, math.ceil(typical * self.in_flight))
                raise p.ApiError(429, f"{self.in_flight - 1} request(s) already waiting (--max-queue "
                                 f"{self.options.max_queue}); retry in about {retry} s", kind="rate_limit_error",
                                 code="queue_full", headers={"Retry-After": str(retry)})
            self.in_flight += 1
            self.metrics.queue.set(max(self.in_flight - 1, 0))

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.metrics.queue.set(max(self.in_flight - 1, 0))

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise p.ApiError(401, "missing or wrong API key; send Authorization: Bearer <the server's --api-key>",
                             kind="authentication_error", code="invalid_api_key")

    def ready(self) -> Any:
        if self.status != "ready":
            why = "the bundle is still loading" if self.status == "loading" else f"loading failed: {self.error}"
            raise p.ApiError(503, f"not ready: {why}; wait for /health to answer 200", kind="server_error",
                             code="not_ready", headers={"Retry-After": "5"})
        return self.runtime


def create_app(options: ServeOptions, runtime: Any = None, loader: Callable[[], Any] | None = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The app over a loaded `runtime`, or one that `loader()` builds in the background (/health 503 until it is
    loaded and warmed up; `on_load_failure(message)` if loading fails)."""
    state = _State(options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None and not options.warmup:
            state.runtime, state.status = runtime, "ready"
        else:
            threading.Thread(target=state.load, args=(runtime, loader, on_load_failure), name="mova-load",
                             daemon=True).start()
        yield

    app = FastAPI(title="mova-export serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.mova = state
    _error_handlers(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.status == "ready":
            return JSONResponse({"status": "ok", "model": options.model})
        return JSONResponse({"status": state.status, **({"error": state.error} if state.error else {})}, 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.authorize(request)
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.authorize(request)
        return JSONResponse({"object": "list", "data": [model_card(options.model, state.ready())]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(state, request)

    return app


def _error_handlers(app: FastAPI, state: _State) -> None:
    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, exc: p.ApiError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            state.metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(p.ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                       "/v1/chat/completions, /health, /metrics", code="not_found").body(), 404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(p.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed").body(), 405)


async def _chat(state: _State, request: Request) -> Response:
    """POST /v1/chat/completions: checks in the order a client can fix them, then the queue, then the answer."""
    arrived = time.perf_counter()
    options = state.options
    state.authorize(request)
    rt = state.ready()
    req = p.parse_request(await read_body(request, int(options.max_body_mb * 2**20)))
    if req.model != options.model:
        raise p.ApiError(404, f"model {req.model!r} is not served here; this server serves {options.model!r} "
                         "(GET /v1/models)", param="model", code="model_not_found")
    p.check_choices(req)
    max_new = p.max_new_tokens_of(req, options.default_max_tokens, _token_limit(rt))
    question = p.question_of(req, options.max_image_pixels)
    try:
        sampling = sampling_of(req.temperature, req.top_p, req.seed, req.logit_bias, getattr(rt.llm, "n_vocab", None))
    except RuntimeInputError as exc:
        raise p.ApiError(400, str(exc), param=str(exc).split("=")[0].split("[")[0].split(" ")[0]) from None
    state.admit()
    job = _Job(state, rt, question, max_new, sampling, arrived)
    try:
        job.submit()
    except BaseException:
        state.release()           # nothing was queued
        raise
    cid = p.completion_id()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(job.sse(cid, options.model, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await job.result(request)
    state.metrics.requests.labels("200").inc()
    return JSONResponse(p.completion(cid, options.model, answer, max_new))


class _Job:
    """One request on the runtime's worker: pieces handed to the event loop as they are generated."""

    def __init__(self, state: _State, rt: Any, question: p.Question, max_new: int, sampling: Any, arrived: float):
        self.state, self.rt, self.question, self.max_new, self.sampling = state, rt, question, max_new, sampling
        self.arrived = arrived
        self.first_token: float | None = None
        self.loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.future: Any = None

    def submit(self) -> None:
        def piece(text: str) -> None:
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, text)

        try:
            self.future = self.rt.submit(self.question.rgb, self.question.text, self.max_new,
                                         stream=f"http-{id(self)}", policy="queue", on_piece=piece,
                                         sampling=self.sampling)
        except RuntimeInputError as exc:
            raise p.ApiError(400, str(exc)) from None

        def done(future: Any) -> None:   # the slot frees when the runtime is done with it, whatever the client did
            self.state.release()
            if not future.cancelled() and future.exception() is None:
                self._finished(future.result())
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, None)

        self.future.add_done_callback(done)

    def _finished(self, answer: Any) -> None:
        seconds = time.perf_counter() - self.arrived
        if not answer.cut:
            self.state.recent_s.append(seconds)
        self.state.metrics.answered(answer, seconds,
                                    None if self.first_token is None else self.first_token - self.arrived)

    async def result(self, request: Request) -> Any:
        """The answer; a client that disconnects while waiting cancels its request (499 in the metrics)."""
        waiting = asyncio.wrap_future(self.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                self.future.cancel()
                raise p.ApiError(499, "the client closed the connection", code="client_closed")
        return self._answer()

    def _answer(self) -> Any:
        try:
            return self.future.result()
        except MoVAExportError as exc:
            raise p.ApiError(400, str(exc)) from None
        except Exception as exc:
            LOG.exception("request failed")
            raise p.ApiError(500, f"the runtime failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                             kind="server_error", code="runtime_error") from None

    async def sse(self, cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
        status = "499"
        try:
            yield _event(p.chunk(cid, model, {"role": "assistant", "content": ""}))
            while (text := await self.pieces.get()) is not None:
                yield _event(p.chunk(cid, model, {"content": text}))
            try:
                answer = self._answer()
            except p.ApiError as exc:
                status = str(exc.status)
                yield _event(exc.body())
                yield "data: [DONE]\n\n"
                return
            yield _event(p.chunk(cid, model, {}, p.finish_reason(answer, self.max_new), mova=p.mova_field(answer)))
            if include_usage:
                yield _event({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                              "model": model, "choices": [], "usage": p.usage(answer)})
            yield "data: [DONE]\n\n"
            status = "200"
        finally:   # a client that left: the runtime stops this request after its current token
            if not self.future.done():
                self.future.cancel()
            self.state.metrics.requests.labels(status).inc()


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _token_limit(rt: Any) -> int:
    n_ctx = getattr(rt.llm, "n_ctx", None) or MAX_NEW_TOKENS_LIMIT
    return min(MAX_NEW_TOKENS_LIMIT, int(n_ctx))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or while reading a chunked body)."""
    too_big = p.ApiError(413, f"the request body is over this server's --max-body-mb of {limit / 2**20:g} MB; send a "
                         "smaller image", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        chunks.append(part)
    return b"".join(chunks)


def model_card(model: str, rt: Any) -> dict[str, Any]:
    described = rt.describe()
    manifest = rt.bundle.manifest
    created = int((rt.bundle.path / "manifest.json").stat().st_mtime)
    return {"id": model, "object": "model", "created": created, "owned_by": "mova-export",
            "mova": {"target": (manifest.target or {}).get("name"), "manifest_sha256": rt.manifest_sha256,
                     "graphs": {g: d["precision"] for g, d in described["graphs"].items()},
                     "llm": described["llm"]["qtype"], "experts": rt.facts.letters}}

"""`dzc serve`: an OpenAI-compatible HTTP and WebSocket server over one model.

Endpoints
  POST /v1/chat/completions, POST /v1/completions   OpenAI request bodies; `stream: true` answers with
                                                    server-sent events ending in `data: [DONE]`
  GET  /v1/models, GET /v1/models/{id}              the one served model
  GET  /health                                      liveness and load; never needs the API key
  WS   /ws                                          chat requests as JSON messages, tokens streamed back
Every error is OpenAI-shaped JSON: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
anything the client got wrong (a 5xx only for a dzc bug or a failing executor).

How requests run (see server_scheduler.py): each running request has its own executor (its own KV cache)
and worker thread, at most --max-concurrency of them; more requests wait in a FIFO queue, and say so in
the `x-dzc-queue-position` (1 = next in line, 0 = no wait) and `x-dzc-queue-wait-ms` response headers and
a log line. A client that disconnects, while queued or mid-stream, is noticed at once and its generation
stops after the current token. There is no continuous batching: concurrent requests each run their own
batch-1 forward passes.

The model comes in as a `ServedModel`, which whoever loads checkpoints or artifacts builds.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from dzc.errors import DzcError, InputError, TokenizerError
from dzc.runtime.executor import ModelExecutor
from dzc.runtime.generate import StreamEvent, generate
from dzc.runtime.sampling import SamplingParams
from dzc.runtime.server_auth import RateLimit, RateLimiter, bearer_matches, retry_after_header
from dzc.runtime.server_scheduler import Job, Scheduler, ServerBusy
from dzc.runtime.server_schemas import (APIError, RequestSpec, parse_chat, parse_completion, parse_json_object,
                                        usage)
from dzc.runtime.tokenizer import Tokenizer

try:
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dzc serve needs the serve extra: pip install 'dzc[serve]' (fastapi, uvicorn)") from e

log = logging.getLogger("dzc.serve")
T = TypeVar("T")
DEFAULT_MAX_BODY_BYTES = 4 << 20
LARGE_BODY_BYTES = 64 << 10
WS_MAX_PENDING = 8


class ServeError(DzcError):
    """The server cannot start: the address is taken or invalid, or a setting is out of range."""


@dataclass(frozen=True)
class ServedModel:
    """What the server needs from a loaded model.

    `make_executor` is called once per concurrent slot (lazily, on a worker thread); each executor must own its
    KV cache, and executors may share read-only weights. `eos_ids` end generation (empty: the tokenizer's EOS).
    `max_context` is the executors' context length: prompts that do not fit are refused before they queue.
    """

    name: str
    make_executor: Callable[[], ModelExecutor]
    tokenizer: Tokenizer
    eos_ids: Sequence[int]
    max_context: int


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0 = any free port (the one chosen is announced)
    api_key: str | None = None
    rate_limit: RateLimit | None = None
    max_concurrency: int = 1
    max_queue: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port {self.port} is not a TCP port (0-65535; 0 picks a free one)")
        if self.max_concurrency < 1:
            raise ServeError(f"--max-concurrency {self.max_concurrency} must be >= 1")
        if self.max_queue < 0:
            raise ServeError(f"--max-queue {self.max_queue} must be >= 0")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ServeError("the API key (--api-key or DZC_API_KEY) must be non-empty and contain no spaces")


class _ClientGone(Exception):
    """The client disconnected before the answer was complete."""


class _App:
    """The request handlers, around one model and one scheduler."""

    def __init__(self, model: ServedModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.scheduler = Scheduler(model.make_executor, self._generate, config.max_concurrency, config.max_queue)
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self.started = int(time.time())

    def _generate(self, executor: ModelExecutor, prompt_ids: Sequence[int], params: SamplingParams):
        return generate(executor, prompt_ids, params, tokenizer=self.model.tokenizer, eos_ids=self.model.eos_ids)

    # ---- small endpoints --------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model.name, **self.scheduler.stats()})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model.name, "object": "model", "created": self.started, "owned_by": "dzc",
                "max_model_len": self.model.max_context}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        if request.path_params["model"] != self.model.name:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist; this server serves "
                                f"{self.model.name!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    # ---- generation over HTTP ------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, parse_completion)

    async def _complete(self, request: Request, parse: Callable[[dict, str], RequestSpec]) -> Response:
        spec = await self._parse(await self._read_body(request), parse)
        job = await self._prepare(spec)
        try:
            first = await _until(self._begin(job), _disconnected(request))
            headers = {"x-request-id": job.id, "x-dzc-queue-position": str(job.queue_position),
                       "x-dzc-queue-wait-ms": str(round(job.queue_wait * 1000))}
            if spec.stream:
                return _EventStream(_sse(self._chunks(job, spec, first)), job, headers)
            events = await _until(self._rest(job, first), _disconnected(request))
        except _ClientGone:
            job.cancel()
            log.info("%s: the client went away before the answer", job.id)
            return Response(status_code=499)  # nobody reads it
        except BaseException:
            job.cancel()
            raise
        text = "".join(e.text for e in events)
        finish = events[-1].finish_reason
        body: dict[str, Any] = {"id": job.id, "created": int(time.time()), "model": self.model.name}
        if spec.kind == "chat":
            body.update(object="chat.completion", choices=[{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}])
        else:
            body.update(object="text_completion", choices=[{
                "index": 0, "text": text, "logprobs": None, "finish_reason": finish}])
        body["usage"] = usage(len(job.prompt_ids), len(events))
        return JSONResponse(body, headers=headers)

    async def _parse(self, raw: bytes | str, parse: Callable[[dict, str], RequestSpec]) -> RequestSpec:
        """Decode and check a body; big ones off the event loop (a 4 MiB body takes tens of milliseconds)."""
        def work() -> RequestSpec:
            return parse(parse_json_object(raw), self.model.name)
        return work() if len(raw) < LARGE_BODY_BYTES else await asyncio.to_thread(work)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _prepare(self, spec: RequestSpec) -> Job:
        """Tokenize (off the event loop) and check the request against the context; nothing queues yet."""
        tokenizer = self.model.tokenizer
        try:
            if spec.messages is not None:
                prompt_ids = await asyncio.to_thread(tokenizer.encode_chat, spec.messages)
            elif isinstance(spec.prompt, str):
                prompt_ids = await asyncio.to_thread(tokenizer.encode, spec.prompt)
            else:
                prompt_ids = spec.prompt
        except TokenizerError as e:
            raise APIError(400, str(e), param=spec.prompt_param, code="invalid_prompt") from None
        if not prompt_ids:
            raise APIError(400, "the prompt encodes to no tokens", param=spec.prompt_param, code="invalid_prompt")
        params = spec.sampling_params(len(prompt_ids), self.model.max_context)
        prefix = "chatcmpl" if spec.kind == "chat" else "cmpl"
        return Job(f"{prefix}-{uuid.uuid4().hex[:24]}", prompt_ids, params)

    async def _begin(self, job: Job) -> StreamEvent:
        """Wait for a slot, start the job and wait for its first token; errors before it are still 4xx."""
        try:
            await self.scheduler.start(job)
        except ServerBusy as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_error",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        event = await self._next(job)
        if event is None:  # cancelled before its first token: only a shutdown does that
            raise APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")
        return event

    async def _next(self, job: Job) -> StreamEvent | None:
        try:
            return await job.next()
        except (InputError, TokenizerError) as e:
            raise APIError(400, str(e), code="invalid_value") from None
        except Exception as e:
            log.error("%s failed", job.id, exc_info=e)
            message = str(e) if isinstance(e, DzcError) else f"generation failed: {type(e).__name__}: {e}"
            raise APIError(500, message, type="server_error", code="internal_error") from None

    async def _rest(self, job: Job, first: StreamEvent) -> list[StreamEvent]:
        events = [first]
        while events[-1].finish_reason is None:
            event = await self._next(job)
            if event is None:  # cancelled
                raise _ClientGone()
            events.append(event)
        return events

    async def _chunks(self, job: Job, spec: RequestSpec, first: StreamEvent) -> AsyncIterator[dict[str, Any]]:
        """The stream's JSON chunks, OpenAI-shaped; an error after the first token becomes an error chunk."""
        created, name, chat = int(time.time()), self.model.name, spec.kind == "chat"

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [choice]}
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": job.id, "object": "text_completion", "created": created, "model": name,
                    "choices": [choice]}

        if chat:
            first_chunk = chunk("", None)
            first_chunk["choices"][0]["delta"]["role"] = "assistant"
            yield first_chunk
        event: StreamEvent | None = first
        count = 0
        try:
            while event is not None:
                count += 1
                if event.finish_reason is not None:
                    if chat:
                        if event.text:
                            yield chunk(event.text, None)
                        yield chunk(None, event.finish_reason)
                    else:
                        yield chunk(event.text, event.finish_reason)
                    break
                if event.text:
                    yield chunk(event.text, None)
                event = await self._next(job)
        except APIError as e:
            yield e.body()
            return
        if event is not None and spec.include_usage:
            object_name = "chat.completion.chunk" if chat else "text_completion"
            yield {"id": job.id, "object": object_name, "created": created, "model": name, "choices": [],
                   "usage": usage(len(job.prompt_ids), count)}

    # ---- generation over a WebSocket -----------------------------------------------------------------------
    async def websocket(self, ws: WebSocket) -> None:
        """One request at a time per connection: send a chat (or completion) body as a JSON text message;
        get {"type": "token", "token_id", "text"} per token, then {"type": "done", "finish_reason", "usage"}.
        {"type": "cancel"} stops the running generation (finish_reason "cancelled"); errors come back as
        {"type": "error", "error": {...}, "status"} and the connection stays open. Requests sent while one
        runs are answered in order, up to WS_MAX_PENDING of them (more closes the connection, code 1008)."""
        await ws.accept()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()
        current: list[Job] = []

        async def read() -> None:
            try:
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    if current and _is_cancel(message):
                        current[0].cancel()
                    elif inbox.qsize() >= WS_MAX_PENDING:
                        await ws.close(code=1008, reason=f"more than {WS_MAX_PENDING} requests waiting")
                        break
                    else:
                        inbox.put_nowait(message)
            finally:
                gone.set()
                for job in current:
                    job.cancel()

        reader = asyncio.create_task(read())
        try:
            while not gone.is_set():
                message = await _until(inbox.get(), gone.wait())
                try:
                    await self._ws_request(ws, message, current, gone)
                except APIError as e:
                    await ws.send_json({"type": "error", "status": e.status, **e.body()})
                finally:
                    for job in current:
                        job.cancel()
                    current.clear()
        except (_ClientGone, WebSocketDisconnect, OSError, RuntimeError):
            pass  # OSError, RuntimeError: sending on a socket the client closed
        finally:
            reader.cancel()

    async def _ws_request(self, ws: WebSocket, message: dict[str, Any], current: list[Job],
                          gone: asyncio.Event) -> None:
        if _is_cancel(message):
            return  # nothing is running
        if self.limiter is not None:
            wait = self.limiter.acquire(self._client_key(ws.scope))
            if wait:
                raise _rate_limited(self.limiter.rate, wait)
        raw = message.get("text")
        raw = raw if raw is not None else message.get("bytes") or b""

        def parse(body: dict[str, Any], model_name: str) -> RequestSpec:
            return (parse_completion if "prompt" in body else parse_chat)(body, model_name)
        spec = await self._parse(raw, parse)
        job = await self._prepare(spec)
        current.append(job)
        event: StreamEvent | None = await _until(self._begin(job), gone.wait())
        count = 0
        while event is not None:
            count += 1
            await ws.send_json({"type": "token", "id": job.id, "token_id": event.token_id, "text": event.text})
            if event.finish_reason is not None:
                break
            event = await self._next(job)
        finish = event.finish_reason if event is not None else "cancelled"
        await ws.send_json({"type": "done", "id": job.id, "finish_reason": finish,
                            "usage": usage(len(job.prompt_ids), count)})

    def _client_key(self, scope: dict[str, Any]) -> str:
        if self.config.api_key:
            return "key"
        client = scope.get("client")
        return client[0] if client else "unknown"


# ---- helpers: disconnects, SSE, errors ---------------------------------------------------------------------------
async def _until(main: Awaitable[T], gone: Awaitable[Any]) -> T:
    """`main`'s result, unless `gone` finishes first: then `main` is cancelled and _ClientGone raised."""
    task = asyncio.ensure_future(main)
    watcher = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # retrieved, so asyncio does not warn about it
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it leave the queue before going on
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client disconnects (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
    yield b"data: [DONE]\n\n"


class _EventStream(Response):
    """A server-sent-event response that stops (and cancels its job) the moment the client disconnects.
    Starlette's StreamingResponse notices a disconnect only on some ASGI servers; this always listens."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], job: Job, headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.job = job
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await _until(pump(), gone())
        except _ClientGone:
            log.info("%s: the client disconnected mid-stream after %d tokens; cancelled", self.job.id,
                     self.job.generated)
        except OSError:
            pass  # the connection broke while writing
        finally:
            self.job.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _is_cancel(message: dict[str, Any]) -> bool:
    text = message.get("text")
    if not text or len(text) > 256:
        return False
    try:
        return json.loads(text) == {"type": "cancel"}
    except ValueError:
        return False


def _rate_limited(rate: RateLimit, wait: float) -> APIError:
    retry = retry_after_header(wait)
    return APIError(429, f"rate limit of {rate} requests exceeded; retry in {retry} s", type="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": retry})


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Guard:
    """ASGI middleware: the API key on everything but /health, then the per-client rate limit (HTTP requests
    here; WebSocket messages are counted one by one in the handler)."""

    def __init__(self, app, handlers: _App) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        config, limiter = self.handlers.config, self.handlers.limiter
        error = None
        if config.api_key and not bearer_matches(Headers(scope=scope).get("authorization"), config.api_key):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        elif scope["type"] == "http" and limiter is not None:
            wait = limiter.acquire(self.handlers._client_key(scope))
            if wait:
                error = _rate_limited(limiter.rate, wait)
        if error is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            return await _error_response(error)(scope, receive, send)
        ws = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await ws.send_denial_response(_error_response(error))
        else:
            await ws.close(code=1008, reason=error.message[:120])


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # the client left (e.g. mid-body); nobody reads this


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                    code="internal_error"))


def create_app(model: ServedModel, config: ServerConfig = ServerConfig()) -> Starlette:
    """The ASGI application (no socket): serve it with uvicorn, or drive it in-process in tests."""
    config.check()
    handlers = _App(model, config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        handlers.scheduler.cancel_all()
        await asyncio.to_thread(handlers.scheduler.join)

    app = Starlette(
        routes=[
            Route("/health", handlers.health, methods=["GET"]),
            Route("/v1/models", handlers.models, methods=["GET"]),
            Route("/v1/models/{model:path}", handlers.retrieve_model, methods=["GET"]),
            Route("/v1/chat/completions", handlers.chat, methods=["POST"]),
            Route("/v1/completions", handlers.completions, methods=["POST"]),
            WebSocketRoute("/ws", handlers.websocket),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
                            _ClientGone: _client_gone, Exception: _server_error},
        lifespan=lifespan,
    )
    app.add_middleware(_Guard, handlers=handlers)
    app.state.dzc = handlers
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port). Raises ServeError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ServeError(f"cannot use --host {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                         "(or 0 for any free one)") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: ServedModel, config: ServerConfig, announce: Callable[[str], None] | None = None) -> None:
    """Run the server until Ctrl-C (then return) or SIGTERM (the process ends by it), both after a graceful
    shutdown of at most 5 s. `announce` gets one line with the URL once the socket listens (default: printed
    to stdout), so `--port 0` can be used and scripts can wait for it."""
    import uvicorn

    config.check()
    _setup_logging()
    app = create_app(model, config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(config.host) and not config.api_key:
        log.warning("listening on %s, which is not a loopback address, without an API key: anyone who can "
                    "reach it can use the model; set --api-key", config.host)
    url_host = f"[{host}]" if ":" in host else host
    line = (f"dzc serve: {model.name!r} on http://{url_host}:{port} (max-concurrency {config.max_concurrency}, "
            f"api key {'on' if config.api_key else 'off'}, rate limit {config.rate_limit or 'off'})")
    (announce or (lambda text: print(text, flush=True)))(line)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="info", ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=5, lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a graceful shutdown
        pass
    finally:
        sock.close()


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     dzc: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

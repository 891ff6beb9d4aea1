"""OpenAI-compatible routes over the session manager: POST /v1/chat/completions, GET /v1/models (and
/v1/models/{id}), GET /health.

`OpenAIApi(...).routes()` is mounted on the Gradio app's FastAPI app (vlm.ui.launch) or served alone
(`python -m vlm serve`, vlm/serve.py). Requests go through `SessionManager.generate` like the chat tab's,
so both share its models, slots and caps. A request is checked whole (vlm.api_request) before anything
runs; its media live in a temporary directory of its own until its generation has ended. At most
`max_requests` requests are in flight (429 beyond). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400, 401, 404, 413, 429, 500, 502 or 503.
A client that disconnects cancels its generation (within a decode step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.routing import BaseRoute

from .api_request import ApiError, Bounds, ChatRequest, MediaFiles, ServedModel, parse
from .boxes import strip_markup
from .errors import (ContextLengthError, InputError, MediaError, OutOfMemoryError, RemoteError, ServerBusyError,
                     error_text)
from .reasoning import partial_tag_length
from .session import Generation, MemoryBudgetError, SessionManager, Snapshot

POLL_SECONDS = 0.05  # how often a request looks at its generation's progress (as the chat tab redraws)
DISCONNECT_POLLS = 4  # ... and, once every this many looks, whether its client is still there
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    """The API's own settings (vlm.ui.settings reads them from VLM_API_*)."""

    key: str | None = None  # VLM_API_KEY: when set, /v1 requests need "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] = ()  # VLM_API_ALLOWED_HOSTS: hosts whose image/video URLs are fetched
    max_request_bytes: int = 100 * 2**20  # VLM_API_MAX_REQUEST_SIZE: largest request body


class ClientGone(Exception):
    """The client disconnected before its answer was sent."""


class OpenAIApi:
    def __init__(self, manager: SessionManager, models: Sequence[ServedModel], settings: ApiSettings,
                 bounds: Bounds, max_requests: int):
        self.manager, self.settings, self.bounds = manager, settings, bounds
        self.models = {m.id: m for m in models}
        self.max_requests = max_requests
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._in_flight = 0

    def routes(self) -> list[BaseRoute]:
        router = APIRouter()
        router.add_api_route("/v1/chat/completions", self._handled(self.chat_completions), methods=["POST"])
        router.add_api_route("/v1/models", self._handled(self.list_models), methods=["GET"])
        router.add_api_route("/v1/models/{model_id:path}", self._handled(self.get_model), methods=["GET"])
        router.add_api_route("/health", self.health, methods=["GET"])
        return list(router.routes)

    # ------------------------------------------------------------------------------------------ routes
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self.models.values()]})

    async def get_model(self, request: Request) -> Response:
        model = self.models.get(request.path_params["model_id"])
        if model is None:
            raise ApiError(404, f"The model {request.path_params['model_id']!r} does not exist on this server.",
                           code="model_not_found", param="model")
        return JSONResponse(self._model_card(model))

    async def chat_completions(self, request: Request) -> Response:
        with self._lock:
            if self._in_flight >= self.max_requests:
                raise ApiError(429, f"This server is busy with {self.max_requests} requests, as many as it takes; "
                                    "try again shortly.", kind="rate_limit_error", code="rate_limit_exceeded")
            self._in_flight += 1
        job: _Job | None = None
        response: Response | None = None
        try:
            body = await self._body(request)
            parsed, files = await asyncio.to_thread(self._prepare, body)
            job = _Job(self, parsed, files)
            response = await self._respond(job, parsed, request)
            return response
        except ClientGone:
            return Response(status_code=499)
        finally:
            if job is None:
                self._release()
            elif not isinstance(response, StreamingResponse):  # a stream closes its job when it ends
                job.close()

    # ---------------------------------------------------------------------------------------- requests
    def _handled(self, route: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """`route` behind the API key check, its ApiErrors as JSON responses."""

        async def handled(request: Request) -> Response:
            try:
                self._authorize(request)
                return await route(request)
            except ApiError as exc:
                return JSONResponse(exc.body(), exc.status)
            except Exception as exc:  # a fault of this server: logged, answered as a 500
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse(api_error(exc).body(), 500)

        return handled

    def _authorize(self, request: Request) -> None:
        if self.settings.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.settings.key.encode()):
            raise ApiError(401, "A valid API key is needed: send the header Authorization: Bearer <key>.",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        too_large = ApiError(413, f"The request is larger than {limit:,} bytes, this server's limit "
                                  "(VLM_API_MAX_REQUEST_SIZE).", code="request_too_large")
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

    def _prepare(self, raw: bytes) -> tuple[ChatRequest, MediaFiles]:
        """The checked request with its media written to files (in a worker thread: decoding takes time)."""
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ApiError(400, "The request body is not valid JSON.") from None
        parsed = parse(body, self.models, self.bounds)
        files = MediaFiles()
        try:
            files.write(parsed.media, self.bounds)
        except BaseException:
            files.close()
            raise
        return parsed, files

    async def _respond(self, job: "_Job", parsed: ChatRequest, request: Request) -> Response:
        """Wait for the first text (or the end), then stream the rest or answer once it is done."""
        answer = AnswerText(parsed, job.generation)
        pieces: list[tuple[str, str]] = []  # (reasoning, content) taken from the snapshots so far
        async with aclosing(_follow(job.generation, request)) as snapshots:
            async for snap in snapshots:
                pieces.append(answer.take(snap))
                if parsed.stream and (snap.thinking or snap.answer):
                    break
        if snap.error is not None and (not parsed.stream or not (snap.thinking or snap.answer)):
            raise api_error(snap.error)
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), parsed.model.id)
        if parsed.stream:  # the job closes when the stream ends, or after the response if it never started
            return StreamingResponse(self._events(job, parsed, answer, pieces, snap, meta),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(job.close))
        reasoning, content = ("".join(texts) for texts in zip(*pieces))
        message: dict[str, Any] = {"role": "assistant", "content": content + answer.flush()}
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        return JSONResponse({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish(snap)}],
            "usage": usage(snap)})

    async def _events(self, job: "_Job", parsed: ChatRequest, answer: "AnswerText", pieces: list[tuple[str, str]],
                      snap: Snapshot, meta: "_Meta") -> AsyncIterator[str]:
        """The SSE stream: the `pieces` taken so far, a chunk per later change (after `snap`), the finish
        reason, usage when asked, then [DONE]."""
        try:
            yield meta.chunk({"role": "assistant", "content": ""}, parsed.include_usage)
            for piece in pieces:
                if any(piece):
                    yield meta.delta(piece, parsed.include_usage)
            async for snap in _follow(job.generation, None, after=snap):
                piece = answer.take(snap)
                if any(piece):
                    yield meta.delta(piece, parsed.include_usage)
            held = answer.flush()
            if held:
                yield meta.delta(("", held), parsed.include_usage)
            if snap.error is not None:
                yield _sse(api_error(snap.error).body())
            else:
                yield meta.chunk({}, parsed.include_usage, finish=answer.finish(snap))
                if parsed.include_usage:
                    yield _sse({**meta.head("chat.completion.chunk"), "choices": [], "usage": usage(snap)})
            yield "data: [DONE]\n\n"
        finally:
            job.close()

    def _model_card(self, model: ServedModel) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": self.created, "owned_by": "vlm", "family": model.family}

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


# --------------------------------------------------------------------------------------------- helpers
class _Job:
    """One request's generation, media files and admission, released together once the generation ended."""

    def __init__(self, api: OpenAIApi, parsed: ChatRequest, files: MediaFiles):
        self.api, self.files = api, files
        model = parsed.model
        self.generation: Generation = api.manager.generate(model.family, model.source, parsed.conversation,
                                                           **parsed.options)
        self._closed = False

    def close(self) -> None:
        """Cancel the generation (if still running); files and admission go when its thread has ended."""
        if self._closed:
            return
        self._closed = True
        self.generation.cancel()
        if self.generation.snapshot().done:
            self._release()
        else:
            threading.Thread(target=self._release, name="vlm-api-release", daemon=True).start()

    def _release(self) -> None:
        self.generation.join()
        self.files.close()
        self.api._release()


class AnswerText:
    """The text as the API sends it: the reasoning, and the answer (without box markup when asked) cut at
    the first stop string, which cancels the generation."""

    def __init__(self, parsed: ChatRequest, generation: Generation):
        self.stops, self.skip_markup, self.generation = parsed.stop, parsed.skip_special_tokens, generation
        self.reasoning_sent = self.answer_seen = 0
        self.held = ""  # answer text that may be the start of a stop string
        self.stopped = False

    def take(self, snap: Snapshot) -> tuple[str, str]:
        """(reasoning, answer) text that `snap` adds."""
        reasoning, self.reasoning_sent = snap.thinking[self.reasoning_sent:], len(snap.thinking)
        text = strip_markup(snap.answer) if self.skip_markup else snap.answer
        new, self.answer_seen = text[self.answer_seen:], len(text)
        if self.stopped:
            return reasoning, ""
        buffer = self.held + new
        found = [buffer.find(s) for s in self.stops if s in buffer]
        if found:
            self.stopped, self.held = True, ""
            self.generation.cancel()
            return reasoning, buffer[:min(found)]
        keep = partial_tag_length(buffer, self.stops) if self.stops else 0
        self.held = buffer[len(buffer) - keep:]
        return reasoning, buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """The held text, at the end (it began a stop string that never came)."""
        held, self.held = self.held, ""
        return held

    def finish(self, snap: Snapshot) -> str:
        """OpenAI's finish_reason: "length" at the token budget (or the server's time cap), else "stop"."""
        return "length" if not self.stopped and snap.finish in ("length", "timeout") else "stop"


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, Any], with_usage: bool, finish: str | None = None) -> str:
        body = {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return _sse({**body, "usage": None} if with_usage else body)

    def delta(self, piece: tuple[str, str], with_usage: bool) -> str:
        """The chunk of a (reasoning, content) piece; the reasoning goes under both names clients read
        (vLLM's reasoning_content, and reasoning)."""
        reasoning, content = piece
        delta = {"content": content} if content else {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        return self.chunk(delta, with_usage)


async def _follow(generation: Generation, request: Request | None, after: Snapshot | None = None
                  ) -> AsyncIterator[Snapshot]:
    """Every new snapshot (later than `after`) until the generation is done. With `request`, raises
    ClientGone (after cancelling the generation) when its client disconnects."""
    if after is not None and after.done:
        return
    seen, polls = -1 if after is None else after.version, 0
    while True:
        snap = generation.snapshot()
        if snap.version != seen:
            seen = snap.version
            yield snap
            if snap.done:
                return
        polls += 1
        if request is not None and polls % DISCONNECT_POLLS == 0 and await request.is_disconnected():
            generation.cancel()
            raise ClientGone
        await asyncio.sleep(POLL_SECONDS)


def usage(snap: Snapshot) -> dict[str, Any]:
    """OpenAI's usage, with the prompt's image and video tokens in prompt_tokens_details.visual_tokens."""
    stats = snap.stats
    prompt = (stats.prompt_tokens if stats else None) or 0
    completion = stats.tokens if stats else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"visual_tokens": stats.visual_tokens if stats else None}}


def api_error(exc: BaseException) -> ApiError:
    """The HTTP status and body for a generation's exception."""
    message = error_text(exc)
    if isinstance(exc, ContextLengthError):
        return ApiError(400, message, code="context_length_exceeded")
    if isinstance(exc, (InputError, MediaError)):
        return ApiError(400, message)
    if isinstance(exc, (ServerBusyError, MemoryBudgetError, OutOfMemoryError)):
        return ApiError(503, message, kind="server_error", code="server_busy")
    if isinstance(exc, RemoteError):
        return ApiError(502, message, kind="server_error", code="upstream_error")
    return ApiError(500, message, kind="server_error")


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")

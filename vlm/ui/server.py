"""The HTTP server the demo runs in: Gradio's uvicorn with a deadline for request headers, a keep-alive
timeout, a cap on open connections, and a cap on request bodies.

uvicorn keeps a connection that sends its headers slowly for as long as the client likes, so a few
hundred slow clients would hold every file descriptor. `GuardedH11Protocol` closes a connection whose
request headers have not arrived `header_seconds` after it opened (or after its previous response), and
when more than `connections` are open it closes the oldest one that has no request in progress (a slow
client's, not a running answer's), or else the new one. Gradio builds its uvicorn server itself, so
`hardened(limits)` has it build ours while `Blocks.launch` runs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

from uvicorn.protocols.http.h11_impl import H11Protocol

Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class ServerLimits:
    request_bytes: int = 2**20  # a request body other than an upload
    connections: int = 500  # open connections
    header_seconds: float = 10.0  # from a connection's opening (or its last response) to its request's headers
    keepalive_seconds: float = 5.0  # an idle connection stays open this long


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and a connection cap (`limits` set by `protocol`)."""

    limits = ServerLimits()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        self._deadline = None
        self._arm()
        if len(self.connections) > self.limits.connections:
            idle = [c for c in self.connections if c is not self and getattr(c, "waiting", lambda: False)()]
            victim = min(idle, key=lambda c: c.opened, default=self)
            victim.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def waiting(self) -> bool:
        """No request in progress: the connection waits for (the rest of) a request's headers, or is idle."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        """Close the connection unless a new request's headers arrive within `header_seconds`."""
        if self._deadline is not None:
            self._deadline.cancel()
        cycle = self.cycle
        self._deadline = self.loop.call_later(self.limits.header_seconds, self._expire, cycle)

    def _expire(self, cycle: Any) -> None:
        if self.cycle is cycle and self.waiting() and not self.transport.is_closing():
            self.transport.close()


def protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """The protocol class with `limits`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


@contextmanager
def hardened(limits: ServerLimits) -> Iterator[None]:
    """While in the block, the uvicorn server Gradio starts uses `limits`."""
    import gradio.http_server as http_server

    gradio_server = http_server.Server

    class Server(gradio_server):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any):
            config.http = protocol(limits)
            config.timeout_keep_alive = limits.keepalive_seconds
            super().__init__(config, *args, **kwargs)

    http_server.Server = Server
    try:
        yield
    finally:
        http_server.Server = gradio_server


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes is refused with 413 before the app reads
    it (uploads and the OpenAI-compatible API have limits of their own: `exempt` paths, a trailing "/"
    exempting everything under it)."""

    def __init__(self, app: Any, limit: int, exempt: tuple[str, ...] = ("/gradio_api/upload", "/v1/")):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: dict, receive: Any, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or any(path.startswith(p) if p.endswith("/") else path.rstrip("/") == p
                                          for p in self.exempt):
            return await self.app(scope, receive, send)
        refusal = f"A request body may have at most {self.limit:,} bytes."
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await plain(send, 413, refusal)
        body: list[dict] = []  # read here (at most `limit` bytes: a chunked body has no length), then replayed
        while not body or body[-1].get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                return
            body.append(message)
            if sum(len(m.get("body", b"")) for m in body) > self.limit:
                return await plain(send, 413, refusal)

        async def replay() -> dict:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)


async def plain(send: Send, status: int, text: str) -> None:
    """Send a plain-text response."""
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

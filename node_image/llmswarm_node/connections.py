"""Bounds on connections: how many a server holds at once, and how long one may take to ask.

aiohttp's web server takes any number of connections and waits for a request's header as
long as a client cares to take (``keepalive_timeout`` only starts counting once a first request
was answered, in the aiohttp versions this package supports). :class:`ConnectionGate` stands
between the listening socket and aiohttp:

- past ``--max-connections`` open connections, a new one is answered ``503`` with
  ``Retry-After`` and an ``overloaded`` error frame once its request header arrived, then closed;
- a connection that has not sent a whole request header ``--header-timeout`` seconds after it
  opened is closed (after a request, aiohttp's keep-alive timeout, set to the same value, closes
  a connection that does not start the next one);
- a request body must arrive within ``--body-timeout`` (http_handlers.py), and a session
  WebSocket that holds no session and sends nothing is closed after ``--idle-connection-timeout``
  (session_handlers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llmswarm_core import wire
from llmswarm_node.sessions import RETRY_AFTER

log = logging.getLogger("llmswarm.node")

HEADER_END = b"\r\n\r\n"
FRESH_SECONDS = 1.0  # a connection accepted counts until aiohttp registers it (a burst is accepted at once)
REFUSAL_LINGER = 2.0  # seconds a refused connection may take to send its request header before it is closed


def refusal(open_connections: int) -> bytes:
    """The whole HTTP response that refuses a connection over the limit: 503, Retry-After, an error frame."""
    body = wire.reply_frame(wire.ErrorReply(code="overloaded", retryable=True, retry_after=RETRY_AFTER,
                                            message=f"{open_connections} connections are open, the server's limit"))
    head = (f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {round(RETRY_AFTER)}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refused(asyncio.Protocol):
    """A connection over the limit, answered once its request header arrived (or after REFUSAL_LINGER).

    Answering before the request is read would race the client: a WebSocket client that reads the 503 before it
    has sent its handshake finds the connection closed under it, not refused. After the answer the connection is
    half-closed and what the client still sends is read and dropped until it closes (a close with unread data would
    reset the connection and could lose the answer)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.tail = b""
        self.answered = False
        self.transport: asyncio.WriteTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._answer_and_close)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        seen = self.tail + data
        self.tail = seen[-len(HEADER_END):]
        if HEADER_END in seen:
            self._answer()

    def _answer(self) -> None:
        if self.answered or self.transport is None or self.transport.is_closing():
            return
        self.answered = True
        self.transport.write(self.response)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then closes; the timer closes a client that doesn't
        else:
            self.transport.close()

    def _answer_and_close(self) -> None:
        self._answer()
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        self._answer()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class ConnectionGate:
    """Admits at most `max_connections` connections, and closes one that takes `header_timeout` to ask."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refused = 0
        self._waiting: set[object] = set()  # connections that have not sent a whole first header yet
        self._fresh: dict[Any, float] = {}  # connections made but maybe not registered with aiohttp's server yet

    def factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory to listen with: aiohttp's own connections, or a refusal past the limit."""
        loop = asyncio.get_running_loop()

        def make() -> asyncio.BaseProtocol:
            now = loop.time()
            for made, at in list(self._fresh.items()):  # connected ones count among the server's connections now
                if made.transport is not None or now - at > FRESH_SECONDS:
                    del self._fresh[made]
            open_now = len(server.connections) + len(self._fresh)
            if open_now >= self.max_connections:
                self.refused += 1
                if self.refused == 1 or self.refused % 100 == 0:
                    log.warning("%d connections open: refusing new ones (%d so far)", open_now, self.refused)
                return _Refused(refusal(open_now))
            handler = server()
            self._fresh[handler] = now
            self._waiting.add(handler)
            loop.call_later(self.header_timeout, self._check, handler)
            return handler

        return make

    def _check(self, handler: Any) -> None:
        if handler in self._waiting:
            self._waiting.discard(handler)
            log.info("closing a connection that sent no whole request header in %.0f s", self.header_timeout)
            handler.force_close()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Marks a connection as having sent a whole header (the first middleware: before any refusal)."""
        self._waiting.discard(request.protocol)
        return await handler(request)


class GatedRunner(web.AppRunner):
    """An AppRunner whose sites listen through a :class:`ConnectionGate`."""

    def __init__(self, app: web.Application, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=gate.header_timeout, **kwargs)
        self.gate = gate

    @property
    def server(self) -> Any:
        inner = super().server
        return None if inner is None else _GatedServer(inner, self.gate.factory(inner))


class _GatedServer:
    """What a site calls for each new connection (the gate's factory); the rest is aiohttp's server."""

    def __init__(self, inner: web.Server, make: Callable[[], asyncio.BaseProtocol]) -> None:
        self._inner = inner
        self._make = make

    def __call__(self) -> asyncio.BaseProtocol:
        return self._make()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

"""Server-to-server push: a step's output goes straight to the next server of the client's chain.

Without push, every hop of a token is a round trip through the client: the client reads a
server's output, then sends it to the next server. With push (as in Petals' ``rpc_push``),
the client sends a step to its first server with the rest of its chain (``PushTarget``:
each next server's URL, session, push key and the client's request id there); each server
hands its output to the next one over a kept-open WebSocket (``/v1/push``), and still
answers the client, which keeps every hop's input for failover replay. The client's own
path is one send and the replies; the hop boundaries no longer wait on the client.

A server pushes only to servers that the swarm's route map lists, never to a URL a client
names at will: it sends the swarm token along, and must not be made to connect elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp

from llmswarm_core import wire
from llmswarm_core.routemap_client import RouteMapClient, RouteMapError, auth_headers
from llmswarm_core.security import client_ssl_context

log = logging.getLogger("llmswarm.node")

REFRESH_SECONDS = 1.0  # an unknown URL re-reads the route map at most this often
TRUST_SECONDS = 60.0  # a listed URL is checked against the route map again after this long
DOWN_SECONDS = 10.0  # a server that could not be pushed to is not tried again for this long


class PeerDirectory:
    """Which URLs are servers of this swarm: the route map's servers, read when a URL is not known yet.

    It reads the route map through the server's one route-map client (announcer.py); without one
    (a server of no swarm) it knows no server.
    """

    def __init__(self, routes: RouteMapClient | None) -> None:
        self.routes = routes
        self._urls: set[str] = set()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def known(self, url: str) -> bool:
        fresh = time.monotonic() - self._read_at < TRUST_SECONDS
        if url in self._urls and fresh:
            return True
        if self.routes is None:
            return False
        async with self._lock:
            stale = time.monotonic() - self._read_at >= TRUST_SECONDS
            if (url not in self._urls or stale) and time.monotonic() - self._read_at >= REFRESH_SECONDS:
                self._read_at = time.monotonic()
                try:
                    self._urls = {server.url for server in (await self.routes.routes()).servers}
                except RouteMapError as error:
                    log.warning("cannot read the route map to check a push target: %s", error)
        return url in self._urls


class Pusher:
    """Kept-open push connections to the other servers, one per server URL."""

    def __init__(self, peers: PeerDirectory, token: str | None, tls_ca: str | None, timeout: float = 5.0) -> None:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(tls_ca)) if tls_ca else None
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout),
                                           connector=connector, headers=auth_headers(token) or None)
        self.peers = peers
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._down: dict[str, float] = {}  # url -> until when it is not tried (unreachable, refused us)
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def push(self, url: str, frame: bytes) -> bool:
        """Hand `frame` to the server at `url`; False where it could not be sent (the client then sends it)."""
        if self._down.get(url, 0.0) > time.monotonic():
            return False
        if not await self.peers.known(url):
            log.warning("not pushing to %s: the route map does not list it", url)
            return False
        for attempt in range(2):  # a kept connection may have closed since: one new one
            try:
                socket_ = await self._socket(url)
                await socket_.send_bytes(frame)
                return True
            except (TimeoutError, aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as error:
                self._drop(url)
                if attempt:
                    log.warning("push to %s failed (not tried again for %.0f s): %s", url, DOWN_SECONDS, error)
                    self._down[url] = time.monotonic() + DOWN_SECONDS
        return False

    async def _socket(self, url: str) -> aiohttp.ClientWebSocketResponse:
        socket_ = self._sockets.get(url)
        if socket_ is not None and not socket_.closed:
            return socket_
        async with self._connecting.setdefault(url, asyncio.Lock()):
            socket_ = self._sockets.get(url)
            if socket_ is None or socket_.closed:
                ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/push"
                socket_ = await self._http.ws_connect(ws_url, autoping=True, heartbeat=None)
                self._sockets[url] = socket_
                self._background(self._read_refusals(url, socket_))
            return socket_

    async def _read_refusals(self, url: str, socket_: aiohttp.ClientWebSocketResponse) -> None:
        """A peer answers on the push connection only when it refuses a push outright (bad session or key)."""
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.BINARY:
                try:
                    header = wire.decode(message.data).header
                except wire.ProtocolError as error:
                    header = {"message": str(error)}
                log.warning("server %s refused a push: %s", url, header.get("message"))
        if self._sockets.get(url) is socket_:
            del self._sockets[url]

    def _drop(self, url: str) -> None:
        socket_ = self._sockets.pop(url, None)
        if socket_ is not None and not socket_.closed:
            self._background(socket_.close())

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for socket_ in list(self._sockets.values()):
            await socket_.close()
        self._sockets.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.close()

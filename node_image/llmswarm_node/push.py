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

A push is on the path of a step's reply, so nothing on it waits long: the route map is read
in the background (a URL it does not list yet is not pushed to this time), and connecting
and sending have one deadline (``--push-timeout``): a peer that does not answer or stops
reading costs a step that long at most, and the client is told ``pushed: false``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from llmswarm_core import wire
from llmswarm_core.relay import RELAY_PREFIX, relay_url
from llmswarm_core.routemap import RouteMap
from llmswarm_core.routemap_client import RouteMapClient, RouteMapError, auth_headers
from llmswarm_core.security import client_ssl_context

log = logging.getLogger("llmswarm.node")

REFRESH_SECONDS = 1.0  # an unknown URL re-reads the route map at most this often
FRESH_SECONDS = 2.0  # a serving server re-reads the route map this often (its peers join and leave)
TRUST_SECONDS = 60.0  # a listed URL is checked against the route map again after this long
DOWN_SECONDS = 10.0  # a server that could not be pushed to is not tried again for this long
REUSE_SECONDS = 20.0  # a kept connection unused this long is replaced (peers close silent ones: --idle-connection-timeout)


class PeerDirectory:
    """Which URLs are servers of this swarm: the route map's servers, read in the background.

    It reads the route map through the server's one route-map client (announcer.py); without one
    (a server of no swarm) it knows no server. :meth:`listed` never waits for the route map (it is
    on the path of a step's reply); :meth:`keep_fresh` re-reads the map every few seconds, so servers
    that join are known before the first step is pushed to them.
    """

    def __init__(self, routes: RouteMapClient | None,
                 on_read: Callable[[RouteMap], None] | None = None) -> None:
        self.routes = routes
        self.on_read = on_read  # told each map read (the server learns revoked credentials from it)
        self._urls: set[str] = set()
        self._ids: dict[str, str] = {}  # listed URL -> server id
        self._read_at = float("-inf")
        self._reading: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def listed(self, url: str) -> bool:
        """Whether the route map listed `url` when last read. An unknown URL or an old read starts a new read in
        the background (at most every REFRESH_SECONDS), which later calls see."""
        age = time.monotonic() - self._read_at
        if self.routes is not None and (url not in self._urls or age >= TRUST_SECONDS) and age >= REFRESH_SECONDS:
            self._read(self.routes)
        return url in self._urls

    async def known(self, url: str) -> bool:
        """Whether the route map lists `url`, reading it first where `url` is unknown (at most a read's timeout)."""
        if not self.listed(url):
            await self.settled()
        return url in self._urls

    def keep_fresh(self, period: float) -> None:
        """Re-read the route map every `period` seconds, in the background, until :meth:`close`."""
        if self.routes is not None and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever(self.routes, period))

    async def _refresh_forever(self, routes: RouteMapClient, period: float) -> None:
        while True:
            self._read(routes)
            await asyncio.sleep(period)

    def _read(self, routes: RouteMapClient) -> None:
        if self._reading is None:
            self._read_at = time.monotonic()
            self._reading = asyncio.get_running_loop().create_task(self._read_now(routes))

    async def _read_now(self, routes: RouteMapClient) -> None:
        try:
            read = await routes.routes()
            self._urls = {server.url for server in read.servers}
            self._ids = {server.url: server.id for server in read.servers}
            if self.on_read is not None:
                self.on_read(read)
        except RouteMapError as error:
            log.warning("cannot read the route map to check push targets: %s", error)
        finally:
            self._reading = None

    def server_id(self, url: str) -> str | None:
        """The id of the server listed at `url` when the map was last read."""
        return self._ids.get(url)

    async def settled(self) -> None:
        """Wait for a read in progress, if any."""
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    async def close(self) -> None:
        for task in (self._refreshing, self._reading):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._refreshing = self._reading = None


class Pusher:
    """Kept-open push connections to the other servers, one per server URL."""

    def __init__(self, peers: PeerDirectory, token: str | None, tls_ca: str | None, timeout: float = 5.0,
                 relay: str | None = None) -> None:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(tls_ca)) if tls_ca else None
        # Each push has one deadline (`timeout`: connecting, the handshake and the send); a kept connection
        # then has no timeout of its own.
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout),
                                           connector=connector, headers=auth_headers(token) or None)
        self.peers = peers
        self.timeout = timeout
        self.relay = relay  # reach every peer through this route map's relay (a server behind NAT: relay_agent.py)
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._used: dict[str, float] = {}  # url -> when its kept connection last sent
        self._connecting: dict[str, asyncio.Lock] = {}
        self._down: dict[str, float] = {}  # url -> until when it is not tried (unreachable, refused us)
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def push(self, url: str, frame: bytes) -> bool:
        """Hand `frame` to the server at `url`; False where it could not be sent (the client then sends it)."""
        if self._down.get(url, 0.0) > time.monotonic():
            return False
        if not self.peers.listed(url):
            log.warning("not pushing to %s: the route map does not list it (yet)", url)
            return False
        try:
            async with asyncio.timeout(self.timeout):
                return await self._send(url, frame)
        except TimeoutError:
            self._fail(url, f"no connection, or the peer did not take the step, within {self.timeout:.1f} s")
            return False

    async def _send(self, url: str, frame: bytes) -> bool:
        for attempt in range(2):  # a kept connection may have closed since: one new one
            try:
                socket_ = await self._socket(url)
                await socket_.send_bytes(frame)
                self._used[url] = time.monotonic()
                return True
            except (aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as error:
                self._drop(url)
                if attempt:
                    self._fail(url, str(error))
        return False

    def _fail(self, url: str, why: str) -> None:
        log.warning("push to %s failed (not tried again for %.0f s): %s", url, DOWN_SECONDS, why)
        self._drop(url)
        self._down[url] = time.monotonic() + DOWN_SECONDS

    async def _socket(self, url: str) -> aiohttp.ClientWebSocketResponse:
        socket_ = self._sockets.get(url)
        if socket_ is not None and not socket_.closed and time.monotonic() - self._used.get(url, 0.0) < REUSE_SECONDS:
            return socket_
        if socket_ is not None:
            self._drop(url)  # closed, or so long unused that the peer may be closing it
        async with self._connecting.setdefault(url, asyncio.Lock()):
            socket_ = self._sockets.get(url)
            if socket_ is None or socket_.closed:
                ws_url = self._address(url).replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/push"
                socket_ = await self._http.ws_connect(ws_url, autoping=True, heartbeat=None)
                self._sockets[url] = socket_
                self._used[url] = time.monotonic()
                self._background(self._read_refusals(url, socket_))
            return socket_

    def _address(self, url: str) -> str:
        """Where the peer listed at `url` is reached: through the relay where this server uses one."""
        server_id = self.peers.server_id(url)
        if self.relay is None or server_id is None or url.startswith(self.relay + RELAY_PREFIX):
            return url
        return relay_url(self.relay, server_id)

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
            self._background(self._close(socket_))

    async def _close(self, socket_: aiohttp.ClientWebSocketResponse) -> None:
        """Close a dropped connection; one whose peer stopped reading cannot take even a close frame: give up then."""
        try:
            async with asyncio.timeout(self.timeout):
                await socket_.close()
        except TimeoutError:
            log.info("a push connection did not close within %.1f s", self.timeout)

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        sockets = list(self._sockets.values())
        self._sockets.clear()
        await asyncio.gather(*(self._close(socket_) for socket_ in sockets if not socket_.closed))
        await self.peers.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.close()

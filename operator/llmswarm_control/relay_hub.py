"""The route map's relay (llmswarm_core/relay.py): attached servers' tunnels, and forwarding to any listed server.

  GET  /v1/relay/attach                a server behind NAT attaches (WebSocket; join role, signed with its key)
  GET  /v1/relay/accept?token=...      the server dials one tunnel for one relayed connection (WebSocket)
  *    /relay/{id}/{path}              a request or WebSocket for server `id`, carried to it: through its tunnel
                                       when it is attached, else straight to its listed address

Everything is bounded: attached servers, tunnels open per server, the time a server has to dial a
tunnel, and the size of every body and message. A server that attaches again (a new control socket)
replaces its old one; the key that attaches must be the one that speaks for the id (IdentityBook).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from llmswarm_control.server_identities import IdentityBook, IdentityRefused
from llmswarm_core import relay
from llmswarm_core.identity import IdentityError
from llmswarm_core.relay import RelayAttached, RelayOpen, RelayReply, RelayRequest
from llmswarm_core.routemap import RouteMap
from llmswarm_core.routemap_client import read_limited
from llmswarm_core.security import client_ssl_context

log = logging.getLogger("llmswarm_core.routemap")

_ID = re.compile(r"^[A-Za-z0-9._\-]{1,256}$")


@dataclass(frozen=True)
class RelayLimits:
    max_servers: int = 1024  # attached servers at once
    max_tunnels_per_server: int = 256  # relayed connections open to one attached server
    dial_timeout: float = 10.0  # seconds an attached server has to dial a tunnel
    reply_timeout: float = 600.0  # seconds a relayed HTTP request may take (a long backward pass)
    max_message_bytes: int = relay.MAX_MESSAGE_BYTES


@dataclass
class _Attached:
    socket: web.WebSocketResponse
    key: str
    url: str
    tunnels: int = 0


@dataclass
class _Tunnel:
    socket: web.WebSocketResponse
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RelayHub:
    """`identities`: who speaks for which id; `routes()`: the published map (where unattached servers are);
    `public_url`: the address servers are listed at (default: the one each server dialled)."""

    def __init__(self, identities: IdentityBook, routes: Callable[[], RouteMap], registry: CollectorRegistry,
                 public_url: str | None = None, tls_ca: str | None = None, limits: RelayLimits | None = None,
                 refused: Callable[[str], None] | None = None) -> None:
        self.identities = identities
        self.routes = routes
        self.public_url = public_url.rstrip("/") if public_url else None
        self.limits = limits or RelayLimits()
        self.refused = refused or (lambda reason: None)
        self.attached: dict[str, _Attached] = {}
        self._pending: dict[str, asyncio.Future[_Tunnel]] = {}
        self._tls_ca = tls_ca
        self._http: aiohttp.ClientSession | None = None
        self._attached_gauge = Gauge("llmswarm_relay_attached_servers", "Servers attached to the relay (behind NAT)",
                                     registry=registry)
        self._relayed = Counter("llmswarm_relay_requests", "Requests and WebSockets relayed, by how the server was "
                                "reached (tunnel: an attached server; direct: its listed address)", ["via", "kind"],
                                registry=registry)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(relay.ATTACH_PATH, self.attach)
        app.router.add_get(relay.ACCEPT_PATH, self.accept)
        app.router.add_route("*", relay.RELAY_PREFIX + "{server_id}/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        for attached in list(self.attached.values()):
            await attached.socket.close()
        if self._http is not None:
            await self._http.close()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self._tls_ca)) if self._tls_ca else None
            self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                               timeout=aiohttp.ClientTimeout(total=self.limits.reply_timeout, connect=10))
        return self._http

    # -- the server's side: attach and dial tunnels

    async def attach(self, request: web.Request) -> web.StreamResponse:
        try:
            server_id, key = relay.check_attach(request.headers.get(relay.ATTACH_HEADER, ""), time.time())
            if server_id in self.identities.banned:
                raise IdentityRefused("banned", f"server id {server_id} is banned from this swarm")
            self.identities.claim(server_id, key)
        except IdentityError as error:
            self.refused("signature")
            return web.json_response({"error": f"attach refused: {error}"}, status=403)
        except IdentityRefused as error:
            self.refused(error.reason)
            return web.json_response({"error": f"attach refused: {error}"}, status=403)
        if server_id not in self.attached and len(self.attached) >= self.limits.max_servers:
            return web.json_response({"error": "the relay holds as many servers as it may"}, status=503,
                                     headers={"Retry-After": "30"})
        socket_ = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
        await socket_.prepare(request)
        url = relay.relay_url(self.public_url or str(request.url.origin()), server_id)
        previous = self.attached.get(server_id)
        attached = self.attached[server_id] = _Attached(socket_, key, url)
        self._attached_gauge.set(len(self.attached))
        if previous is not None:
            await previous.socket.close()
        log.info("server %s attached to the relay, listed at %s", server_id, url)
        try:
            await socket_.send_str(RelayAttached(url=url).model_dump_json())
            async for _ in socket_:  # the server sends nothing; reading answers its pings and sees it go
                pass
        finally:
            if self.attached.get(server_id) is attached:
                del self.attached[server_id]
                self._attached_gauge.set(len(self.attached))
                log.info("server %s left the relay", server_id)
        return socket_

    async def accept(self, request: web.Request) -> web.StreamResponse:
        waiting = self._pending.pop(request.query.get("token", ""), None)
        if waiting is None or waiting.done():
            return web.json_response({"error": "no relayed connection waits for this token"}, status=404)
        socket_ = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes)
        await socket_.prepare(request)
        tunnel = _Tunnel(socket_)
        waiting.set_result(tunnel)
        await tunnel.done.wait()  # the forwarding side is done with it
        await socket_.close()
        return socket_

    async def _dial(self, server_id: str, attached: _Attached) -> _Tunnel:
        if attached.tunnels > self.limits.max_tunnels_per_server:  # this one counted already
            raise web.HTTPServiceUnavailable(text=f"server {server_id} has as many relayed connections as it may",
                                             headers={"Retry-After": "1"})
        token = secrets.token_urlsafe(24)
        waiting: asyncio.Future[_Tunnel] = asyncio.get_running_loop().create_future()
        self._pending[token] = waiting
        try:
            await attached.socket.send_str(RelayOpen(token=token).model_dump_json())
            return await asyncio.wait_for(waiting, self.limits.dial_timeout)
        except (TimeoutError, ConnectionError, RuntimeError):
            raise web.HTTPGatewayTimeout(text=f"server {server_id} did not dial its tunnel in time") from None
        finally:
            self._pending.pop(token, None)

    # -- the client's side

    async def forward(self, request: web.Request) -> web.StreamResponse:
        server_id = request.match_info["server_id"]
        try:
            relayed = RelayRequest(method=request.method, path="/" + request.match_info["tail"],  # type: ignore[arg-type]
                                   query=request.rel_url.raw_query_string,
                                   headers=relay.pick_headers(request.headers, relay.REQUEST_HEADERS),
                                   websocket=request.headers.get("Upgrade", "").lower() == "websocket")
        except ValueError:
            return web.json_response({"error": "not a request the relay carries"}, status=400)
        if not _ID.fullmatch(server_id):
            return web.json_response({"error": "no such server"}, status=404)
        body = b""
        if not relayed.websocket:
            read = await read_limited(request.content, self.limits.max_message_bytes)
            if read is None:
                return web.json_response({"error": f"the body is larger than the relay's {self.limits.max_message_bytes} "
                                                   "bytes"}, status=413)
            body = read
        attached = self.attached.get(server_id)
        if attached is not None:
            return await self._through_tunnel(request, server_id, attached, relayed, body)
        # Only to an address the map vouches for: a `joining` server's address has not answered as it yet, and the
        # relay must not become a way to reach any address someone announces.
        listed = next((s for s in self.routes().servers if s.id == server_id and s.state in ("online", "draining")), None)
        if listed is None:
            return web.json_response({"error": f"server {server_id} is not online in this swarm"}, status=404)
        if urlsplit(listed.url).path.startswith(relay.RELAY_PREFIX):
            return web.json_response({"error": f"server {server_id} is relayed and not attached now"}, status=502)
        self._relayed.labels("direct", "websocket" if relayed.websocket else "http").inc()
        if relayed.websocket:
            upstream = await relay.open_websocket(self.http(), listed.url, relayed, self.limits.max_message_bytes)
            if isinstance(upstream, tuple):
                return _response(*upstream)
            return await self._pump_client(request, upstream)
        return _response(*await relay.perform(self.http(), listed.url, relayed, body, self.limits.max_message_bytes))

    async def _through_tunnel(self, request: web.Request, server_id: str, attached: _Attached, relayed: RelayRequest,
                              body: bytes) -> web.StreamResponse:
        self._relayed.labels("tunnel", "websocket" if relayed.websocket else "http").inc()
        attached.tunnels += 1
        try:
            tunnel = await self._dial(server_id, attached)
            try:
                if relayed.websocket:
                    await tunnel.socket.send_str(relayed.model_dump_json())
                    reply = await relay.receive_envelope(tunnel.socket, RelayReply, self.limits.dial_timeout)
                    assert isinstance(reply, RelayReply)
                    if reply.status != 101:
                        return _response(reply, await relay.receive_body(tunnel.socket, self.limits.dial_timeout))
                    return await self._pump_client(request, tunnel.socket)
                return _response(*await self.exchange(tunnel, relayed, body))
            finally:
                tunnel.done.set()
        except (ValueError, TimeoutError, ConnectionError) as error:
            return web.json_response({"error": f"server {server_id}'s tunnel broke: {error}"}, status=502)
        finally:
            attached.tunnels -= 1

    async def exchange(self, tunnel: _Tunnel, relayed: RelayRequest, body: bytes) -> tuple[RelayReply, bytes]:
        """One HTTP request through a tunnel: its reply and body."""
        await tunnel.socket.send_str(relayed.model_dump_json())
        await tunnel.socket.send_bytes(body)
        reply = await relay.receive_envelope(tunnel.socket, RelayReply, self.limits.reply_timeout)
        assert isinstance(reply, RelayReply)
        return reply, await relay.receive_body(tunnel.socket, self.limits.reply_timeout)

    async def get(self, server_id: str, path: str, query: str) -> tuple[RelayReply, bytes]:
        """A GET to an attached server through its tunnel (the route map's own address check)."""
        attached = self.attached.get(server_id)
        if attached is None:
            raise ConnectionError(f"server {server_id} is not attached")
        attached.tunnels += 1
        try:
            tunnel = await self._dial(server_id, attached)
            try:
                return await self.exchange(tunnel, RelayRequest(method="GET", path=path, query=query), b"")
            finally:
                tunnel.done.set()
        except web.HTTPException as error:
            raise ConnectionError(error.text) from None
        finally:
            attached.tunnels -= 1

    async def _pump_client(self, request: web.Request, upstream: relay.Socket) -> web.StreamResponse:
        client = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes)
        await client.prepare(request)
        await relay.pump(client, upstream)
        return client


def _response(reply: RelayReply, body: bytes) -> web.Response:
    return web.Response(status=reply.status, body=body, headers=reply.headers)

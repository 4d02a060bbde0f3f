"""The relay: servers that nobody can connect to, and clients that reach only one public address.

A swarm's route map can relay (``routemap_service --relay``). Everything then goes through its
one address:

- **A server behind NAT** (``llmswarm serve --join URL --relay``) dials out: it keeps a control
  WebSocket open to the route map (``/v1/relay/attach``, signed with the server's key, see
  :func:`attach_header`) and is listed at ``<route map>/relay/<id>``. For each connection
  that reaches that address, the route map asks the server over the control socket to dial
  one more WebSocket (``/v1/relay/accept?token=...``, a one-use token); the server carries the
  request to itself over it and sends back the reply, or, for a WebSocket, pumps messages
  both ways until either side closes. One dialled connection per relayed connection keeps
  sessions apart: a slow session holds up no other (as Petals' circuit relays, one stream each).
- **A client outside the cluster** (``ClientConfig(relay=True)``) sends everything to
  ``<route map>/relay/<id>/...`` for every server; the route map forwards a request for a
  server it can reach itself (a server in the cluster) straight to its listed address, and
  one for an attached server through that server's tunnel.

The relay is a pipe, not a gate: the client's ``Authorization`` goes through to the server,
which checks it as it checks any request; the route map checks only that the caller may use
the swarm at all. What crosses a tunnel is this module's two small JSON envelopes
(:class:`RelayRequest`, :class:`RelayReply`), each followed by a body as one binary message,
then the WebSocket's own messages; nothing is pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Annotated, Literal

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from llmswarm_core.identity import IdentityError, ServerIdentity, verify
from llmswarm_core.routemap_client import read_limited

RELAY_PREFIX = "/relay/"  # <route map>/relay/<server id>/<the server's own path>
ATTACH_PATH = "/v1/relay/attach"
ACCEPT_PATH = "/v1/relay/accept"
ATTACH_HEADER = "X-Llmswarm-Attach"
ATTACH_WINDOW = 300.0  # seconds a signed attach stays valid (clocks may differ by this much)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # largest relayed body or WebSocket message (the client's default)
REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept")  # what a relayed request carries to the server
REPLY_HEADERS = ("Content-Type", "Retry-After", "WWW-Authenticate")  # and what its reply carries back
_PATH = r"^/[A-Za-z0-9/_.\-]{0,255}$"


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelayRequest(_Envelope):
    """The first message on a tunnel: the request to carry to the server (its body follows, one binary message)."""

    method: Literal["GET", "POST", "DELETE"]
    path: Annotated[str, Field(pattern=_PATH)]
    query: Annotated[str, Field(max_length=4096)] = ""
    headers: Annotated[dict[str, Annotated[str, Field(max_length=8192)]], Field(max_length=len(REQUEST_HEADERS))] = {}
    websocket: bool = False


class RelayReply(_Envelope):
    """The server's answer on a tunnel: 101 once a relayed WebSocket is open, else a reply whose body follows."""

    status: Annotated[int, Field(ge=100, le=599)]
    headers: Annotated[dict[str, Annotated[str, Field(max_length=8192)]], Field(max_length=len(REPLY_HEADERS))] = {}


class RelayOpen(_Envelope):
    """From the route map to an attached server, on its control socket: dial a tunnel with this token."""

    token: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{32,64}$")]


class RelayAttached(_Envelope):
    """The route map's first message on a control socket: the address the server is listed at."""

    url: Annotated[str, Field(max_length=2048)]


def relay_url(base: str, server_id: str) -> str:
    """Where the relay at `base` (a route map) serves server `server_id`."""
    return f"{base.rstrip('/')}{RELAY_PREFIX}{server_id}"


def pick_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


def attach_header(identity: ServerIdentity, server_id: str, now: float) -> str:
    """``<id> <public key> <unix time>.<signature of {"attach": id, "at": time}>``: only the key of `server_id`
    can attach as it (and so receive what clients send to it)."""
    at = int(now)
    return f"{server_id} {identity.public_key} {at}.{identity.sign({'attach': server_id, 'at': at})}"


def check_attach(header: str, now: float) -> tuple[str, str]:
    """The (server id, public key) of a signed attach from the last ATTACH_WINDOW seconds; IdentityError otherwise.
    Whether that key may speak for that id is the route map's IdentityBook's to say."""
    parts = header.split(" ")
    if len(parts) != 3 or not 0 < len(parts[0]) <= 256 or len(parts[1]) != 43:
        raise IdentityError(f"{ATTACH_HEADER} is '<server id> <public key> <time>.<signature>'")
    server_id, public_key, signed = parts
    at_text, _, signature = signed.partition(".")
    if not at_text.isdecimal() or len(at_text) > 12 or abs(now - int(at_text)) > ATTACH_WINDOW:
        raise IdentityError("no signed attach of the last minutes")
    verify(public_key, {"attach": server_id, "at": int(at_text)}, signature)
    return server_id, public_key


def _target(base: str, request: RelayRequest, websocket: bool = False) -> URL:
    url = base.rstrip("/") + request.path
    if websocket:
        url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    return URL(url + (f"?{request.query}" if request.query else ""), encoded=True)


async def perform(http: aiohttp.ClientSession, base: str, request: RelayRequest, body: bytes,
                  limit: int = MAX_MESSAGE_BYTES) -> tuple[RelayReply, bytes]:
    """Carry an HTTP request to the server at `base`: its reply, a body over `limit` answered 502."""
    try:
        async with http.request(request.method, _target(base, request), data=body or None,
                                headers=request.headers) as response:
            data = await read_limited(response.content, limit)
            if data is None:
                return failure(502, f"the server's reply is larger than the relay's {limit} bytes")
            return RelayReply(status=response.status, headers=pick_headers(response.headers, REPLY_HEADERS)), data
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        return failure(502, f"the relay cannot reach the server: {error or type(error).__name__}")


async def open_websocket(http: aiohttp.ClientSession, base: str, request: RelayRequest,
                         limit: int = MAX_MESSAGE_BYTES) -> aiohttp.ClientWebSocketResponse | tuple[RelayReply, bytes]:
    """Open the relayed WebSocket at the server at `base`; where it refuses (or cannot be reached), its answer."""
    try:
        return await http.ws_connect(_target(base, request, websocket=True), headers=request.headers,
                                     max_msg_size=limit, autoping=True, heartbeat=None)
    except aiohttp.WSServerHandshakeError as error:
        reply = RelayReply(status=error.status if error.status >= 400 else 502,
                           headers=pick_headers(error.headers or {}, REPLY_HEADERS))
        return reply, json.dumps({"error": f"the server refused the WebSocket: HTTP {error.status}"}).encode()
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        return failure(502, f"the relay cannot reach the server: {error or type(error).__name__}")


def failure(status: int, message: str) -> tuple[RelayReply, bytes]:
    return RelayReply(status=status, headers={"Content-Type": "application/json"}), json.dumps({"error": message}).encode()


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def pump(one: Socket, other: Socket) -> None:
    """Carry messages both ways until either side closes or breaks; then close both."""
    async def carry(source: Socket, sink: Socket) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            else:
                return

    tasks = [asyncio.create_task(carry(one, other)), asyncio.create_task(carry(other, one))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for socket_ in (one, other):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket_.close(), 5.0)


async def receive_envelope(socket_: Socket, kind: type[_Envelope], timeout: float) -> _Envelope:
    """The next message as a `kind` envelope (text JSON); ValueError where it is anything else."""
    message = await socket_.receive(timeout)
    if message.type != aiohttp.WSMsgType.TEXT:
        raise ValueError(f"expected a {kind.__name__} envelope, got a {message.type.name} message")
    return kind.model_validate_json(message.data)


async def receive_body(socket_: Socket, timeout: float) -> bytes:
    """The next message as a body (one binary message); ValueError where it is anything else."""
    message = await socket_.receive(timeout)
    if message.type != aiohttp.WSMsgType.BINARY:
        raise ValueError(f"expected a body, got a {message.type.name} message")
    return bytes(message.data)

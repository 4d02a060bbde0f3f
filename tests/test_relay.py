"""The route map's relay (llmswarm_core/relay.py, relay_hub.py, relay_agent.py), with a small server app.

A server behind NAT attaches and serves HTTP requests and WebSockets through its tunnels; a server the route map
reaches itself is forwarded to at its listed address; and the relay refuses what it must (another key attaching as
an id, a forged or missing signature, a credential without join, an unknown tunnel token, a server not in the swarm,
an oversized body, the relay's own limits), counting each while it goes on serving. The real model through the
relay, across hosts, is tests/hosts/test_outside_server.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from llmswarm.transport import Connection, ConnectionClosed
from llmswarm_control.relay_hub import RelayLimits
from llmswarm_control.routemap_service import RelayOptions, RouteMapService
from llmswarm_control.server_identities import IdentityBook
from llmswarm_core import relay
from llmswarm_core.credentials import Authority
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import Announcement, ModelInfo, ServerRecord
from llmswarm_core.security import client_ssl_context, server_ssl_context
from llmswarm_node.relay_agent import RelayAgent
from tests.helpers import metric_total, serving
from tests.test_security import make_cert

MODEL = ModelInfo(name="tiny", num_blocks=4, hidden_size=8)
AUTHORITY = Authority(ServerIdentity.generate())
JOIN = AUTHORITY.issue("volunteer", ["use", "join"])
USE = AUTHORITY.issue("laptop", ["use"])


def small_server() -> web.Application:
    """Echo routes standing in for a block server: HTTP (with the caller's credential and a refusal) and a WebSocket."""
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body[::-1], content_type="application/octet-stream",
                            headers={"X-Not-Relayed": "1"})

    async def whoami(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {USE}":
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.json_response({"query": request.query_string})

    async def session(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(message.data * 2)
            elif message.data == "close":
                await socket_.close()
        return socket_

    app = web.Application(client_max_size=1 << 24)
    app.router.add_post("/v1/forward", echo)
    app.router.add_get("/info", whoami)
    app.router.add_get("/v1/session", session)
    return app


@pytest.fixture
async def route_map() -> AsyncIterator[tuple[str, RouteMapService]]:
    service = RouteMapService.announcements(MODEL, authority_key=AUTHORITY.public_key,
                                            identities=IdentityBook(require_signatures=False, check_addresses=False),
                                            relay=RelayOptions(limits=RelayLimits(max_message_bytes=1 << 20,
                                                                                  max_tunnels_per_server=2)))
    async with serving(service.app()) as url:
        yield url, service


@pytest.fixture
async def attached(route_map: tuple[str, RouteMapService]) -> AsyncIterator[tuple[str, RouteMapService, RelayAgent]]:
    """The small server on 127.0.0.1, attached to the relay as `volunteer-1` (and reached only through it here)."""
    url, service = route_map
    async with serving(small_server()) as local:
        agent = RelayAgent(url, "volunteer-1", ServerIdentity.generate(), JOIN, None, local)
        listed = await asyncio.wait_for(agent.start(), 10)
        assert listed == f"{url}/relay/volunteer-1"
        try:
            yield url, service, agent
        finally:
            await agent.close()


async def test_http_requests_reach_an_attached_server_through_its_tunnel(attached) -> None:
    url, service, _ = attached
    headers = {"Authorization": f"Bearer {USE}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        body = bytes(range(256)) * 1000
        async with http.post(f"{url}/relay/volunteer-1/v1/forward", data=body,
                             headers={"Content-Type": "application/octet-stream"}) as response:
            assert response.status == 200
            assert await response.read() == body[::-1]
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert "X-Not-Relayed" not in response.headers  # only the reply headers the relay carries
        async with http.get(f"{url}/relay/volunteer-1/info?a=1&b=%20") as response:
            assert await response.json() == {"query": "a=1&b= "}  # the caller's credential and query went through
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {JOIN}"}) as http:
        async with http.get(f"{url}/relay/volunteer-1/info") as response:  # the server's own check: another credential
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    metrics = service.registry
    assert metrics.get_sample_value("llmswarm_relay_requests_total", {"via": "tunnel", "kind": "http"}) == 3
    assert metrics.get_sample_value("llmswarm_relay_attached_servers") == 1


async def test_a_websocket_goes_both_ways_through_the_tunnel_and_closes_on_either_side(attached) -> None:
    url, _, _ = attached
    ws_url = url.replace("http://", "ws://") + "/relay/volunteer-1/v1/session"
    connection = await asyncio.to_thread(Connection, ws_url, open_timeout=10, max_size=1 << 20,
                                         headers={"Authorization": f"Bearer {USE}"})
    try:
        for size in (1, 1000, 300_000):
            connection.send(b"x" * size)
            assert await asyncio.to_thread(connection.recv, 10) == b"x" * (2 * size)
        # The server closes: the client sees the close frame as a closed connection (not a protocol error), while
        # the relay still waits for the client's side of the closing handshake.
        connection._protocol.send_text(b"close")
        connection._flush()
        with pytest.raises(ConnectionClosed):
            await asyncio.to_thread(connection.recv, 10)
    finally:
        connection.close()


async def test_a_server_the_route_map_reaches_is_forwarded_to_at_its_listed_address(route_map) -> None:
    url, service = route_map
    async with serving(small_server()) as local:
        record = ServerRecord(id="cluster-0", url=local, start=0, end=4, throughput=10.0, state="online")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {JOIN}"}) as http:
            async with http.post(f"{url}/v1/servers", json=Announcement(model=MODEL, server=record).model_dump()) as r:
                assert r.status == 200, await r.text()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {USE}"}) as http:
            async with http.post(f"{url}/relay/cluster-0/v1/forward", data=b"abc") as response:
                assert await response.read() == b"cba"
            async with http.ws_connect(f"{url}/relay/cluster-0/v1/session") as socket_:
                await socket_.send_bytes(b"hi")
                assert (await socket_.receive(10)).data == b"hihi"
            async with http.get(f"{url}/relay/nobody/info") as response:
                assert response.status == 404
    # A server whose address has not answered as it (joining) is not forwarded to: nobody reaches an address
    # through the relay by announcing it.
    async with serving(small_server()) as local:
        record = ServerRecord(id="unproven-0", url=local, start=0, end=4, throughput=10.0, state="joining")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {JOIN}"}) as http:
            async with http.post(f"{url}/v1/servers", json=Announcement(model=MODEL, server=record).model_dump()) as r:
                assert r.status == 200, await r.text()
            async with http.post(f"{url}/relay/unproven-0/v1/forward", data=b"abc") as response:
                assert response.status == 404
    assert service.registry.get_sample_value("llmswarm_relay_requests_total", {"via": "direct", "kind": "websocket"}) == 1


async def test_the_relay_refuses_what_it_must_and_keeps_serving(attached) -> None:
    url, _, _ = attached
    other = ServerIdentity.generate()

    async def attach(identity: ServerIdentity, server_id: str, credential: str, at: float | None = None) -> int:
        header = relay.attach_header(identity, server_id, time.time() if at is None else at)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {credential}"}) as http:
            try:
                async with http.ws_connect(url + relay.ATTACH_PATH, headers={relay.ATTACH_HEADER: header}):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert await attach(other, "volunteer-1", JOIN) == 403  # another key as an attached id: a hijack
    assert await attach(other, "srv-notmine", JOIN) == 403  # an srv- id that is not the key's own
    assert await attach(other, "late-1", JOIN, at=time.time() - 3600) == 403  # an old signature
    assert await attach(other, "someone", USE) == 403  # a use credential cannot attach
    forged = relay.attach_header(other, "x-1", time.time()).replace("x-1", "y-1", 1)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {JOIN}"}) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url + relay.ATTACH_PATH, headers={relay.ATTACH_HEADER: forged})
        assert refused.value.status == 403
        async with http.get(url + relay.ACCEPT_PATH, params={"token": "a" * 32}) as response:
            assert response.status == 404  # no relayed connection waits for it
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/relay/volunteer-1/v1/forward", data=b"x") as response:
            assert response.status == 401  # the route map checks that the caller may use the swarm at all
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {USE}"}) as http:
        async with http.post(f"{url}/relay/volunteer-1/v1/forward", data=b"x" * ((1 << 20) + 1)) as response:
            assert response.status == 413
        async with http.get(f"{url}/relay/volunteer-1/../v1/admin") as response:
            assert response.status in (400, 404)
        # Two tunnels at most to one server here: a third WebSocket waits for none, it is refused with a retry time.
        sockets = [await http.ws_connect(f"{url}/relay/volunteer-1/v1/session") for _ in range(2)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as busy:
            await http.ws_connect(f"{url}/relay/volunteer-1/v1/session")
        assert busy.value.status == 503
        for socket_ in sockets:
            await socket_.close()
        await asyncio.sleep(0.2)
        async with http.post(f"{url}/relay/volunteer-1/v1/forward", data=b"still") as response:
            assert await response.read() == b"llits"
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    assert metric_total(text, "llmswarm_routemap_refusals_total", reason="hijack") == 2
    assert metric_total(text, "llmswarm_routemap_refusals_total", reason="signature") == 2
    assert metric_total(text, "llmswarm_routemap_refusals_total", reason="role") >= 1


async def test_the_relay_over_tls_carries_a_session_and_a_request(tmp_path) -> None:
    """The public address over HTTPS: the server behind NAT attaches over wss and verifies the route map, and an
    outside client's WebSocket and request go through wss/https end to end."""
    cert, key = make_cert(tmp_path, "127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    service = RouteMapService.announcements(MODEL, token="s3cret", tls_ca=cert, relay=RelayOptions(),
                                            identities=IdentityBook(require_signatures=False, check_addresses=False))
    runner = web.AppRunner(service.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(cert, key)).start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with serving(small_server()) as local:
            agent = RelayAgent(url, "volunteer-1", ServerIdentity.generate(), "s3cret", cert, local)
            assert await asyncio.wait_for(agent.start(), 10) == f"{url}/relay/volunteer-1"
            try:
                connector = aiohttp.TCPConnector(ssl=client_ssl_context(cert))
                async with aiohttp.ClientSession(connector=connector, headers={"Authorization": "Bearer s3cret"}) as http:
                    async with http.post(f"{url}/relay/volunteer-1/v1/forward", data=b"tls") as response:
                        assert await response.read() == b"slt"
                    async with http.ws_connect(f"{url.replace('https', 'wss')}/relay/volunteer-1/v1/session") as socket_:
                        await socket_.send_bytes(b"ab")
                        assert (await socket_.receive(10)).data == b"abab"
                # A client that does not trust the route map's certificate gets nowhere.
                async with aiohttp.ClientSession() as http:
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await http.post(f"{url}/relay/volunteer-1/v1/forward", data=b"x")
            finally:
                await agent.close()
    finally:
        await runner.cleanup()

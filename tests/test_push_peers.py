"""The pusher's own rules, against throwaway aiohttp apps: which URLs it pushes to, and what it does when a peer is down."""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from llmswarm_core.routemap import RouteMap, ServerRecord
from llmswarm_core.routemap_client import RouteMapClient
from llmswarm_node import push as push_module
from llmswarm_node.push import DOWN_SECONDS, PeerDirectory, Pusher
from tests.helpers import serving


def route_map_app(urls: list[str], reads: list[int]) -> web.Application:
    async def routes(request: web.Request) -> web.Response:
        reads.append(1)
        servers = [ServerRecord(id=f"s{i}", url=url, start=0, end=1, state="online") for i, url in enumerate(urls)]
        return web.json_response(RouteMap(model=None, version=1, servers=servers).model_dump(mode="json"))

    app = web.Application()
    app.router.add_get("/v1/routes", routes)
    return app


def peer_app(received: list[bytes], headers: list[str | None]) -> web.Application:
    async def push(request: web.Request) -> web.WebSocketResponse:
        headers.append(request.headers.get("Authorization"))
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            received.append(message.data)
        return socket_

    app = web.Application()
    app.router.add_get("/v1/push", push)
    return app


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def eventually(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_pushes_go_only_to_listed_servers_with_the_swarm_token(monkeypatch):
    monkeypatch.setattr(push_module, "REFRESH_SECONDS", 60.0)  # "not re-read" holds however slow the machine
    received: list[bytes] = []
    headers: list[str | None] = []
    reads: list[int] = []
    async with serving(peer_app(received, headers)) as peer, serving(route_map_app([], reads)) as empty_map, \
            RouteMapClient(empty_map) as routes:
        pusher = Pusher(PeerDirectory(routes), token="secret", tls_ca=None)
        try:
            assert not await pusher.push(peer, b"frame")  # the route map does not list it
            assert not await pusher.push(peer, b"frame")  # asked again within REFRESH_SECONDS: not re-read
            await pusher.peers.settled()  # the route map is read in the background, never on a push's path
            assert len(reads) == 1 and received == []
        finally:
            await pusher.close()
        async with serving(route_map_app([peer], reads)) as route_map, RouteMapClient(route_map) as routes:
            pusher = Pusher(PeerDirectory(routes), token="secret", tls_ca=None)
            try:
                assert await pusher.peers.known(peer)  # the map read (a server keeps it fresh: keep_fresh)
                assert await pusher.push(peer, b"one") and await pusher.push(peer, b"two")
                await eventually(lambda: len(received) == 2)
                assert received == [b"one", b"two"]
                assert headers == ["Bearer secret"]  # one kept-open connection, with the token
            finally:
                await pusher.close()


async def test_a_peer_that_cannot_be_reached_is_skipped_for_a_while():
    reads: list[int] = []
    down = f"http://127.0.0.1:{closed_port()}"
    async with serving(route_map_app([down], reads)) as route_map, RouteMapClient(route_map) as routes:
        pusher = Pusher(PeerDirectory(routes), token=None, tls_ca=None)
        try:
            assert await pusher.peers.known(down)
            assert not await pusher.push(down, b"frame")
            assert pusher._down[down] > time.monotonic() + DOWN_SECONDS - 5  # not tried again for DOWN_SECONDS
            reads_before = len(reads)
            assert not await pusher.push(down, b"frame")
            assert len(reads) == reads_before  # skipped before even looking it up
        finally:
            await pusher.close()


def test_without_a_route_map_nothing_is_pushed():
    async def run() -> bool:
        pusher = Pusher(PeerDirectory(None), token=None, tls_ca=None)
        try:
            return await pusher.push("http://127.0.0.1:1", b"frame")
        finally:
            await pusher.close()

    assert asyncio.run(run()) is False

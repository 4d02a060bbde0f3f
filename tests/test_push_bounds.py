"""The push path cannot hang (issue #19, item 5): a peer that accepts the push WebSocket and never reads, one that
never answers the handshake, and a route map that never answers each cost a step at most --push-timeout, and the
client is told ``pushed: false`` (it then sends the step on itself); nothing on a step's reply waits for the route map."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from websockets.sync.client import connect

from llmswarm_core import wire
from llmswarm_core.routemap_client import RouteMapClient
from llmswarm_node import announcer as announcer_module
from llmswarm_node.push import PeerDirectory, Pusher
from llmswarm_node.span import SpanModel
from tests.bounds_harness import DeafPeer, FakeRouteMap, running
from tests.reference import LocalSpan

HIDDEN = 576
EXACT = dict(rtol=1e-5, atol=1e-5)
BIG_FRAME = bytes(32 * 1024**2)  # more than any socket buffers between two processes on one machine


@pytest.fixture
def deaf():
    peer = DeafPeer()
    yield peer
    peer.close()


async def bounded(push, seconds: float = 60.0) -> bool:
    """The push's outcome; fails the test where it takes longer than `seconds` (it hangs)."""
    return await asyncio.wait_for(push, seconds)


async def test_a_peer_that_never_reads_costs_a_push_its_timeout(deaf):
    route_map = FakeRouteMap([deaf.url])
    try:
        async with RouteMapClient(route_map.url, timeout=30) as routes:
            pusher = Pusher(PeerDirectory(routes), token=None, tls_ca=None, timeout=1.0)
            try:
                assert await pusher.peers.known(deaf.url)
                began = time.monotonic()
                assert not await bounded(pusher.push(deaf.url, BIG_FRAME))
                assert deaf.accepted, "the push never reached the peer"
                assert not await bounded(pusher.push(deaf.url, b"frame"))  # not tried again for a while
                assert time.monotonic() - began < 30
            finally:
                await bounded(pusher.close())
    finally:
        route_map.close()


async def test_a_peer_that_never_answers_the_handshake_costs_a_push_its_timeout():
    silent = DeafPeer(answer=False)
    route_map = FakeRouteMap([silent.url])
    try:
        async with RouteMapClient(route_map.url, timeout=30) as routes:
            pusher = Pusher(PeerDirectory(routes), token=None, tls_ca=None, timeout=1.0)
            try:
                assert await pusher.peers.known(silent.url)
                assert not await bounded(pusher.push(silent.url, b"frame"))
                assert silent.accepted
            finally:
                await bounded(pusher.close())
    finally:
        silent.close()
        route_map.close()


async def test_a_hung_route_map_is_never_waited_for_on_a_push():
    route_map = FakeRouteMap([], hang=True)
    try:
        async with RouteMapClient(route_map.url, timeout=600) as routes:
            directory = PeerDirectory(routes)
            pusher = Pusher(directory, token=None, tls_ca=None, timeout=1.0)
            try:
                assert not await bounded(pusher.push("http://127.0.0.1:9", b"frame"), 30)
                assert not await bounded(pusher.push("http://127.0.0.1:9", b"frame"), 30)
                for _ in range(100):
                    if route_map.reads:
                        break
                    await asyncio.sleep(0.1)
                assert route_map.reads == 1  # read in the background, once
            finally:
                route_map.released.set()
                await bounded(pusher.close())
    finally:
        route_map.close()


# ---- through a server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 2, progress=False)


def step_with_push(url: str, target: dict, hidden: torch.Tensor) -> wire.Frame:
    with connect(url.replace("http://", "ws://") + "/v1/session", compression=None, max_size=None) as sock:
        sock.send(wire.encode({"kind": "open", "start": 0, "end": 2, "max_length": 8192}))
        session = wire.decode(sock.recv(timeout=60)).header["session"]
        sock.send(wire.encode({"kind": "step", "session": session, "request_id": 3, "push": target}, {"hidden": hidden}))
        return wire.decode(sock.recv(timeout=60))


def push_target(url: str) -> dict:
    return {"url": url, "session": 1, "key": "k" * 32, "request_id": 1, "position": 0}


def test_a_step_pushed_to_a_peer_that_never_reads_is_answered_pushed_false(span, local_smollm2, deaf):
    route_map = FakeRouteMap([deaf.url])
    hidden = torch.randn(1, 7000, HIDDEN)  # 16 MB to push: more than the socket buffers between them take
    try:
        with running(span, swarm=route_map.url, push_timeout=1.0) as (url, _):
            while not route_map.reads:  # the server has read the map (its directory lists the peer)
                time.sleep(0.1)
            time.sleep(1.0)
            reply = step_with_push(url, push_target(deaf.url), hidden)
            assert reply.kind == "output", reply.header
            assert reply.header["pushed"] is False and reply.header["request_id"] == 3
            assert deaf.accepted, "the server never tried the peer"
            torch.testing.assert_close(reply.tensors["hidden"], LocalSpan(local_smollm2, 0, 2).forward(hidden), **EXACT)
    finally:
        route_map.close()


def test_a_step_is_answered_while_the_route_map_hangs(span, local_smollm2, monkeypatch):
    monkeypatch.setattr(announcer_module, "HEARTBEAT_TIMEOUT", 600.0)  # the route map's reads would wait this long
    route_map = FakeRouteMap([], hang=True)
    hidden = torch.randn(1, 3, HIDDEN)
    try:
        with running(span, swarm=route_map.url, push_timeout=1.0) as (url, _):
            reply = step_with_push(url, push_target("http://127.0.0.1:9"), hidden)
            assert reply.kind == "output" and reply.header["pushed"] is False
            torch.testing.assert_close(reply.tensors["hidden"], LocalSpan(local_smollm2, 0, 2).forward(hidden), **EXACT)
            route_map.released.set()
    finally:
        route_map.close()

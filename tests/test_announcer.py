"""The announcer (announcer.py) against throwaway route maps: heartbeats, the drain announcement, leaving,
and the push peers read through the same client; a route map that hangs costs the way out a bounded time."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord
from llmswarm_node import announcer as announcer_module
from llmswarm_node.announcer import Announcer
from tests.helpers import serving

MODEL = ModelInfo(name="tiny", num_blocks=4, hidden_size=8)


def record(state: str = "online") -> ServerRecord:
    return ServerRecord(id="s1", url="http://127.0.0.1:9", start=0, end=2, state=state)


def route_map_app(seen: list[tuple[str, object]], delay: float = 0.0) -> web.Application:
    async def announce(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        seen.append(("announce", (await request.json())["server"]["state"]))
        return web.json_response({})

    async def leave(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        seen.append(("leave", request.match_info["id"]))
        return web.json_response({})

    async def routes(request: web.Request) -> web.Response:
        seen.append(("routes", request.headers.get("Authorization")))
        return web.json_response(RouteMap(model=MODEL, version=1, servers=[record()]).model_dump(mode="json"))

    app = web.Application()
    app.router.add_post("/v1/servers", announce)
    app.router.add_delete("/v1/servers/{id}", leave)
    app.router.add_get("/v1/routes", routes)
    return app


async def eventually(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_heartbeat_drain_and_leave_go_to_the_route_map():
    seen: list[tuple[str, object]] = []
    state = {"now": "online"}
    async with serving(route_map_app(seen)) as url:
        announcer = Announcer(url, "secret", None, "s1", MODEL, lambda: record(state["now"]))
        try:
            announcer.start_heartbeat()
            await eventually(lambda: ("announce", "online") in seen)
            state["now"] = "draining"
            await announcer.announce_draining()
            assert seen[-1] == ("announce", "draining")
            assert await announcer.peers().known("http://127.0.0.1:9")
            assert ("routes", "Bearer secret") in seen  # the peers are read with the same client, token and all
            await announcer.leave()
            assert seen[-1] == ("leave", "s1")
            count = len(seen)
            await asyncio.sleep(announcer_module.HEARTBEAT_SECONDS + 0.5)
            assert len(seen) == count  # no heartbeat after leaving
        finally:
            await announcer.close()


async def test_a_hung_route_map_costs_the_way_out_at_most_the_farewell_timeout(monkeypatch):
    monkeypatch.setattr(announcer_module, "FAREWELL_TIMEOUT", 0.3)
    seen: list[tuple[str, object]] = []
    async with serving(route_map_app(seen, delay=60.0)) as url:
        announcer = Announcer(url, None, None, "s1", MODEL, record)
        try:
            began = time.monotonic()
            await announcer.announce_draining()
            await announcer.leave()
            # Two farewells of 0.3 s against a route map that answers after a minute: far below either.
            assert time.monotonic() - began < 20.0
        finally:
            await announcer.close()


async def test_without_a_route_map_nothing_is_announced_and_no_peer_is_known():
    announcer = Announcer(None, None, None, "s1", MODEL, record)
    announcer.start_heartbeat()
    await announcer.announce_draining()
    await announcer.leave()
    assert announcer.route_map() is None
    assert not await announcer.peers().known("http://127.0.0.1:9")
    await announcer.close()

"""Server identities at the route map: signed announcements, ids that belong to keys, addresses that prove themselves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from llmswarm_control.routemap_service import RouteMapService
from llmswarm_control.server_identities import IdentityBook
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import Announcement, IdentityProof, ModelInfo, RouteMap, ServerRecord
from llmswarm_core.routemap_client import LEAVE_HEADER, leave_header
from tests.helpers import metric_total, serving
from tests.operator.test_routemap_service import serving as serving_service

MODEL = ModelInfo(name="SmolLM2-135M-Instruct", num_blocks=30, hidden_size=576)


def announcement(identity: ServerIdentity | None, server_id: str, url: str, state: str = "online") -> Announcement:
    plain = Announcement(model=MODEL, server=ServerRecord(id=server_id, url=url, start=0, end=15, state=state), ttl=30)  # type: ignore[arg-type]
    return plain.signed(identity) if identity is not None else plain


def identity_app(identity: ServerIdentity, server_id: str, url_box: list[str], answer_as: str | None = None) -> web.Application:
    """What a block server answers at /v1/identity (answer_as: lie about the id)."""
    async def prove(request: web.Request) -> web.Response:
        proof = IdentityProof.answer(identity, answer_as or server_id, request.query["challenge"], url_box[0])
        return web.json_response(proof.model_dump())

    app = web.Application()
    app.router.add_get("/v1/identity", prove)
    return app


@pytest.fixture
async def route_map() -> AsyncIterator[tuple[str, RouteMapService]]:
    service = RouteMapService.announcements(MODEL, interval=0.05)
    service.identities = IdentityBook(require_signatures=True, check_addresses=True)
    async with serving_service(service) as url:
        yield url, service


async def post(http: aiohttp.ClientSession, url: str, body: Announcement) -> tuple[int, dict[str, object]]:
    async with http.post(f"{url}/v1/servers", json=body.model_dump(mode="json")) as response:
        return response.status, await response.json()


async def routes(http: aiohttp.ClientSession, url: str) -> RouteMap:
    async with http.get(f"{url}/v1/routes") as response:
        return RouteMap.model_validate(await response.json())


async def until_online(http: aiohttp.ClientSession, url: str, server_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s.id == server_id and s.state == "online" for s in (await routes(http, url)).servers):
        assert time.monotonic() < deadline, f"{server_id} never became online"
        await asyncio.sleep(0.1)


async def test_a_server_is_online_only_after_its_address_answered_as_it(route_map) -> None:
    url, _ = route_map
    identity = ServerIdentity.generate()
    box = [""]
    async with serving(identity_app(identity, identity.server_id, box)) as server_url, aiohttp.ClientSession() as http:
        box[0] = server_url
        status, _ = await post(http, url, announcement(identity, identity.server_id, server_url))
        assert status == 200
        # Listed at once, but as joining: its address has not answered the challenge yet (or just did).
        await until_online(http, url, identity.server_id)


async def test_refusals_hijacks_unsigned_and_foreign_addresses(route_map) -> None:
    url, _ = route_map
    owner, thief = ServerIdentity.generate(), ServerIdentity.generate()
    box = [""]
    async with serving(identity_app(owner, "local-0", box)) as owner_url, aiohttp.ClientSession() as http:
        box[0] = owner_url
        assert (await post(http, url, announcement(owner, "local-0", owner_url)))[0] == 200
        await until_online(http, url, "local-0")
        refused = {
            "unsigned": announcement(None, "local-0", "http://203.0.113.9:1"),
            "hijack": announcement(thief, "local-0", "http://203.0.113.9:1"),  # the name belongs to owner's key
        }
        derived = announcement(thief, owner.server_id, "http://203.0.113.9:1")  # a srv- id that is not thief's
        tampered = announcement(owner, "local-0", owner_url).model_copy(
            update={"server": ServerRecord(id="local-0", url="http://203.0.113.9:1", start=0, end=15, state="online")})
        for reason, body in [*refused.items(), ("hijack", derived), ("signature", tampered)]:
            status, answer = await post(http, url, body)
            assert status == 403, (reason, answer)
        # An address that does not answer as the announcing server is never listed online.
        liar = ServerIdentity.generate()
        liar_box = [""]
        async with serving(identity_app(owner, liar.server_id, liar_box)) as liar_url:  # signs with another key
            liar_box[0] = liar_url
            assert (await post(http, url, announcement(liar, liar.server_id, liar_url)))[0] == 200
            await asyncio.sleep(1.0)
            states = {s.id: s.state for s in (await routes(http, url)).servers}
            assert states[liar.server_id] == "joining" and states["local-0"] == "online"
        # Leaving needs the server's own signature.
        async with http.delete(f"{url}/v1/servers/local-0") as response:
            assert response.status == 403
        signed_by_thief = {LEAVE_HEADER: leave_header(thief, "local-0", time.time())}
        async with http.delete(f"{url}/v1/servers/local-0", headers=signed_by_thief) as response:
            assert response.status == 403
        assert any(s.id == "local-0" for s in (await routes(http, url)).servers)
        signed_by_owner = {LEAVE_HEADER: leave_header(owner, "local-0", time.time())}
        async with http.delete(f"{url}/v1/servers/local-0", headers=signed_by_owner) as response:
            assert response.status == 200
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    for reason, count in (("unsigned", 1), ("hijack", 2), ("signature", 1), ("leave", 2)):
        assert metric_total(text, "llmswarm_routemap_refusals_total", reason=reason) == count, reason
    assert metric_total(text, "llmswarm_routemap_refusals_total", reason="address") >= 1

"""The route-map service over HTTP: the operator's file enriched by announcements (Kubernetes), and the same API
with announcements only (the local substrate)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmswarm_control.routemap_service import RouteMapService, main
from llmswarm_control.server_identities import IdentityBook
from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord
from tests.helpers import serving as serving_app

MODEL = ModelInfo(name="SmolLM2-135M-Instruct", num_blocks=30, hidden_size=576)


def record(server_id: str, start: int, end: int, state: str) -> ServerRecord:
    return ServerRecord(id=server_id, url=f"http://{server_id}:8701", start=start, end=end, state=state)  # type: ignore[arg-type]


def write(path: Path, version: int, *servers: ServerRecord) -> None:
    path.write_text(RouteMap(model=MODEL, version=version, servers=list(servers)).model_dump_json())


def serving(service: RouteMapService) -> contextlib.AbstractAsyncContextManager[str]:
    """Run the route-map service on a free port of 127.0.0.1; yields its base URL."""
    return serving_app(service.app())


def unchecked() -> IdentityBook:
    """A route map that takes unsigned announcements of addresses nobody checks (these tests' servers are names)."""
    return IdentityBook(require_signatures=False, check_addresses=False)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    path = tmp_path / "routes.json"
    write(path, 4, record("a", 0, 15, "online"), record("b", 15, 30, "joining"))
    async with serving(RouteMapService.from_record(path, interval=0.05, identities=unchecked())) as url:
        yield url, path


async def get_routes(http: aiohttp.ClientSession, url: str) -> RouteMap:
    async with http.get(f"{url}/v1/routes") as response:
        assert response.status == 200
        return RouteMap.model_validate(await response.json())


async def announce(http: aiohttp.ClientSession, url: str, server: ServerRecord, model: ModelInfo = MODEL) -> tuple[int, Any]:
    body = Announcement(model=model, server=server, ttl=30).model_dump()
    async with http.post(f"{url}/v1/servers", json=body) as response:
        return response.status, await response.json()


async def test_serves_the_file_and_merges_announcements(service: tuple[str, Path]) -> None:
    url, path = service
    async with aiohttp.ClientSession() as http:
        first = await get_routes(http, url)
        assert first.version == 4
        assert [(s.id, s.state) for s in first.servers] == [("a", "online"), ("b", "joining")]

        # b says it is online and measured its throughput: the map says so, with a new version.
        status, answer = await announce(http, url, record("b", 15, 30, "online").model_copy(update={"throughput": 12.5}))
        assert status == 200 and answer["listed"] is True
        second = await get_routes(http, url)
        assert {s.id: (s.state, s.throughput) for s in second.servers} == {"a": ("online", 0.0), "b": ("online", 12.5)}
        assert second.version == 5

        # A server the operator does not list is never published.
        status, answer = await announce(http, url, record("rogue", 0, 30, "online"))
        assert status == 200 and answer["listed"] is False
        assert "rogue" not in {s.id for s in (await get_routes(http, url)).servers}

        # Another model is refused.
        status, _ = await announce(http, url, record("a", 0, 15, "online"), ModelInfo(name="other", num_blocks=30, hidden_size=576))
        assert status == 409
        async with http.post(f"{url}/v1/servers", json={"server": "nonsense"}) as response:
            assert response.status == 400

        # The operator drains a: draining in the file wins over a's own "online".
        await announce(http, url, record("a", 0, 15, "online"))
        write(path, 6, record("a", 0, 15, "draining"), record("b", 15, 30, "online"))

        async def reloaded() -> RouteMap:
            routes = await get_routes(http, url)
            assert {s.id: s.state for s in routes.servers} == {"a": "draining", "b": "online"}
            return routes
        third = await eventually(reloaded)
        assert third.version >= 6

        # A broken file keeps the last good map.
        path.write_text("{not json")
        await asyncio.sleep(0.2)
        assert {s.id for s in (await get_routes(http, url)).servers} == {"a", "b"}
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert 'llmswarm_routemap_servers{state="draining"} 1.0' in text
        assert 'llmswarm_block_replicas{block="29"} 1.0' in text  # b; a is draining
        assert 'llmswarm_routemap_min_replicas 0.0' in text


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_token_is_required_when_set(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, 1, record("a", 0, 30, "online"))
    service = RouteMapService.from_record(path, "t0ken", interval=0.05, identities=unchecked())
    async with serving(service) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/routes") as response:
            assert response.status == 401
            assert await response.json() == {"error": "unauthorized"}
        async with http.get(f"{url}/v1/routes", headers={"Authorization": "Bearer t0ken"}) as response:
            assert response.status == 200
            assert RouteMap.model_validate(await response.json()).servers[0].id == "a"
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200 and "llmswarm_routemap_version" in await response.text()
        async with http.get(f"{url}/readyz") as response:
            assert response.status == 200  # probes stay open


# ---- one API in both modes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["record", "announcements"])
async def test_both_authorities_serve_the_same_api(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "routes.json"
    write(path, 1, record("a", 0, 15, "joining"), record("b", 15, 30, "joining"))
    service = (RouteMapService.from_record(path, interval=0.05, identities=unchecked()) if mode == "record"
               else RouteMapService.announcements(MODEL, interval=0.05, identities=unchecked()))
    async with serving(service) as url, aiohttp.ClientSession() as http:
        for server in (record("a", 0, 15, "online"), record("b", 15, 30, "online")):
            status, answer = await announce(http, url, server)
            assert status == 200 and answer["listed"] is True and answer["version"] >= 1
        routes = await get_routes(http, url)
        assert [(s.id, s.state) for s in routes.servers] == [("a", "online"), ("b", "online")]
        assert service.published == routes  # what other threads read in-process

        async with http.get(f"{url}/v1/targets") as response:
            assert response.status == 200
            assert await response.json() == [
                {"targets": [f"{sid}:8701"], "labels": {"__scheme__": "http", "__metrics_path__": "/metrics"}}
                for sid in ("a", "b")
            ]
        for probe in ("/healthz", "/readyz"):
            async with http.get(url + probe) as response:
                assert response.status == 200, probe
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert f"llmswarm_routemap_version {float(routes.version)}" in text
        assert 'llmswarm_routemap_servers{state="online"} 2.0' in text and "llmswarm_routemap_min_replicas 1.0" in text

        # Leaving: b's announcement is gone (in record mode b is the operator's "joining" again), a new version.
        async with http.delete(f"{url}/v1/servers/b") as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["removed"] is True and answer["version"] == routes.version + 1
        after = {s.id: s.state for s in (await get_routes(http, url)).servers}
        assert after == ({"a": "online", "b": "joining"} if mode == "record" else {"a": "online"})
        async with http.delete(f"{url}/v1/servers/b") as response:
            assert response.status == 404 and (await response.json())["removed"] is False
        async with http.post(f"{url}/v1/servers", json={"server": "nonsense"}) as response:
            assert response.status == 400 and "bad announcement" in (await response.json())["error"]


async def test_not_ready_until_the_record_is_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"  # the operator has not written its ConfigMap yet
    async with serving(RouteMapService.from_record(path, interval=0.05, identities=unchecked())) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as response:
            assert response.status == 503
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
        assert (await get_routes(http, url)).servers == []
        write(path, 3, record("a", 0, 30, "online"))

        async def ready() -> None:
            async with http.get(f"{url}/readyz") as response:
                assert response.status == 200
        await eventually(ready)
        assert (await get_routes(http, url)).version == 3


def test_command_line_needs_no_record(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--routes" in text and "announcements only" in text


@pytest.mark.parametrize("mode", ["record", "announcements"])
async def test_no_announcement_however_malformed_breaks_the_map_for_others(tmp_path: Path, mode: str) -> None:
    """Each refusal is a 4xx with its reason counted; /v1/routes keeps answering with the servers it had."""
    path = tmp_path / "routes.json"
    write(path, 1, record("a", 0, 15, "joining"))
    service = (RouteMapService.from_record(path, interval=0.05, identities=unchecked()) if mode == "record"
               else RouteMapService.announcements(MODEL, interval=0.05, identities=unchecked()))
    good = Announcement(model=MODEL, server=record("a", 0, 15, "online"), ttl=30).model_dump()
    server = good["server"]
    bad_bodies = {
        "span": {**good, "server": {**server, "start": 20, "end": 31}},  # past the model's last block
        "throughput": {**good, "server": {**server, "throughput": 1e300}},
        "invalid": {**good, "server": {**server, "url": "javascript:alert(1)"}},
    }
    async with serving(service) as url, aiohttp.ClientSession() as http:
        assert (await announce(http, url, record("a", 0, 15, "online")))[0] == 200
        before = await get_routes(http, url)
        for reason, body in bad_bodies.items():
            async with http.post(f"{url}/v1/servers", json=body) as response:
                assert response.status == 400, (reason, await response.text())
        for raw in ("NaN", "Infinity"):  # not JSON numbers, but Python's json would read them
            text = f'{{"model": {MODEL.model_dump_json()}, "server": {{"id": "a", "url": "http://a:1", "start": 0, "end": 15, ' \
                   f'"state": "online", "throughput": {raw}}}}}'
            async with http.post(f"{url}/v1/servers", data=text, headers={"Content-Type": "application/json"}) as response:
                assert response.status == 400, raw
        # A web page's form or text/plain POST (no CORS preflight) is refused before it is read.
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            async with http.post(f"{url}/v1/servers", data=Announcement.model_validate(good).model_dump_json(),
                                 headers={"Content-Type": content_type}) as response:
                assert response.status == 415, content_type
        other = ModelInfo(name="other", num_blocks=30, hidden_size=576)
        assert (await announce(http, url, record("z", 0, 15, "online"), model=other))[0] == 409
        after = await get_routes(http, url)
        assert after.servers == before.servers and after.version == before.version
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        for reason, count in (("span", 1), ("throughput", 3), ("invalid", 1), ("content_type", 2), ("model", 1)):
            assert f'llmswarm_routemap_refusals_total{{reason="{reason}"}} {float(count)}' in text, (reason, text)

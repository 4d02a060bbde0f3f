"""Outside servers (issue #16, open swarm): servers that joined a Swarm's route map on their own.

The pure parts first (which servers are outside, what they hold, the placement around them,
the status), then the route map's side (an open :class:`OperatorRecord` lists them), then the
operator end to end against the Kubernetes API emulator with a real route-map service: an
outside server holds blocks [0, 15) of 30, the operator fills only [15, 30); when the outside
server stops announcing, the operator covers the whole model again; when it comes back, the
operator's server for [0, 15) drains and goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
import yaml

from llmswarm_control.placement import Pool, place
from llmswarm_control.routemap_authority import OperatorRecord
from llmswarm_control.routemap_service import RouteMapService
from llmswarm_control.server_identities import IdentityBook
from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord
from llmswarm_core.spans import Span
from llmswarm_operator import manifests as m
from llmswarm_operator.outside import OutsideServer, coverage_of, named_like_ours, outside_servers
from llmswarm_operator.planner import ServerEntry, ServerPlan
from llmswarm_operator.reconcile import observe_outside, routemap_read_url
from llmswarm_operator.status import Seen, swarm_status
from llmswarm_operator.swarm_spec import model_shape, parse_spec, plan_placement
from tests.helpers import metric_total, serving
from tests.operator.cluster import CRD_FILE
from tests.operator.conftest import Cluster, eventually, operator_settings, settle, start_operator
from tests.operator.test_operator_emulator import apply_doc, route_history, status, wait_phase, wait_servers, writes

NAME = "open"
SWARM: dict[str, Any] = {
    "apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "metadata": {"name": NAME, "namespace": "default"},
    "spec": {
        "model": {"source": "smollm2"},
        "pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 1, "maxServers": 2, "blocksPerServer": 15}],
    },
}
SPEC = parse_spec(SWARM["spec"])
SHAPE = model_shape(SPEC.model)
MODEL = ModelInfo(name=SHAPE.name, num_blocks=SHAPE.num_blocks, hidden_size=SHAPE.hidden_size)
FIRST = m.server_name(NAME, "cpu", Span(0, 15), 0)
REST = m.server_name(NAME, "cpu", Span(15, 30), 0)
VOLUNTEER = "volunteer-1"


def record(server_id: str, start: int, end: int, state: str = "online") -> ServerRecord:
    return ServerRecord(id=server_id, url=f"http://{server_id}.example:8701", start=start, end=end, state=state)  # type: ignore[arg-type]


def unchecked() -> IdentityBook:
    """Unsigned announcements, addresses not challenged: these tests' servers are names, not processes."""
    return IdentityBook(require_signatures=False, check_addresses=False)


# ---- which servers are outside -----------------------------------------------------------------------------------


def test_outside_servers_are_the_ones_the_operator_did_not_make() -> None:
    gone = m.server_name(NAME, "cpu", Span(5, 20), 3)  # one of its own, deleted, still announcing
    routes = RouteMap(model=MODEL, version=3, servers=[
        record(REST, 15, 30), record("known", 0, 30), record(gone, 5, 20, "draining"),
        record(VOLUNTEER, 0, 15), record("late", 10, 20, "joining"),
        record(m.server_name("other", "cpu", Span(0, 15), 0), 0, 15),  # named like another Swarm's: outside here
    ])
    found = outside_servers(routes, MODEL, NAME, ["cpu"], own={REST, "known"})
    assert [(s.id, s.span, s.state) for s in found] == [
        (m.server_name("other", "cpu", Span(0, 15), 0), Span(0, 15), "online"),
        (VOLUNTEER, Span(0, 15), "online"),
        ("late", Span(10, 20), "joining"),
    ]
    # Only online ones hold blocks.
    assert coverage_of(30, found) == [2] * 15 + [0] * 15
    # A map of another model, or none yet, has nothing of this Swarm.
    assert outside_servers(routes, MODEL.model_copy(update={"num_blocks": 32}), NAME, ["cpu"], set()) == []
    assert outside_servers(RouteMap(model=None, version=0, servers=[]), MODEL, NAME, ["cpu"], set()) == []


def test_named_like_ours_is_exactly_the_operators_naming() -> None:
    assert named_like_ours(REST, NAME, ["gpu", "cpu"])
    assert not named_like_ours(REST, NAME, ["gpu"])  # another pool's key
    assert not named_like_ours(REST, "opens", ["cpu"])  # another Swarm's
    assert not named_like_ours(REST.replace("-15-30-", "-30-15-"), NAME, ["cpu"])  # not a span
    assert not named_like_ours("srv-abc", NAME, ["cpu"])


# ---- placement around them -----------------------------------------------------------------------------------------


def test_placement_fills_only_what_outside_servers_leave() -> None:
    pool = Pool("cpu", min_servers=1, max_servers=2, blocks_per_server=15)
    alone = place(30, [pool], 1)
    assert [s.span for s in alone.servers] == [Span(0, 15), Span(15, 30)]
    helped = place(30, [pool], 1, covered=[1] * 15 + [0] * 15)
    assert [s.span for s in helped.servers] == [Span(15, 30)]
    assert helped.feasible and helped.min_replicas == 1
    assert list(helped.coverage) == [0] * 15 + [1] * 15 and helped.total_coverage == [1] * 30
    # Free span lengths: one server just long enough for the rest, placed on it.
    free = place(30, [Pool("cpu", min_servers=1, max_servers=3)], 1, covered=[1] * 15 + [0] * 15)
    assert [s.span for s in free.servers] == [Span(15, 30)]


def test_redundancy_counts_outside_copies_block_by_block() -> None:
    pool = Pool("cpu", min_servers=1, max_servers=4, blocks_per_server=15)
    placed = place(30, [pool], 2, covered=[1] * 15 + [0] * 15)
    assert sorted((s.span.start, s.span.end) for s in placed.servers) == [(0, 15), (15, 30), (15, 30)]
    # Copies beyond the redundancy change nothing; a pool still runs its minServers.
    assert [s.span for s in place(30, [pool], 1, covered=[3] * 30).servers] == [Span(0, 15)]
    assert place(30, [Pool("cpu", min_servers=0, max_servers=2)], 1, covered=[1] * 30).servers == ()
    with pytest.raises(ValueError, match="30 blocks"):
        place(30, [pool], 1, covered=[1] * 29)


def test_too_small_pools_say_how_much_outside_servers_already_hold() -> None:
    placed = place(30, [Pool("cpu", min_servers=1, blocks_per_server=10)], 1, covered=[1] * 10 + [0] * 20)
    assert not placed.feasible and placed.short_blocks == list(range(20, 30))
    assert "servers already there hold 10 of the copies" in placed.message


def test_the_swarms_placement_takes_outside_coverage() -> None:
    _, _, placement = plan_placement(SPEC, [1] * 15 + [0] * 15)
    assert [s.name for s in m.desired_servers(NAME, placement)] == [REST]


# ---- status ------------------------------------------------------------------------------------------------------


def seen_with(outside: tuple[OutsideServer, ...]) -> Seen:
    _, _, placement = plan_placement(SPEC, coverage_of(30, outside))
    entries = [ServerEntry(REST, "cpu", Span(15, 30), True, "online", True)]
    online = [a + b for a, b in zip(coverage_of(30, outside), [0] * 15 + [1] * 15, strict=True)]
    return Seen(redundancy=1, placement=placement, plan=ServerPlan(entries=entries), online_coverage=online,
                routemap_version=4, routemap_url="http://x", routemap_configmap="open-routemap", outside=outside)


def test_status_lists_outside_servers_and_counts_them_in_coverage() -> None:
    volunteer = OutsideServer(VOLUNTEER, "http://v:8701", Span(0, 15), "online", 12.0)
    late = OutsideServer("late", "http://l:8701", Span(0, 30), "joining")
    current = swarm_status(seen_with((volunteer, late)), None)
    assert current["phase"] == "Ready"
    assert current["servers"] == [
        {"name": REST, "pool": "cpu", "start": 15, "end": 30, "ready": True, "state": "online", "desired": True,
         "outside": False},
        {"name": VOLUNTEER, "url": "http://v:8701", "start": 0, "end": 15, "ready": True, "state": "online",
         "desired": False, "outside": True},
        {"name": "late", "url": "http://l:8701", "start": 0, "end": 30, "ready": False, "state": "joining",
         "desired": False, "outside": True},
    ]
    assert (current["serversOutside"], current["serversDesired"], current["readyServers"]) == (2, 1, "1/1")
    assert current["coverage"]["minReplicas"] == 1 and current["coverage"]["uncoveredBlocks"] == []
    assert "2 outside server(s) (1 online)" in next(c for c in current["conditions"] if c["type"] == "Progressing")["message"]


def schema_paths(schema: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, node in (schema.get("properties") or {}).items():
        yield f"{prefix}{key}"
        yield from schema_paths(node, f"{prefix}{key}.")
        yield from schema_paths(node.get("items") or {}, f"{prefix}{key}[].")


def value_paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, node in value.items():
            yield f"{prefix}{key}"
            yield from value_paths(node, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from value_paths(item, prefix[:-1] + "[].")


def test_the_crd_keeps_every_status_field() -> None:
    """The API server prunes status fields its schema does not know: every one the operator writes is in it."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    volunteer = OutsideServer(VOLUNTEER, "http://v:8701", Span(0, 15), "online")
    written = set(value_paths(swarm_status(seen_with((volunteer,)), None)))
    assert {"servers[].outside", "servers[].url", "serversOutside"} <= written
    assert written - set(schema_paths(schema)) == set()


# ---- the route map lists them (an open OperatorRecord) ----------------------------------------------------------


def announcement(server: ServerRecord, ttl: float = 30.0) -> Announcement:
    return Announcement(model=MODEL, server=server, ttl=ttl)


def test_an_open_record_lists_outside_servers_but_never_one_the_operator_removed() -> None:
    closed, open_ = OperatorRecord(), OperatorRecord(outside=True)
    for authority in (closed, open_):
        authority.load(RouteMap(model=MODEL, version=2, servers=[record("a", 0, 15), record("b", 15, 30)]))
        assert authority.announce(announcement(record(VOLUNTEER, 0, 30)), now=0.0) is (authority is open_)
    assert [s.id for s in closed.snapshot().servers] == ["a", "b"]
    assert [s.id for s in open_.snapshot().servers] == ["a", VOLUNTEER, "b"]
    # b leaves the operator's record but still announces: it is the operator's, never listed again.
    open_.load(RouteMap(model=MODEL, version=3, servers=[record("a", 0, 15)]))
    assert open_.announce(announcement(record("b", 15, 30)), now=1.0) is False
    assert [s.id for s in open_.snapshot().servers] == ["a", VOLUNTEER]
    # A silent outside server expires like any announcement.
    assert set(open_.expire(now=100.0)) == {VOLUNTEER, "b"}
    assert [s.id for s in open_.snapshot().servers] == ["a"]


# ---- the operator reads the map --------------------------------------------------------------------------------


async def test_the_operator_reads_the_map_with_the_swarm_token(monkeypatch: pytest.MonkeyPatch) -> None:
    service = RouteMapService.announcements(MODEL, token="s3cret", identities=unchecked())
    owner = m.Owner(NAME, "default", "uid")
    async with serving(service.app()) as url, aiohttp.ClientSession() as http:
        body = announcement(record(VOLUNTEER, 0, 15)).model_dump()
        async with http.post(f"{url}/v1/servers", json=body, headers={"Authorization": "Bearer s3cret"}) as response:
            assert response.status == 200
        settings = operator_settings(routemap_url=url, token_secret="swarm-token")
        monkeypatch.setenv("LLMSWARM_TOKEN", "s3cret")
        found = await observe_outside(owner, SPEC, settings, MODEL, set())
        assert [(s.id, s.span, s.online) for s in found] == [(VOLUNTEER, Span(0, 15), True)]
        # A wrong token is refused: nothing counts as outside, and nothing fails.
        monkeypatch.setenv("LLMSWARM_TOKEN", "wrong")
        assert await observe_outside(owner, SPEC, settings, MODEL, set()) == []
    # A route map that does not answer: nothing outside either, at once.
    assert await observe_outside(owner, SPEC, operator_settings(), MODEL, set()) == []


def test_the_route_map_url_is_its_service_unless_overridden() -> None:
    owner = m.Owner(NAME, "team", "uid")
    default = routemap_read_url(owner, SPEC, operator_settings(routemap_url="http://{host}:{port}"))
    assert default == "http://open-routemap.team.svc.cluster.local:8700"
    custom = operator_settings(routemap_url="http://127.0.0.1:8001/api/v1/namespaces/{namespace}/services/{swarm}-routemap:{port}/proxy")
    assert routemap_read_url(owner, SPEC, custom) == "http://127.0.0.1:8001/api/v1/namespaces/team/services/open-routemap:8700/proxy"


# ---- end to end: the emulator, a real route map, an outside server -------------------------------------------------


@contextlib.asynccontextmanager
async def record_copied(cluster: Cluster, authority: OperatorRecord) -> AsyncIterator[None]:
    """Play the route map's API watch: hand the operator's record (its ConfigMap) to the route map as it changes."""

    async def copy_loop() -> None:
        while True:
            for cm in cluster.controllers.live("configmaps"):
                if cm["metadata"]["name"] == m.routemap_name(NAME):
                    authority.load(RouteMap.model_validate_json(cm["data"][m.ROUTES_FILE]), "api")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(copy_loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def announcing(url: str, server: ServerRecord, ttl: float,
                     headers: dict[str, str] | None = None) -> AsyncIterator[asyncio.Task[None]]:
    """An outside server's heartbeat every ttl / 5 s; cancel the task to make it go silent."""

    async def beat() -> None:
        async with aiohttp.ClientSession(headers=headers) as http:
            while True:
                async with http.post(f"{url}/v1/servers", json=announcement(server, ttl).model_dump()) as response:
                    assert response.status == 200, await response.text()
                await asyncio.sleep(ttl / 5)

    task = asyncio.create_task(beat())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def routes_at(url: str, headers: dict[str, str] | None = None) -> RouteMap:
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{url}/v1/routes") as response:
        return RouteMap.model_validate(await response.json())


async def test_an_outside_server_holds_half_the_model_and_the_operator_fills_the_rest(cluster: Cluster) -> None:
    authority = OperatorRecord(outside=True)
    authority.load(RouteMap(model=MODEL, version=0, servers=[]), "file")  # the route map runs before the servers
    service = RouteMapService(authority, interval=0.05, identities=unchecked())
    async with serving(service.app()) as url, record_copied(cluster, authority):
        async with announcing(url, record(VOLUNTEER, 0, 15), ttl=1.0) as heartbeat:
            await eventually(lambda: _listed(url, VOLUNTEER), 5, "the outside server in the route map")
            settings = operator_settings(routemap_url=url)
            op = await start_operator(settings)
            try:
                await _fills_the_rest(cluster, url, f"http://127.0.0.1:{settings.metrics_port}/metrics")
                heartbeat.cancel()  # the outside server goes away without a word
                await _covers_everything_again(cluster, url)
                async with announcing(url, record(VOLUNTEER, 0, 15), ttl=1.0):
                    await _gives_way_again(cluster)
            finally:
                await settle(cluster)
                await op.stop()
            assert not op.errors


async def _listed(url: str, server_id: str) -> bool:
    return any(s.id == server_id and s.state == "online" for s in (await routes_at(url)).servers)


async def _fills_the_rest(cluster: Cluster, url: str, metrics_url: str) -> None:
    cluster.controllers.all_ready = True
    await apply_doc(cluster, copy.deepcopy(SWARM))
    await wait_servers(cluster, NAME, {REST})
    current = await wait_phase(cluster, NAME, "Ready")
    servers = {s["name"]: s for s in current["servers"]}
    assert servers[VOLUNTEER] == {"name": VOLUNTEER, "url": f"http://{VOLUNTEER}.example:8701", "start": 0, "end": 15,
                                  "ready": True, "state": "online", "desired": False, "outside": True}
    assert servers[REST]["outside"] is False and set(servers) == {VOLUNTEER, REST}
    assert current["serversOutside"] == 1 and current["readyServers"] == "1/1"
    assert current["coverage"] == {"minReplicas": 1, "targetReplicas": 1, "uncoveredBlocks": [], "shortBlocks": ""}
    # The operator never made a server for the outside server's blocks, never touched it, never recorded it.
    assert all({s.id for s in r.servers} <= {REST} for r in route_history(cluster, NAME))
    assert not [w for w in writes(cluster) if VOLUNTEER in w or FIRST in w]
    # Clients see both (once the route map has the record the operator just wrote): the whole model is served.
    async def both() -> bool:
        published = await routes_at(url)
        assert {(s.id, s.start, s.end, s.state) for s in published.servers} == {(VOLUNTEER, 0, 15, "online"),
                                                                                  (REST, 15, 30, "online")}
        return True
    await eventually(both, 5, "both servers online in the route map")
    # The operator's metrics count its own servers only, and the outside server in the coverage.
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
        text = await response.text()
    labels = {"namespace": "default", "swarm": NAME}
    assert metric_total(text, "llmswarm_swarm_servers", state="online", **labels) == 1
    assert metric_total(text, "llmswarm_swarm_servers", state="desired", **labels) == 1
    assert metric_total(text, "llmswarm_swarm_min_replicas", **labels) == 1


async def _covers_everything_again(cluster: Cluster, url: str) -> None:
    await eventually(lambda: _gone(url), 10, "the silent outside server to leave the route map")
    await wait_servers(cluster, NAME, {FIRST, REST})

    async def whole() -> dict[str, Any]:
        current = await status(cluster, NAME)
        assert current["phase"] == "Ready" and {s["name"] for s in current["servers"]} == {FIRST, REST}, current
        return current
    current = await eventually(whole, 10, "Ready with the operator's two servers")
    assert current["serversOutside"] == 0 and not any(s["outside"] for s in current["servers"])
    assert current["coverage"]["minReplicas"] == 1 and current["readyServers"] == "2/2"


async def _gone(url: str) -> bool:
    return VOLUNTEER not in {s.id for s in (await routes_at(url)).servers}


async def _gives_way_again(cluster: Cluster) -> None:
    await wait_servers(cluster, NAME, {REST})  # the [0, 15) server drained (drain_seconds 0 here) and was deleted

    async def helped() -> dict[str, Any]:
        current = await status(cluster, NAME)
        assert current["phase"] == "Ready" and {s["name"] for s in current["servers"]} == {VOLUNTEER, REST}, current
        return current
    await eventually(helped, 10, "Ready with the outside server and one server of the operator")
    assert any(r.servers and {s.id for s in r.servers} == {FIRST, REST} and
               next(s.state for s in r.servers if s.id == FIRST) == "draining" for r in route_history(cluster, NAME))

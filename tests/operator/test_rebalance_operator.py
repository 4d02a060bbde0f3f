"""The operator's rebalance timer against the Kubernetes API emulator, with load read from real HTTP endpoints.

Block servers do not run in the emulated cluster, so the test serves their metrics itself:
a local HTTP server answers ``/<namespace>/<server>/metrics`` with the Prometheus text of a
real :class:`llmswarm_node.metrics.ServerMetrics` per server, and the operator's
``rebalance_scrape_url`` points there. One server is kept 100 % busy (its request-duration
counter grows as fast as the clock); the operator must move a server to its span
make-before-break, say so in the status, an Event and its metrics, and then leave the
swarm alone.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from llmswarm_core.spans import Span
from llmswarm_node.metrics import ServerMetrics
from llmswarm_operator.assignment import Assignment
from llmswarm_operator.manifests import routemap_name, server_name
from tests.helpers import metric_total, serving
from tests.operator.conftest import Cluster, eventually, operator_settings, settle, start_operator
from tests.operator.test_operator_emulator import apply_doc, live, owned, route_history, status, wait_phase, wait_servers

NAME = "rebal"
SWARM: dict[str, Any] = {
    "apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "metadata": {"name": NAME, "namespace": "default"},
    "spec": {
        "model": {"source": "smollm2"},
        "pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 3, "blocksPerServer": 15}],
        "rebalance": {"enabled": True, "intervalSeconds": 10, "minGain": 0.5},
    },
}
COLD = {server_name(NAME, "cpu", Span(0, 15), 0), server_name(NAME, "cpu", Span(0, 15), 1)}
HOT = server_name(NAME, "cpu", Span(15, 30), 0)
NEW = server_name(NAME, "cpu", Span(15, 30), 1)


class FakeServers:
    """Real metrics registries of block servers, served over HTTP; `busy` servers are always computing."""

    def __init__(self, throughput: float = 100.0) -> None:
        self.throughput = throughput
        self.metrics: dict[str, ServerMetrics] = {}
        self.busy: set[str] = set()
        self.seen: dict[str, float] = {}
        self.scrapes: dict[str, int] = {}
        self.url = ""

    def registry(self, server: str) -> ServerMetrics:
        if server not in self.metrics:
            start, end = (int(x) for x in server.rsplit("-", 3)[1:3])
            metrics = ServerMetrics()
            metrics.throughput.set(self.throughput)
            metrics.span_start.set(start)
            metrics.span_end.set(end)
            metrics.info.labels("SmolLM2-135M-Instruct", "float32", server).set(1)
            self.metrics[server] = metrics
            self.seen[server] = time.monotonic()
        return self.metrics[server]

    async def handle(self, request: web.Request) -> web.Response:
        server = request.match_info["server"]
        if request.match_info["namespace"] != "default" or not server.startswith(f"{NAME}-"):
            return web.Response(status=404)
        metrics = self.registry(server)
        now = time.monotonic()
        if server in self.busy:  # one request in flight at every moment since the last scrape
            metrics.latency.labels("step").observe(now - self.seen[server])
            metrics.requests.labels("step", "ok").inc()
            metrics.tokens.labels("inference").inc(self.throughput * (now - self.seen[server]))
        self.seen[server] = now
        self.scrapes[server] = self.scrapes.get(server, 0) + 1
        return web.Response(body=generate_latest(metrics.registry), content_type="text/plain")


@pytest.fixture
async def servers() -> AsyncIterator[FakeServers]:
    fake = FakeServers()
    app = web.Application()
    app.router.add_get("/{namespace}/{server}/metrics", fake.handle)
    async with serving(app) as url:
        fake.url = url
        yield fake


async def operator_metric(url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return metric_total(await response.text(), name, **labels)


async def test_skewed_load_moves_a_server_make_before_break(cluster: Cluster, servers: FakeServers) -> None:
    settings = operator_settings(rebalance_scrape_url=f"{servers.url}/{{namespace}}/{{server}}/metrics")
    op = await start_operator(settings)
    try:
        await scenario(cluster, servers, f"http://127.0.0.1:{settings.metrics_port}/metrics")
    finally:
        await settle(cluster)
        await op.stop()
    assert not op.errors


async def scenario(cluster: Cluster, servers: FakeServers, metrics_url: str) -> None:
    servers.busy = {HOT}
    cluster.controllers.all_ready = True
    await apply_doc(cluster, copy.deepcopy(SWARM))
    await wait_servers(cluster, NAME, COLD | {HOT})
    ready_at = time.monotonic()
    await wait_phase(cluster, NAME, "Ready")

    # The round comes intervalSeconds after Ready: one [0, 15) server moves to the busy span.
    async def moved() -> dict[str, Any]:
        current = await status(cluster, NAME)
        assert "lastRebalance" in current.get("rebalance", {}), current.get("rebalance")
        return current
    current = await eventually(moved, 60, "a rebalance")
    assert time.monotonic() - ready_at >= 9, "the first round came before intervalSeconds"
    rebalance = current["rebalance"]
    assert rebalance["source"] == "scrape" and rebalance["result"] == "moved"
    last = rebalance["lastRebalance"]
    assert len(last["moves"]) == 1
    move = last["moves"][0]
    assert move["server"] in COLD and move["newServer"] == NEW
    assert (move["pool"], move["from"], move["to"]) == ("cpu", "0:15", "15:30")
    assert last["gain"] > 0.5 and last["bottleneckAfter"] > last["bottleneckBefore"]
    assert rebalance["bottleneckBlock"] == 15 and rebalance["bottleneckThroughput"] == pytest.approx(0.0, abs=5.0)

    # Through the emulator's history of the route map: no block ever lacks an online server; the new server
    # exists before the old one leaves. The old one's blocks keep another online server all along, so it drains
    # at once (freeing its GPU for the replacement), as in any rollout (planner.py).
    kept = (COLD - {move["server"]}) | {HOT, NEW}
    await wait_servers(cluster, NAME, kept)
    after = await wait_phase(cluster, NAME, "Ready")
    assert {(s["name"], s["start"], s["end"]) for s in after["servers"]} == {
        (n, 0, 15) for n in COLD - {move["server"]}} | {(HOT, 15, 30), (NEW, 15, 30)}
    history = route_history(cluster, NAME)
    # From the version where every first server is online (coverage alone can come a version earlier,
    # while one of the two [0, 15) servers is still joining).
    served = next(i for i, r in enumerate(history)
                  if all(s.state == "online" for s in r.servers) and {s.id for s in r.servers} >= COLD | {HOT})
    history = history[served:]
    assert all(min(r.coverage(("online",))) >= 1 for r in history)
    states = [{s.id: s.state for s in r.servers} for r in history]
    left = next(i for i, st in enumerate(states) if st.get(move["server"], "gone") != "online")
    assert NEW in states[left], f"{move['server']} left before {NEW} was created: {states[left]}"
    assert states[left][move["server"]] == "draining"  # clients on it finish; new sessions go elsewhere
    assert all(st.get(n) == "online" for st in states for n in COLD - {move["server"]})

    # The assignment lives with the route map, so a timer tick with an older copy of the Swarm keeps it.
    configmap = live(cluster, "configmaps")[routemap_name(NAME)]
    stored = Assignment.from_json(configmap["data"]["assignment.json"])
    assert stored is not None and {s.name for s in stored.servers} == kept
    creations = [r for r in list(cluster.emulator) if r.method == "POST" and r.resource is not None
                 and r.resource.plural == "deployments" and NEW in json.dumps(r.data)]
    assert len(creations) == 1

    assert await operator_metric(metrics_url, "llmswarm_rebalance_moves_total", namespace="default", swarm=NAME) == 1
    assert await operator_metric(metrics_url, "llmswarm_rebalance_rounds_total", swarm=NAME, result="moved") == 1
    assert await operator_metric(metrics_url, "llmswarm_rebalance_gain", swarm=NAME) == pytest.approx(last["gain"], rel=1e-3)
    events = [e for e in cluster.controllers.live("events") if e.get("reason") == "Rebalanced"]
    assert len(events) == 1 and move["server"] in events[0]["message"] and NEW in events[0]["message"]

    # The next round (the new server's first rates come from a quick baseline) sees a balanced swarm.
    first_round = rebalance["lastRound"]

    async def next_round() -> dict[str, Any]:
        current = await status(cluster, NAME)
        assert current["rebalance"]["lastRound"] != first_round
        return current
    later = (await eventually(next_round, 40, "the next rebalance round"))["rebalance"]
    assert later["result"] == "unchanged", later
    assert later["lastRebalance"] == last
    assert set(owned(cluster, "deployments", NAME)) - {routemap_name(NAME)} == kept
    assert await operator_metric(metrics_url, "llmswarm_rebalance_moves_total", swarm=NAME) == 1
    assert await operator_metric(metrics_url, "llmswarm_rebalance_rounds_total", swarm=NAME, result="unchanged") >= 1
    assert servers.scrapes.get(NEW, 0) >= 2  # the newcomer was measured (baseline + sample)

    # A spec change that changes the servers drops the assignment: the placement decides again.
    bigger = copy.deepcopy(SWARM)
    bigger["spec"]["pools"][0]["minServers"] = 4
    await apply_doc(cluster, bigger)

    async def placement_wins() -> bool:
        configmap = live(cluster, "configmaps")[routemap_name(NAME)]
        assert "assignment.json" not in configmap["data"]
        return True
    await eventually(placement_wins, 20, "the assignment to be dropped")
    await asyncio.sleep(0)

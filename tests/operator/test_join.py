"""Two clusters, one swarm (issue #16): a Swarm with spec.join serves another cluster's swarm.

Cluster A's route map is a real route-map service in this process (open to outside servers, with a swarm token);
it lists A's server for blocks [0, 15). Cluster B is the Kubernetes API emulator with the operator: its Swarm joins
A's route map with the credential in a Secret. B's operator runs no route map, reads A's map with that credential,
and makes one server, for [15, 30) only, that joins A's route map through its relay with A's credential. Once B's
server announces itself to A, both sides show the same coverage: A's map, and B's status. When B's server goes
(the link to B is lost), A's map names the blocks left uncovered, and A keeps serving the rest.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import aiohttp
import yaml

from llmswarm_control.routemap_service import RouteMapService
from llmswarm_core.spans import Span
from llmswarm_operator import manifests as m
from llmswarm_operator.swarm_spec import parse_spec
from tests.helpers import metric_total, serving
from tests.operator.conftest import Cluster, eventually, operator_settings, settle, start_operator
from tests.operator.test_operator_emulator import live, status, wait_phase, wait_servers, writes
from tests.operator.test_outside_servers import MODEL, announcing, record, routes_at, unchecked

TOKEN = "a-swarm-token"
NAME = "branch"
A_SERVER = "a-0"
B_REST = m.server_name(NAME, "cpu", Span(15, 30), 0)


def joined(url: str) -> dict[str, Any]:
    return {
        "apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "model": {"source": "smollm2"},
            "pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 1, "maxServers": 2, "blocksPerServer": 15}],
            "join": {"url": url, "credentialSecret": "a-join"},
        },
    }


SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a-join", "namespace": "default"},
          "data": {"credential": base64.b64encode(TOKEN.encode()).decode()}}


async def test_a_swarm_that_joins_another_serves_only_what_it_lacks_and_both_show_one_coverage(cluster: Cluster) -> None:
    service = RouteMapService.announcements(MODEL, token=TOKEN, identities=unchecked(), interval=0.05)
    async with serving(service.app()) as url:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with announcing(url, record(A_SERVER, 0, 15), ttl=1.0, headers=headers):
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{cluster.url}/api/v1/namespaces/default/secrets", json=SECRET) as response:
                    assert response.status in (200, 201), await response.text()
            op = await start_operator(operator_settings())
            try:
                cluster.controllers.all_ready = True
                await cluster.kubectl.apply(yaml.safe_dump(copy.deepcopy(joined(url))))
                await wait_servers(cluster, NAME, {B_REST})
                current = await wait_phase(cluster, NAME, "Ready")
                # No route map of its own: B's server joins A's, through A's relay, with A's credential.
                assert m.routemap_name(NAME) not in live(cluster, "deployments")
                assert m.routemap_name(NAME) not in live(cluster, "services")
                assert not [w for w in writes(cluster) if w.endswith(f"/{m.routemap_name(NAME)}") and "configmaps" not in w]
                container = live(cluster, "deployments")[B_REST]["spec"]["template"]["spec"]["containers"][0]
                args = container["args"]
                assert args[args.index("--swarm") + 1] == url and "--relay" in args
                token_env = next(e for e in container["env"] if e["name"] == "LLMSWARM_TOKEN")
                assert token_env["valueFrom"]["secretKeyRef"] == {"name": "a-join", "key": "credential"}
                # B's status: A's server is outside, the whole model is covered, the route map is A's.
                servers = {s["name"]: s for s in current["servers"]}
                assert servers[A_SERVER]["outside"] is True and servers[B_REST]["outside"] is False
                assert current["routeMap"]["url"] == url
                assert current["coverage"]["uncoveredBlocks"] == [] and current["coverage"]["minReplicas"] == 1
                # B's server announces itself to A (as its pod does, through the relay): A's map has the same coverage.
                async with announcing(url, record(B_REST, 15, 30), ttl=1.0, headers=headers) as b_heartbeat:
                    async def one_coverage() -> bool:
                        published = await routes_at(url, headers)
                        assert min(published.coverage()) == current["coverage"]["minReplicas"] == 1
                        return True
                    await eventually(one_coverage, 5, "A's map to cover the model with B's server")
                    b_heartbeat.cancel()  # the link to B is lost
                    async def b_gone() -> bool:
                        published = await routes_at(url, headers)
                        coverage = published.coverage()
                        assert coverage[:15] == [1] * 15 and coverage[15:] == [0] * 15  # A serves what it holds
                        return True
                    await eventually(b_gone, 10, "B's server to leave A's map")
                    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
                        assert metric_total(await response.text(), "llmswarm_routemap_uncovered_blocks") == 15
                # B itself keeps its own server and counts A's.
                again = await status(cluster, NAME)
                assert {s["name"] for s in again["servers"]} == {A_SERVER, B_REST}
            finally:
                await settle(cluster)
                await op.stop()
            assert not op.errors


def test_an_open_relaying_swarm_tells_its_route_map_so() -> None:
    owner = m.Owner("hub", "default", "uid")
    spec = parse_spec({"pools": [{"name": "p", "gpuMemory": "1Gi"}],
                       "routeMap": {"outsideServers": True, "relay": True, "externalAddress": "swarm.example.org"}})
    args = m.routemap_deployment(owner, spec, operator_settings())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--outside-servers" in args and "--relay" in args
    assert args[args.index("--public-url") + 1] == "http://swarm.example.org:8700"
    closed = parse_spec({"pools": [{"name": "p", "gpuMemory": "1Gi"}]})
    args = m.routemap_deployment(owner, closed, operator_settings())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not {"--outside-servers", "--relay", "--public-url"} & set(args)

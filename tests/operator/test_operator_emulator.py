"""The operator, in-process, against the Kubernetes API emulator, driven with the real kubectl.

Each test applies Swarms as a user would (``kubectl apply``), plays the cluster's part
(pods become ready, the garbage collector deletes what is owned by deleted objects) and
checks what the operator made of it: workloads, Services, the route map, the status.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmswarm_core.model_store import store_key
from llmswarm_core.routemap import RouteMap
from llmswarm_operator.manifests import LABEL_SWARM, desired_servers, routemap_name
from llmswarm_operator.swarm_spec import parse_spec, plan_placement
from tests.operator.conftest import INTERVAL, Cluster, Operator, eventually, start_operator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
MANAGED = ("deployments", "services", "configmaps")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def live(cluster: Cluster, plural: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in cluster.controllers.live(plural)}


def owned(cluster: Cluster, plural: str, swarm: str) -> dict[str, dict[str, Any]]:
    return {n: o for n, o in live(cluster, plural).items() if (o["metadata"].get("labels") or {}).get(LABEL_SWARM) == swarm}


def routes(cluster: Cluster, swarm: str) -> RouteMap:
    cm = live(cluster, "configmaps")[routemap_name(swarm)]
    return RouteMap.model_validate_json(cm["data"]["routes.json"])


def route_history(cluster: Cluster, swarm: str) -> list[RouteMap]:
    """Every version of the route-map ConfigMap the emulator has stored, oldest first."""
    obj = cluster.emulator.objects["v1/configmaps", "default", routemap_name(swarm)]
    out = []
    for version in obj.history:
        if version is not None:
            out.append(RouteMap.model_validate_json(version.raw["data"]["routes.json"]))
    return out


def expected_servers(doc: dict[str, Any]) -> dict[str, Any]:
    _, _, placement = plan_placement(parse_spec(doc["spec"]))
    return {s.name: s for s in desired_servers(doc["metadata"]["name"], placement)}


async def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (await cluster.kubectl.get_json("swarm", name)).get("status") or {}


async def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        current = await status(cluster, name)
        assert current.get("phase") == phase, f"phase {current.get('phase')}, conditions {current.get('conditions')}"
        return current
    return await eventually(check, timeout, f"{name} to be {phase}")


async def wait_servers(cluster: Cluster, name: str, names: set[str], timeout: float = 20) -> None:
    """Until the swarm's server Deployments are exactly `names` (plus the route map's)."""
    async def check() -> bool:
        have = set(owned(cluster, "deployments", name)) - {routemap_name(name)}
        assert have == names, f"have {sorted(have)}, want {sorted(names)}"
        return True
    await eventually(check, timeout, f"servers of {name}")


def condition(current: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in current["conditions"] if c["type"] == kind)


def min_online(routemap: RouteMap) -> int:
    return min(routemap.coverage(("online",)))


async def apply_doc(cluster: Cluster, doc: dict[str, Any]) -> None:
    await cluster.kubectl.apply(yaml.safe_dump(doc))


async def converge(cluster: Cluster, doc: dict[str, Any]) -> dict[str, Any]:
    """Apply, let every pod become ready, wait for Ready."""
    cluster.controllers.all_ready = True
    await apply_doc(cluster, doc)
    await wait_servers(cluster, doc["metadata"]["name"], set(expected_servers(doc)))
    return await wait_phase(cluster, doc["metadata"]["name"], "Ready")


def writes(cluster: Cluster) -> list[str]:
    """The operator's writes so far to what it manages (the fake controllers write only pods)."""
    out = []
    for request in list(cluster.emulator):
        if request.resource is not None and request.resource.plural in MANAGED and request.method in ("POST", "PATCH", "PUT", "DELETE"):
            out.append(f"{request.method} {request.url.path}")
    return out


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
async def test_example_gets_its_servers_and_becomes_ready(cluster: Cluster, operator: Operator, example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    name = doc["metadata"]["name"]
    spec = parse_spec(doc["spec"])
    expected = expected_servers(doc)
    assert expected, "an example with no server"
    out = await cluster.kubectl.apply(example)
    assert f"swarm.llmswarm.dev/{name} created" in out

    await wait_servers(cluster, name, set(expected))
    swarm = await cluster.kubectl.get_json("sw", name)
    uid = swarm["metadata"]["uid"]
    deployments = owned(cluster, "deployments", name)
    services = owned(cluster, "services", name)
    assert set(services) == set(expected) | {routemap_name(name)}
    for server_name, server in expected.items():
        deployment = deployments[server_name]
        meta = deployment["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "name": name,
                                            "uid": uid, "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["app.kubernetes.io/name"] == "llmswarm"
        assert meta["labels"]["app.kubernetes.io/instance"] == name
        assert meta["labels"]["app.kubernetes.io/component"] == "block-server"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "llmswarm-operator"
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = container["args"]
        assert container["command"] == ["llmswarm"] and args[0] == "serve"
        assert args[args.index("--blocks") + 1] == f"{server.span.start}:{server.span.end}"
        model = spec.model.source if spec.model_store is None else f"/var/lib/llmswarm/models/{store_key(spec.model.source, '')}"
        assert args[args.index("--model") + 1] == model
        assert args[args.index("--swarm") + 1] == f"http://{routemap_name(name)}.default.svc.cluster.local:8700"
        assert args[args.index("--server-id") + 1] == server_name
        assert ("--quantization" in args) == (spec.model.quantization != "none")
        pool = next(p for p in doc["spec"]["pools"] if p["name"] == server.pool)
        assert pod.get("nodeSelector", {}) == pool.get("nodeSelector", {})
        assert pod.get("tolerations", []) == pool.get("tolerations", [])
        assert {k: str(v) for k, v in pool["resources"].get("limits", {}).items()} == container["resources"].get("limits", {})
        assert services[server_name]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert services[routemap_name(name)]["spec"]["type"] == doc["spec"].get("routeMap", {}).get("serviceType", "ClusterIP")

    # Before the pods are ready, the map lists every server as joining, and the swarm is Pending.
    first = routes(cluster, name)
    assert {s.id for s in first.servers} == set(expected)
    assert {s.state for s in first.servers} == {"joining"}
    assert first.model is not None and first.model.num_blocks == plan_placement(spec)[0].num_blocks
    assert (await wait_phase(cluster, name, "Pending"))["readyServers"] == f"0/{len(expected)}"

    cluster.controllers.all_ready = True
    current = await wait_phase(cluster, name, "Ready")
    final = routes(cluster, name)
    assert {s.state for s in final.servers} == {"online"}
    assert final.version > first.version
    assert min_online(final) >= spec.redundancy
    assert current["coverage"]["minReplicas"] == min_online(final)
    assert current["coverage"]["uncoveredBlocks"] == []
    assert current["routeMap"]["version"] == final.version
    assert current["observedGeneration"] == swarm["metadata"]["generation"]
    assert condition(current, "Ready")["status"] == "True"
    assert condition(current, "Progressing")["status"] == "False"
    assert condition(current, "Degraded")["status"] == "False"
    assert {s["name"]: (s["start"], s["end"], s["state"]) for s in current["servers"]} == {
        n: (s.span.start, s.span.end, "online") for n, s in expected.items()}


async def test_scaling_a_pool_keeps_coverage(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    old = set(expected_servers(doc))
    ready_version = routes(cluster, name).version

    # Four servers instead of three: all spans change. New pods stay not ready for now.
    cluster.controllers.all_ready = False
    cluster.controllers.ready_servers = set(old)
    bigger = copy.deepcopy(doc)
    bigger["spec"]["pools"][0]["minServers"] = 4
    new = set(expected_servers(bigger))
    assert len(new) == 4 and not new & old
    await apply_doc(cluster, bigger)
    await wait_servers(cluster, name, old | new)
    current = await wait_phase(cluster, name, "Progressing")
    assert current["readyServers"] == "0/4"
    assert current["coverage"]["minReplicas"] == 1  # the old servers still serve
    states = {s.id: s.state for s in routes(cluster, name).servers}
    assert {states[n] for n in old} == {"online"} and {states[n] for n in new} == {"joining"}
    await asyncio.sleep(5 * INTERVAL)  # several timer ticks: nothing old goes while the new ones are not ready
    assert set(owned(cluster, "deployments", name)) >= old

    cluster.controllers.ready_servers = old | new
    await wait_servers(cluster, name, new)
    await wait_phase(cluster, name, "Ready")
    assert set(owned(cluster, "services", name)) == new | {routemap_name(name)}

    history = [r for r in route_history(cluster, name) if r.version >= ready_version]
    assert all(min_online(r) >= 1 for r in history), "a block lost its last online server during the rollout"
    assert any(s.state == "draining" for r in history for s in r.servers), "old servers were never drained"
    assert [r.version for r in history] == sorted({r.version for r in history})


async def test_redundancy_and_a_new_pool_roll_out(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    ready_version = routes(cluster, name).version

    changed = copy.deepcopy(doc)
    changed["spec"]["redundancy"] = 2
    changed["spec"]["pools"].append({"name": "fast", "gpuMemory": "4Gi", "relativeSpeed": 2, "minServers": 1,
                                     "maxServers": 2, "nodeSelector": {"llmswarm.dev/pool": "fast"}})
    expected = expected_servers(changed)
    assert {s.pool for s in expected.values()} == {"cpu", "fast"}
    await apply_doc(cluster, changed)
    await wait_servers(cluster, name, set(expected))
    current = await wait_phase(cluster, name, "Ready")
    assert current["coverage"]["minReplicas"] >= 2
    assert min_online(routes(cluster, name)) >= 2
    fast = [n for n, s in expected.items() if s.pool == "fast"]
    for server_name in fast:
        pod = owned(cluster, "deployments", name)[server_name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"llmswarm.dev/pool": "fast"}
    history = [r for r in route_history(cluster, name) if r.version >= ready_version]
    assert all(min_online(r) >= 1 for r in history)


async def test_a_deleted_workload_comes_back(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    victim = sorted(expected_servers(doc))[1]
    old_uid = owned(cluster, "deployments", name)[victim]["metadata"]["uid"]
    await cluster.kubectl("delete", "deployment", victim)

    async def recreated() -> bool:
        deployment = owned(cluster, "deployments", name).get(victim)
        assert deployment is not None and deployment["metadata"]["uid"] != old_uid
        return True
    await eventually(recreated, what="the Deployment to come back")

    async def healed() -> bool:
        assert {s.state for s in routes(cluster, name).servers} == {"online"}
        assert (await status(cluster, name))["phase"] == "Ready"
        return True
    await eventually(healed, what="the swarm to heal")


async def test_deleting_the_swarm_removes_everything(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    assert owned(cluster, "pods", name)
    await cluster.kubectl("delete", "swarm", name, "--wait=false")

    async def gone() -> bool:
        left = {p: sorted(owned(cluster, p, name)) for p in ("swarms", *MANAGED, "pods")}
        left["swarms"] = sorted(live(cluster, "swarms"))
        assert not any(left.values()), left
        return True
    await eventually(gone, what="everything of the swarm to be gone")
    assert operator.running

    async def forgotten() -> bool:
        text = await get_text(f"http://127.0.0.1:{operator.runtime.settings.metrics_port}/metrics")
        assert f'swarm="{name}"' not in text
        return True
    await eventually(forgotten, what="the swarm's metrics to be dropped")


async def test_an_invalid_swarm_gets_a_condition_and_the_operator_keeps_going(cluster: Cluster, operator: Operator) -> None:
    bad = load("swarm-cpu.yaml")
    bad["metadata"]["name"] = "broken"
    bad["spec"]["pools"][0]["maxServers"] = 1  # less than minServers: 3
    await apply_doc(cluster, bad)
    current = await wait_phase(cluster, "broken", "Failed")
    ready = condition(current, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "maxServers (1) is less than minServers (3)" in ready["message"]
    events = [e for e in cluster.controllers.live("events") if e.get("involvedObject", {}).get("name") == "broken"]
    assert any(e.get("reason") == "InvalidSpec" and "maxServers" in e.get("message", "") for e in events), events
    assert not owned(cluster, "deployments", "broken")

    unknown = load("swarm-cpu.yaml")
    unknown["metadata"]["name"] = "unknown-model"
    unknown["spec"]["model"]["source"] = "someone/unknown-model"
    await apply_doc(cluster, unknown)
    message = condition(await wait_phase(cluster, "unknown-model", "Failed"), "Ready")["message"]
    assert "spec.model.architecture" in message

    # The operator still works: a valid swarm converges, and fixing the broken one heals it.
    assert operator.running
    await converge(cluster, load("swarm-cpu.yaml"))
    fixed = copy.deepcopy(bad)
    fixed["spec"]["pools"][0]["maxServers"] = 3
    await apply_doc(cluster, fixed)
    await wait_phase(cluster, "broken", "Ready")

    # Breaking a running swarm's spec keeps its servers running.
    before = set(owned(cluster, "deployments", "broken"))
    await apply_doc(cluster, bad)
    await wait_phase(cluster, "broken", "Failed")
    await asyncio.sleep(3 * INTERVAL)
    assert set(owned(cluster, "deployments", "broken")) == before


async def test_pools_too_small_are_reported_not_crashed(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    doc["metadata"]["name"] = "small"
    doc["spec"]["redundancy"] = 2
    doc["spec"]["pools"][0].update({"gpuMemory": "768Mi", "reservedMemory": "512Mi", "minServers": 2, "maxServers": 2})
    expected = expected_servers(doc)
    _, _, placement = plan_placement(parse_spec(doc["spec"]))
    assert not placement.feasible and expected
    cluster.controllers.all_ready = True
    await apply_doc(cluster, doc)
    await wait_servers(cluster, "small", set(expected))
    current = await wait_phase(cluster, "small", "Degraded")
    degraded = condition(current, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "PlacementInsufficient"
    assert "have fewer than 2 servers" in degraded["message"] and "GiB of server memory" in degraded["message"]
    assert current["placement"]["feasible"] is False
    assert current["placement"]["missingBytes"] == placement.missing_bytes > 0
    assert current["coverage"]["minReplicas"] == min(placement.coverage)
    assert operator.running


async def test_a_restarted_operator_does_nothing_twice(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-70b-int8.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    await asyncio.sleep(3 * INTERVAL)
    await operator.stop()
    before = writes(cluster)

    second = await start_operator()
    try:
        async def reconciled() -> bool:
            assert second.runtime.metrics.reconciles.labels("timer", "ok")._value.get() >= 3
            assert second.runtime.metrics.reconciles.labels("resume", "ok")._value.get() >= 1
            return True
        await eventually(reconciled, what="the new operator to resume and tick")
        assert writes(cluster) == before
        assert (await status(cluster, name))["phase"] == "Ready"
    finally:
        await second.stop()


async def test_metrics_and_liveness(cluster: Cluster, operator: Operator) -> None:
    doc = load("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    await converge(cluster, doc)
    url = f"http://127.0.0.1:{operator.runtime.settings.metrics_port}/metrics"

    async def exported() -> str:
        text = await get_text(url)
        assert f'llmswarm_swarm_min_replicas{{namespace="default",swarm="{name}"}} 1.0' in text
        assert f'llmswarm_swarm_ready{{namespace="default",swarm="{name}"}} 1.0' in text
        return text
    text = await eventually(exported, what="swarm metrics")
    assert 'llmswarm_operator_reconciles_total{result="ok",trigger="timer"}' in text
    assert 'llmswarm_operator_reconcile_duration_seconds_count{trigger="create"}' in text
    assert 'llmswarm_operator_object_writes_total{kind="Deployment",verb="created"} 4.0' in text
    probe = json.loads(await get_text(operator.liveness_url))
    assert probe["swarms"] == 1


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, response.status
        return await response.text()

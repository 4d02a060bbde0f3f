"""The operator, in-process, against the Kubernetes API emulator, driven with the real kubectl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llmswarm.routemap import RouteMap
from llmswarm_operator.manifests import desired_servers, routemap_name
from llmswarm_operator.swarm_spec import parse_spec, plan_placement
from tests.operator.conftest import Cluster, Operator, eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def live(cluster: Cluster, plural: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in cluster.controllers.live(plural)}


def routes(cluster: Cluster, swarm: str) -> RouteMap:
    cm = live(cluster, "configmaps")[routemap_name(swarm)]
    return RouteMap.model_validate_json(cm["data"]["routes.json"])


async def test_cpu_example(cluster: Cluster, operator: Operator) -> None:
    path = EXAMPLES / "swarm-cpu.yaml"
    doc = yaml.safe_load(path.read_text())
    name = doc["metadata"]["name"]
    _, _, placement = plan_placement(parse_spec(doc["spec"]))
    expected = {s.name for s in desired_servers(name, placement)}
    await cluster.kubectl.apply(path)

    async def created() -> bool:
        return expected <= set(live(cluster, "deployments"))
    await eventually(created, what="deployments")
    print(sorted(live(cluster, "deployments")))
    cluster.controllers.all_ready = True

    async def ready() -> dict[str, Any]:
        sw = await cluster.kubectl.get_json("swarm", name)
        assert sw.get("status", {}).get("phase") == "Ready", sw.get("status")
        return sw
    sw = await eventually(ready, what="Ready")
    print(json.dumps(sw["status"], indent=1))
    print(routes(cluster, name))

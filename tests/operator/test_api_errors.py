"""Errors reach the user: when the API server refuses a write for good (403, 422, ...), the Swarm's status and an
Event say which request and why, instead of a retry that only the operator's log shows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from tests.operator.cluster import Refusal
from tests.operator.conftest import INTERVAL, Cluster, Operator, eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FORBIDDEN = Refusal("POST", "deployments", 403, "Forbidden",
                    'deployments.apps is forbidden: User "system:serviceaccount:llmswarm:llmswarm-operator" cannot create '
                    'resource "deployments" in API group "apps" in the namespace "default"')
INVALID = Refusal("PATCH", "configmaps", 422, "Invalid",
                  'ConfigMap "smollm2-cpu-routemap" is invalid: data: Too long: must have at most 1048576 bytes')


def swarm() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "swarm-cpu.yaml").read_text())  # type: ignore[no-any-return]


def events(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.controllers.live("events")
            if e.get("involvedObject", {}).get("name") == name and e.get("reason") == reason]


async def condition(cluster: Cluster, name: str, kind: str = "Ready") -> dict[str, Any]:
    status = (await cluster.kubectl.get_json("swarm", name)).get("status") or {}
    found = next((c for c in status.get("conditions") or [] if c["type"] == kind), {})
    return {**found, "phase": status.get("phase")}


async def test_a_forbidden_write_is_a_condition_and_an_event_then_heals(cluster: Cluster, operator: Operator) -> None:
    cluster.emulator.refusals.append(FORBIDDEN)
    cluster.controllers.all_ready = True
    doc = swarm()
    name = doc["metadata"]["name"]
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def reported() -> dict[str, Any]:
        ready = await condition(cluster, name)
        assert ready.get("reason") == "Forbidden", ready
        return ready
    ready = await eventually(reported, 20, "the refusal in the status")
    assert ready["status"] == "False" and ready["phase"] == "Failed"
    assert "POST /apis/apps/v1/namespaces/default/deployments" in ready["message"]
    assert 'cannot create resource "deployments"' in ready["message"]
    assert "RBAC" in ready["message"]  # what to do about it
    degraded = await condition(cluster, name, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Forbidden"
    (event,) = events(cluster, name, "Forbidden")
    assert event["type"] == "Warning" and "cannot create resource" in event["message"]
    await asyncio.sleep(10 * INTERVAL)  # it keeps trying, but tells it once
    assert len(events(cluster, name, "Forbidden")) == 1
    assert operator.runtime.metrics.errors.labels("api_403")._value.get() >= 2

    # Once the permission is granted, the Swarm converges without anyone touching it.
    cluster.emulator.refusals.remove(FORBIDDEN)

    async def healed() -> bool:
        ready = await condition(cluster, name)
        assert ready.get("phase") == "Ready" and ready["status"] == "True", ready
        return True
    await eventually(healed, 20, "the Swarm to heal")


async def test_an_invalid_object_is_reported_with_the_servers_answer(cluster: Cluster, operator: Operator) -> None:
    cluster.controllers.all_ready = True
    doc = swarm()
    name = doc["metadata"]["name"]
    await cluster.kubectl.apply(yaml.safe_dump(doc))
    await eventually(lambda: _phase(cluster, name, "Ready"), 20, "Ready")
    cluster.emulator.refusals.append(INVALID)
    bigger = swarm()
    bigger["spec"]["pools"][0]["minServers"] = 4  # a rollout: the route map changes
    await cluster.kubectl.apply(yaml.safe_dump(bigger))

    async def reported() -> dict[str, Any]:
        ready = await condition(cluster, name)
        assert ready.get("reason") == "Invalid", ready
        return ready
    ready = await eventually(reported, 20, "the refusal in the status")
    assert "PATCH /api/v1/namespaces/default/configmaps/smollm2-cpu-routemap" in ready["message"]
    assert "Too long" in ready["message"]
    assert events(cluster, name, "Invalid")
    assert operator.running


async def _phase(cluster: Cluster, name: str, phase: str) -> bool:
    current = await condition(cluster, name)
    assert current.get("phase") == phase, current
    return True

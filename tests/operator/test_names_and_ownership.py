"""Names and ownership: the objects of two Swarms never share a name, and the operator never takes over an object
that is not its Swarm's (it reports the conflict instead)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmswarm_core.spans import Span
from llmswarm_operator import manifests as m
from llmswarm_operator.kubeapi import KubeClient, OwnershipConflict, apply
from tests.operator.cluster import running_cluster
from tests.operator.conftest import Cluster, Operator, eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME = st.from_regex(r"[a-z]([-a-z0-9]{0,28}[a-z0-9])?", fullmatch=True)
POOL = st.from_regex(r"[a-z]([-a-z0-9]{0,14}[a-z0-9])?", fullmatch=True)


def test_swarm_a_b_pool_c_and_swarm_a_pool_b_c_get_different_names() -> None:
    span = Span(0, 10)
    assert m.server_name("a-b", "c", span, 0) != m.server_name("a", "b-c", span, 0)
    assert m.server_name("a-b", "c", span, 0).startswith("a-b-c-")  # still readable


def test_the_longest_names_fit_a_dns_label() -> None:
    name = m.server_name("s" * 30, "p" * 16, Span(1023, 1024), 999)
    assert len(name) <= 63 and DNS_1035.match(name), name


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAME, POOL, st.integers(0, 1023), st.integers(1, 1024), st.integers(0, 999)), min_size=2, max_size=6,
                unique=True))
def test_distinct_servers_have_distinct_dns_names(servers: list[tuple[str, str, int, int, int]]) -> None:
    names = {}
    for swarm, pool, start, length, ordinal in servers:
        name = m.server_name(swarm, pool, Span(start, start + length), ordinal)
        assert len(name) <= 63 and DNS_1035.match(name), name
        assert name not in {m.routemap_name(s) for s, *_ in servers}  # nor another Swarm's route map
        names[name] = (swarm, pool, start, length, ordinal)
    assert len(names) == len(servers), names


# ---- apply() keeps its hands off what is not its own ---------------------------------------------------------------

def deployment(name: str, owner: m.Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "labels": {"app": "mine"}}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "mine"}},
                     "template": {"metadata": {"labels": {"app": "mine"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}


async def test_apply_never_takes_over_an_object_it_does_not_own(tmp_path: Path) -> None:
    ours, theirs = m.Owner("a", "default", "uid-a"), m.Owner("b", "default", "uid-b")
    async with running_cluster(tmp_path) as (_, url, _, _):
        kube = KubeClient()
        kube.use(kopf.ConnectionInfo(server=url))
        try:
            await kube.create(deployment("by-hand", None))
            await kube.create(deployment("of-b", theirs))
            for name, holder in (("by-hand", "no owner"), ("of-b", "Swarm b")):
                with pytest.raises(OwnershipConflict) as raised:
                    await apply(kube, deployment(name, ours))
                assert raised.value.kind == "Deployment" and raised.value.name == name
                assert holder in str(raised.value)
                stored = await kube.get("Deployment", "default", name)
                assert stored is not None and "annotations" not in stored["metadata"], "it was patched"
            assert await apply(kube, deployment("of-a", ours)) == "created"
            assert await apply(kube, {**deployment("of-a", ours), "spec": {"replicas": 2}}) == "updated"
        finally:
            await kube.close()


async def test_a_conflict_is_reported_in_status_and_events_and_the_rest_goes_on(cluster: Cluster, operator: Operator) -> None:
    doc = yaml.safe_load((EXAMPLES / "swarm-cpu.yaml").read_text())
    name = doc["metadata"]["name"]
    other = {**doc, "metadata": {"name": "other"}}
    cluster.controllers.all_ready = True
    await cluster.kubectl.apply(yaml.safe_dump(other))
    other_uid = (await cluster.kubectl.get_json("swarm", "other"))["metadata"]["uid"]
    # Someone's own Deployment under the route map's name, and a budget of another Swarm under the servers' budget's.
    mine = deployment(m.routemap_name(name), None)
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
              "metadata": {"name": m.disruption_budget_name(name), "namespace": "default",
                           "ownerReferences": [m.Owner("other", "default", other_uid).reference()]},
              "spec": {"maxUnavailable": 5, "selector": {"matchLabels": {"x": "y"}}}}
    await cluster.kubectl.apply(yaml.safe_dump_all([mine, budget]))
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def reported() -> dict[str, Any]:
        status = (await cluster.kubectl.get_json("swarm", name)).get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        assert ready.get("reason") == "ObjectConflict", ready
        return status
    status = await eventually(reported, 60, "the conflict in the status")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "ObjectConflict"
    message = conditions["Degraded"]["message"]
    assert f"Deployment {m.routemap_name(name)}" in message and "no owner" in message
    assert f"PodDisruptionBudget {m.disruption_budget_name(name)}" in message and "Swarm other" in message
    async def warned() -> bool:  # the Event may be posted after the status patch
        events = [e for e in cluster.controllers.live("events") if e.get("involvedObject", {}).get("name") == name]
        assert any(e.get("reason") == "ObjectConflict" and e.get("type") == "Warning" for e in events), events
        return True
    await eventually(warned, 30, "the ObjectConflict Event")
    # Nothing of theirs was touched; everything else of the Swarm is there.
    stored = await cluster.kubectl.get_json("deployment", m.routemap_name(name))
    assert "ownerReferences" not in stored["metadata"] and stored["spec"]["template"]["spec"]["containers"][0]["image"] == "x"
    stored_budget = next(b for b in cluster.controllers.live("poddisruptionbudgets") if b["metadata"]["name"] == budget["metadata"]["name"])
    assert stored_budget["spec"]["maxUnavailable"] == 5
    async def three_servers() -> bool:
        servers = [d for d in cluster.controllers.live("deployments")
                   if (d["metadata"].get("labels") or {}).get(m.LABEL_SWARM) == name and m.LABEL_SERVER in d["metadata"]["labels"]]
        assert len(servers) == 3, servers
        return True
    await eventually(three_servers, 30, "the Swarm's three servers")
    assert operator.running

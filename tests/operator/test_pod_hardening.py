"""What a real cluster asks of the pods the operator makes: the restricted Pod Security profile, pull secrets,
no service-account token, a disruption budget, spreading over nodes, ephemeral storage, a runtime class, and no
GPU device for pods that ask for none."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmswarm_core.spans import coverage
from llmswarm_operator import manifests as m
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.swarm_spec import parse_spec, plan_placement
from tests.operator.conftest import Cluster, Operator, eventually
from tests.operator.pod_security import restricted_violations

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
SETTINGS = OperatorSettings(image="ghcr.io/llmswarm/node:test")
OWNER = m.Owner("demo", "llm", "0a1b2c3d-0000-0000-0000-000000000000")


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def deployments(doc: dict[str, Any], settings: OperatorSettings = SETTINGS) -> list[dict[str, Any]]:
    spec = parse_spec(doc["spec"])
    _, cost, placement = plan_placement(spec)
    out = [m.routemap_deployment(OWNER, spec, settings)]
    out += [m.server_deployment(OWNER, spec, cost, server, settings) for server in m.desired_servers(OWNER.name, placement)]
    return out


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


# ---- the restricted profile ---------------------------------------------------------------------------------------

GOOD_POD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "v", "emptyDir": {}}],
}

BREAKS = [
    ("hostNetwork", lambda p: p.update(hostNetwork=True), "hostNetwork"),
    ("hostPID", lambda p: p.update(hostPID=True), "hostPID"),
    ("hostIPC", lambda p: p.update(hostIPC=True), "hostIPC"),
    ("hostPath", lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    ("privileged", lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    ("escalation", lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    ("drop", lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "drop"),
    ("add", lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "SYS_ADMIN"),
    ("root", lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    ("root-override", lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    ("uid0", lambda p: p["securityContext"].update(runAsUser=0), "runAsUser is 0"),
    ("seccomp", lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    ("unconfined", lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}), "Unconfined"),
    ("hostPort", lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    ("sysctl", lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "kernel.msgmax"),
    ("init", lambda p: p.update(initContainers=[{"name": "i"}]), "initContainers[i]"),
]


def test_the_restricted_check_passes_a_good_pod_and_names_each_broken_rule() -> None:
    assert restricted_violations(GOOD_POD) == []
    for what, breaks, expected in BREAKS:
        bad = copy.deepcopy(GOOD_POD)
        breaks(bad)
        found = restricted_violations(bad)
        assert any(expected in line for line in found), (what, found)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_operator_pods_pass_the_restricted_profile(name: str) -> None:
    for deployment in deployments(example(name)):
        template = deployment["spec"]["template"]
        assert restricted_violations(template["spec"], template["metadata"]) == [], deployment["metadata"]["name"]
        spec = template["spec"]
        # Servers never talk to the API; the route map watches its ConfigMap with an account of its own.
        own_account = deployment["metadata"]["name"] == m.routemap_name(OWNER.name)
        assert spec["automountServiceAccountToken"] is own_account
        assert spec.get("serviceAccountName") == (m.routemap_name(OWNER.name) if own_account else None)
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {v["mountPath"] for v in container["volumeMounts"]}
            assert "/tmp" in mounts, "Python and torch need a writable /tmp on a read-only root filesystem"


# ---- pull secrets, runtime class, ephemeral storage, GPU devices ----------------------------------------------------

def test_image_pull_secrets_come_from_the_settings_and_the_swarm() -> None:
    doc = example("swarm-cpu.yaml")
    assert all("imagePullSecrets" not in pod(d) for d in deployments(doc))
    settings = dataclasses.replace(SETTINGS, image_pull_secrets=("regcred",))
    for deployment in deployments(doc, settings):
        assert pod(deployment)["imagePullSecrets"] == [{"name": "regcred"}]
    doc["spec"]["imagePullSecrets"] = [{"name": "team"}, {"name": "regcred"}]
    for deployment in deployments(doc, settings):
        assert pod(deployment)["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team"}]
    assert OperatorSettings.from_env({"LLMSWARM_OPERATOR_IMAGE_PULL_SECRETS": "a, b"}).image_pull_secrets == ("a", "b")


def test_runtime_class_comes_from_the_pool() -> None:
    doc = example("swarm-heterogeneous.yaml")
    doc["spec"]["pools"][0]["runtimeClassName"] = "nvidia"
    first = doc["spec"]["pools"][0]["name"]
    servers = [d for d in deployments(doc) if d["metadata"]["labels"].get(m.LABEL_POOL)]
    assert {d["metadata"]["labels"][m.LABEL_POOL]: pod(d).get("runtimeClassName") for d in servers} == {
        p["name"]: ("nvidia" if p["name"] == first else None) for p in doc["spec"]["pools"]}


def test_servers_request_ephemeral_storage_for_what_they_hold() -> None:
    """Without a model store a server fetches the whole model into its own disk (an emptyDir limited to what it
    requests); with one, it holds no model file: scratch space only."""
    doc = example("swarm-70b-int8.yaml")
    doc["spec"].pop("modelStore", None)
    doc["spec"]["model"].pop("revision", None)
    spec = parse_spec(doc["spec"])
    shape, cost, placement = plan_placement(spec)
    for server in m.desired_servers(OWNER.name, placement):
        spec_pod = pod(m.server_deployment(OWNER, spec, cost, server, SETTINGS))
        container = spec_pod["containers"][0]
        requested = container["resources"]["requests"]["ephemeral-storage"]
        assert requested.endswith("Mi")
        # Every block's weights as downloaded (16-bit for an int8 Swarm), plus room for the runtime.
        assert int(requested[:-2]) * 2**20 >= 2 * cost.weight_bytes * shape.num_blocks + 2**30
        assert {"name": "cache", "emptyDir": {"sizeLimit": requested}} in spec_pod["volumes"]
    stored = parse_spec(example("swarm-70b-int8.yaml")["spec"])
    assert stored.model_store is not None
    for server in m.desired_servers(OWNER.name, placement):
        container = pod(m.server_deployment(OWNER, stored, cost, server, SETTINGS))["containers"][0]
        assert container["resources"]["requests"]["ephemeral-storage"] == f"{m.SCRATCH_BYTES // 2**20}Mi"
    routemap = pod(m.routemap_deployment(OWNER, spec, SETTINGS))["containers"][0]
    assert "ephemeral-storage" in routemap["resources"]["requests"]
    # A request the pool gives wins.
    doc["spec"]["pools"][0]["resources"]["requests"] = {"ephemeral-storage": "500Gi"}
    spec = parse_spec(doc["spec"])
    pool = doc["spec"]["pools"][0]["name"]
    server = next(s for s in m.desired_servers(OWNER.name, plan_placement(spec)[2]) if s.pool == pool)
    container = pod(m.server_deployment(OWNER, spec, cost, server, SETTINGS))["containers"][0]
    assert container["resources"]["requests"]["ephemeral-storage"] == "500Gi"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_pods_without_a_gpu_limit_see_no_gpu(name: str) -> None:
    for deployment in deployments(example(name)):
        for container in pod(deployment)["containers"]:
            limits = (container.get("resources") or {}).get("limits") or {}
            visible = env(container).get("NVIDIA_VISIBLE_DEVICES")
            if "nvidia.com/gpu" in limits:
                assert visible is None  # the device plugin sets it to the GPUs it gave
            else:
                assert visible == "void", deployment["metadata"]["name"]  # not the image's "all"


# ---- disruption budget and spreading ------------------------------------------------------------------------------

@pytest.mark.parametrize("redundancy", [1, 2, 3])
def test_the_disruption_budget_never_lets_evictions_take_every_server_of_a_block(redundancy: int) -> None:
    doc = example("swarm-cpu.yaml")
    doc["spec"]["redundancy"] = redundancy
    doc["spec"]["pools"][0]["maxServers"] = 12
    spec = parse_spec(doc["spec"])
    shape, cost, placement = plan_placement(spec)
    servers = m.desired_servers(OWNER.name, placement)
    fewest = min(coverage(shape.num_blocks, [s.span for s in servers]))
    budget = m.server_disruption_budget(OWNER, fewest)
    assert budget["apiVersion"] == "policy/v1" and budget["kind"] == "PodDisruptionBudget"
    assert budget["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a pod that serves nothing may go
    allowed = budget["spec"]["maxUnavailable"]
    pods = {s.name: pod(m.server_deployment(OWNER, spec, cost, s, SETTINGS)) for s in servers}
    labels = {s.name: m.server_deployment(OWNER, spec, cost, s, SETTINGS)["spec"]["template"]["metadata"]["labels"] for s in servers}
    selector = budget["spec"]["selector"]["matchLabels"]
    assert all(selector.items() <= labels[s.name].items() for s in servers), "the budget must cover every server"
    routemap_labels = m.routemap_deployment(OWNER, spec, SETTINGS)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= routemap_labels.items()
    # Whichever `allowed` servers are evicted at once, every block keeps a server.
    for evicted in itertools.combinations(servers, allowed):
        left = [s.span for s in servers if s not in evicted]
        assert min(coverage(shape.num_blocks, left)) >= 1, [s.name for s in evicted]
    assert allowed == fewest - 1 >= redundancy - 1  # as many as the weakest block can spare
    assert pods  # built


def test_replicas_of_the_same_blocks_prefer_different_nodes() -> None:
    doc = example("swarm-cpu.yaml")
    doc["spec"]["redundancy"] = 2
    doc["spec"]["pools"][0]["maxServers"] = 6
    spec = parse_spec(doc["spec"])
    _, cost, placement = plan_placement(spec)
    servers = m.desired_servers(OWNER.name, placement)
    built = {s.name: m.server_deployment(OWNER, spec, cost, s, SETTINGS)["spec"]["template"] for s in servers}
    same = [(a, b) for a, b in itertools.permutations(servers, 2) if a.span == b.span]
    assert same, "the placement should hold equal spans twice"
    for a, b in itertools.permutations(servers, 2):
        affinity = built[a.name]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        term = affinity[0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        avoids = term["labelSelector"]["matchLabels"].items() <= built[b.name]["metadata"]["labels"].items()
        assert avoids == (a.span == b.span), (a.name, b.name)
    for template in built.values():
        (spread,) = template["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert all(spread["labelSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items() for t in built.values())


# ---- in the emulated cluster --------------------------------------------------------------------------------------

async def test_the_operator_applies_the_disruption_budget(cluster: Cluster, operator: Operator) -> None:
    doc = example("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    doc["spec"]["redundancy"] = 2
    doc["spec"]["pools"][0]["maxServers"] = 6
    cluster.controllers.all_ready = True
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def budget() -> dict[str, Any]:
        found = [b for b in cluster.controllers.live("poddisruptionbudgets") if b["metadata"]["name"] == m.disruption_budget_name(name)]
        assert found, "no PodDisruptionBudget yet"
        return found[0]
    pdb = await eventually(budget, what="the PodDisruptionBudget")
    swarm = await cluster.kubectl.get_json("swarm", name)
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == swarm["metadata"]["uid"]
    _, _, placement = plan_placement(parse_spec(doc["spec"]))
    assert pdb["spec"]["maxUnavailable"] == min(placement.coverage) - 1 >= 1

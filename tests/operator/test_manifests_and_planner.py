"""Pure parts of the reconciler: manifest builders, the server planner, the status, the apply patch."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmswarm_core.routemap import ModelInfo
from llmswarm_core.spans import Span
from llmswarm_operator import manifests as m
from llmswarm_operator.kubeapi import (
    APPLIED_ANNOTATION,
    HASH_ANNOTATION,
    applied_keys,
    manifest_hash,
    merge,
    removals,
    with_hash,
)
from llmswarm_operator.planner import ExistingServer, online_coverage, plan_servers, pod_ready, ready_servers, route_map
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.status import Seen, invalid_status, swarm_status
from llmswarm_operator.swarm_spec import parse_spec, plan_placement

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SETTINGS = OperatorSettings(image="ghcr.io/llmswarm/node:test")
OWNER = m.Owner("demo", "llm", "0a1b2c3d-0000-0000-0000-000000000000")


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def built(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_spec(doc["spec"])
    shape, cost, placement = plan_placement(spec)
    objects = [m.routemap_deployment(OWNER, spec, SETTINGS), m.routemap_service(OWNER, spec)]
    for server in m.desired_servers(OWNER.name, placement):
        objects += [m.server_deployment(OWNER, spec, cost, server, SETTINGS), m.server_service(OWNER, spec, server)]
    model = ModelInfo(name=shape.name, num_blocks=shape.num_blocks, hidden_size=shape.hidden_size)
    objects.append(m.routemap_configmap(OWNER, route_map(model, [], {}, spec.model.dtype, None)))
    return objects


@pytest.mark.parametrize("name", ["swarm-cpu.yaml", "swarm-heterogeneous.yaml", "swarm-70b-int8.yaml"])
def test_manifests_are_valid_kubernetes_objects(name: str) -> None:
    for obj in built(example(name)):
        kubernetes_validate.validate(with_hash(obj), "1.37", strict=True)
        meta = obj["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["ownerReferences"] == [OWNER.reference()]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"} <= set(meta["labels"])
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= pod_labels.items()
            assert "app.kubernetes.io/version" not in selector and "app.kubernetes.io/version" not in pod_labels
        if obj["kind"] == "Service":
            assert len(meta["name"]) <= 63


def test_routemap_deployment_runs_the_route_map_on_the_mounted_record() -> None:
    from llmswarm_control.routemap_service import build_parser

    spec = parse_spec(example("swarm-cpu.yaml")["spec"])
    deployment = m.routemap_deployment(OWNER, spec, SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["python", "-m"]
    module = importlib.import_module(container["command"][2])
    assert module.build_parser is build_parser  # the module the command names is the service
    args = build_parser().parse_args(container["args"])
    mount, adapters, scratch = container["volumeMounts"]
    assert args.routes.parent.as_posix() == mount["mountPath"] and args.routes.name == m.ROUTES_FILE
    assert args.adapter_dir.as_posix() == adapters["mountPath"]  # published adapters outlive a restart
    assert pod["volumes"] == [{"name": mount["name"], "configMap": {"name": m.routemap_name(OWNER.name)}},
                              {"name": adapters["name"], "emptyDir": {"sizeLimit": "2Gi"}},
                              {"name": scratch["name"], "emptyDir": {"sizeLimit": "1Gi"}}]
    assert scratch["mountPath"] == "/tmp"  # the root filesystem is read-only
    assert args.port == spec.route_map.port == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready once it has read the record
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_server_deployment_runs_llmswarm_serve_for_its_span() -> None:
    doc = example("swarm-70b-int8.yaml")
    spec = parse_spec(doc["spec"])
    _, cost, placement = plan_placement(spec)
    server = next(s for s in m.desired_servers(OWNER.name, placement) if s.pool == "l4")
    deployment = m.server_deployment(OWNER, spec, cost, server, SETTINGS)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    # The example has a model store: the model's directory there (tests/operator/test_model_store.py).
    assert args[:2] == ["serve", "--model"] and args[2] == f"{m.MODELS_DIR}/{m.store_key(spec)}"
    assert args[args.index("--blocks") + 1] == str(server.span)
    assert args[args.index("--quantization") + 1] == "int8"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert int(args[args.index("--kv-cache-bytes") + 1]) == cost.cache_bytes * len(server.span)
    assert args[args.index("--public-url") + 1] == f"http://{server.name}.llm.svc.cluster.local:8701"
    assert args[args.index("--swarm") + 1] == "http://demo-routemap.llm.svc.cluster.local:8700"
    assert container["image"] == "ghcr.io/llmswarm/node:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"llmswarm.dev/gpu": "l4-24gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert server.name == f"demo-l4-{m.pool_key('demo', 'l4')}-{server.span.start}-{server.span.end}-0"
    image_spec = parse_spec({**doc["spec"], "image": "mine:1"})
    assert m.server_deployment(OWNER, image_spec, cost, server, SETTINGS)["spec"]["template"]["spec"]["containers"][0][
        "image"] == "mine:1"


def test_equal_spans_get_distinct_names() -> None:
    spec = parse_spec({"pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 2, "blocksPerServer": 30}],
                       "redundancy": 2})
    _, _, placement = plan_placement(spec)
    key = m.pool_key("demo", "cpu")
    assert [s.name for s in m.desired_servers("demo", placement)] == [f"demo-cpu-{key}-0-30-0", f"demo-cpu-{key}-0-30-1"]


# ---- the planner ---------------------------------------------------------------------------------------------------


def d(name: str, start: int, end: int) -> m.DesiredServer:
    return m.DesiredServer(name, "cpu", Span(start, end))


def e(name: str, start: int, end: int, draining: float | None = None) -> ExistingServer:
    return ExistingServer(name, "cpu", Span(start, end), draining)


OLD = {"a": e("a", 0, 10), "b": e("b", 10, 20), "c": e("c", 20, 30)}
NEW = [d("w", 0, 8), d("x", 8, 16), d("y", 16, 23), d("z", 23, 30)]


def plan(existing: dict[str, ExistingServer], ready: set[str], now: float = 100.0, drain: float = 30.0,
         redundancy: int = 1) -> Any:
    return plan_servers(NEW, existing, {n: True for n in ready}, num_blocks=30, redundancy=redundancy, now=now,
                        drain_seconds=drain)


def test_old_servers_stay_online_until_new_ones_are_ready() -> None:
    p = plan(OLD, {"a", "b", "c"})
    assert p.drain == [] and p.delete == [] and not p.converged
    states = {x.name: x.state for x in p.entries}
    assert states == {"w": "joining", "x": "joining", "y": "joining", "z": "joining", "a": "online", "b": "online",
                      "c": "online"}
    assert min(online_coverage(30, p.entries)) == 1


def test_an_old_server_goes_once_its_blocks_are_covered_by_new_ones() -> None:
    existing = {**OLD, **{s.name: e(s.name, s.span.start, s.span.end) for s in NEW}}
    p = plan(existing, {"a", "b", "c", "w", "x"})  # [0, 16) covered by new servers: only "a" may go
    assert p.drain == ["a"] and p.delete == []
    assert {x.name: x.state for x in p.entries if not x.desired} == {"a": "draining", "b": "online", "c": "online"}
    assert min(online_coverage(30, p.entries)) == 1


def test_draining_lasts_drain_seconds_then_the_server_is_deleted() -> None:
    existing = {**OLD, **{s.name: e(s.name, s.span.start, s.span.end) for s in NEW}}
    existing["a"] = e("a", 0, 10, draining=90.0)
    ready = {"a", "b", "c", "w", "x", "y", "z"}
    assert plan(existing, ready, now=100.0, drain=30.0).delete == []
    later = plan(existing, ready, now=121.0, drain=30.0)
    assert later.delete == ["a"] and sorted(later.drain) == ["b", "c"]
    assert {x.name for x in later.entries} == {"w", "x", "y", "z", "b", "c"}
    assert later.converged is False  # b and c still draining
    done = plan({n: e(n, s.span.start, s.span.end) for n, s in ((s.name, s) for s in NEW)}, {"w", "x", "y", "z"})
    assert done.converged and done.delete == [] and done.drain == []


def test_a_draining_server_comes_back_when_needed_again() -> None:
    existing = {**OLD, "w": e("w", 0, 8), "x": e("x", 8, 16), "y": e("y", 16, 23), "z": e("z", 23, 30)}
    existing["a"] = e("a", 0, 10, draining=95.0)
    p = plan(existing, {"a", "b", "c", "x"})  # the new server w failed: a is needed for [0, 8)
    assert "a" in p.undrain
    assert {x.name: x.state for x in p.entries}["a"] == "online"


def test_old_servers_that_are_not_ready_are_deleted_at_once() -> None:
    p = plan(OLD, {"a"})
    assert sorted(p.delete) == ["b", "c"] and p.drain == []


def test_redundancy_counts_in_the_decision() -> None:
    existing = {**OLD, "w": e("w", 0, 8), "x": e("x", 8, 16)}
    p = plan(existing, {"a", "b", "c", "w", "x"}, redundancy=2)
    assert p.drain == [] and p.delete == []  # removing a would leave [0, 10) with one server


def test_route_map_version_moves_only_when_the_map_changes() -> None:
    model = ModelInfo(name="m", num_blocks=30, hidden_size=8)
    p = plan(OLD, {"a", "b", "c"})
    urls = {x.name: f"http://{x.name}:8701" for x in p.entries}
    first = route_map(model, p.entries, urls, "float32", None)
    assert first.version == 1
    assert route_map(model, p.entries, urls, "float32", first).version == 1
    q = plan({**OLD, "w": e("w", 0, 8)}, {"a", "b", "c", "w"})
    assert route_map(model, q.entries, urls, "float32", first).version == 2
    assert [s.start for s in first.servers] == sorted(s.start for s in first.servers)


def test_pod_readiness() -> None:
    ready = {"metadata": {"labels": {"llmswarm.dev/server": "a"}}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    unready = {"metadata": {"labels": {"llmswarm.dev/server": "b"}}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    leaving = {"metadata": {"labels": {"llmswarm.dev/server": "c"}, "deletionTimestamp": "now"}, **{"status": ready["status"]}}
    assert pod_ready(ready) and not pod_ready(unready) and not pod_ready(leaving) and not pod_ready({})
    assert ready_servers([ready, unready, leaving, unready | {"metadata": {"labels": {"llmswarm.dev/server": "a"}}}],
                         "llmswarm.dev/server") == {"a": True, "b": False, "c": False}


# ---- status ------------------------------------------------------------------------------------------------------


def seen(p: Any, feasible_doc: dict[str, Any] | None = None) -> Seen:
    spec = parse_spec((feasible_doc or example("swarm-cpu.yaml"))["spec"])
    _, _, placement = plan_placement(spec)
    return Seen(redundancy=spec.redundancy, placement=placement, plan=p, online_coverage=online_coverage(30, p.entries),
                routemap_version=3, routemap_url="http://rm:8700", routemap_configmap="demo-routemap", generation=4)


def test_status_phases_and_conditions() -> None:
    fresh = plan_servers(NEW, {}, {}, num_blocks=30, redundancy=1, now=0, drain_seconds=0)
    pending = swarm_status(seen(fresh), None, now="2026-01-01T00:00:00Z")
    assert pending["phase"] == "Pending" and pending["readyServers"] == "0/4"
    assert pending["coverage"]["uncoveredBlocks"] == list(range(30))
    rolling = swarm_status(seen(plan(OLD, {"a", "b", "c"})), pending, now="2026-01-01T00:01:00Z")
    assert rolling["phase"] == "Progressing" and rolling["coverage"]["minReplicas"] == 1
    done_plan = plan({s.name: e(s.name, s.span.start, s.span.end) for s in NEW}, {"w", "x", "y", "z"})
    ready = swarm_status(seen(done_plan), rolling, now="2026-01-01T00:02:00Z")
    assert ready["phase"] == "Ready" and ready["observedGeneration"] == 4 and ready["routeMap"]["version"] == 3
    conditions = {c["type"]: c for c in ready["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Ready"]["lastTransitionTime"] == "2026-01-01T00:02:00Z"
    assert conditions["Degraded"]["status"] == "False"
    # Degraded was False all along: its transition time stays the first one.
    assert conditions["Degraded"]["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    broken = invalid_status("spec.redundancy: too low", 5, ready, now="2026-01-01T00:03:00Z")
    assert broken["phase"] == "Failed" and broken["observedGeneration"] == 5
    assert {c["type"]: c["reason"] for c in broken["conditions"]} == {"Ready": "InvalidSpec", "Progressing": "InvalidSpec",
                                                                      "Degraded": "InvalidSpec"}


def test_infeasible_placement_is_degraded_with_the_reason() -> None:
    doc = example("swarm-cpu.yaml")
    doc["spec"]["redundancy"] = 4
    doc["spec"]["pools"][0]["maxServers"] = 3
    spec = parse_spec(doc["spec"])
    _, _, placement = plan_placement(spec)
    servers = m.desired_servers("demo", placement)
    p = plan_servers(servers, {s.name: ExistingServer(s.name, s.pool, s.span) for s in servers},
                     {s.name: True for s in servers}, num_blocks=30, redundancy=4, now=0, drain_seconds=0)
    status = swarm_status(Seen(4, placement, p, online_coverage(30, p.entries), 1, "u", "c"), None)
    assert status["phase"] == "Degraded" and status["placement"]["feasible"] is False
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "PlacementInsufficient" and "fewer than 4 servers" in degraded["message"]


# ---- apply: digest and three-way patch ---------------------------------------------------------------------------


def test_manifest_digest_and_three_way_patch() -> None:
    old = {"kind": "Service", "metadata": {"name": "s", "labels": {"a": "1", "b": "2"}}, "spec": {"ports": [1, 2]}}
    new = {"kind": "Service", "metadata": {"name": "s", "labels": {"a": "1"}}, "spec": {"ports": [1]}}
    annotated = with_hash(old)
    assert annotated["metadata"]["annotations"][HASH_ANNOTATION] == manifest_hash(old) == manifest_hash(annotated)
    assert manifest_hash(old) != manifest_hash(new)
    assert APPLIED_ANNOTATION in annotated["metadata"]["annotations"]
    assert removals(old, new) == {"metadata": {"labels": {"b": None}}}
    assert merge(new, removals(old, new))["metadata"]["labels"] == {"a": "1", "b": None}
    # What is recorded is the keys, not the values (a ConfigMap's data is not stored twice); it removes the same.
    recorded = json.loads(annotated["metadata"]["annotations"][APPLIED_ANNOTATION])
    assert recorded == applied_keys(old) == {"kind": 1, "metadata": {"name": 1, "labels": {"a": 1, "b": 1}}, "spec": {"ports": 1}}
    assert removals(recorded, new) == removals(old, new)
    big = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"routes.json": "x" * 500_000}}
    assert len(with_hash(big)["metadata"]["annotations"][APPLIED_ANNOTATION]) < 100


def test_token_secret_reaches_servers_and_route_map() -> None:
    from llmswarm_operator.manifests import token_env
    from llmswarm_operator.settings import OperatorSettings

    assert token_env(OperatorSettings()) == []
    env = token_env(OperatorSettings(token_secret="swarm-token:key1"))
    assert env == [{"name": "LLMSWARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "swarm-token", "key": "key1"}}}]
    assert token_env(OperatorSettings(token_secret="swarm-token"))[0]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert OperatorSettings.from_env({"LLMSWARM_OPERATOR_TOKEN_SECRET": "s"}).token_secret == "s"


def test_token_secret_in_rendered_deployments() -> None:
    import dataclasses

    settings = dataclasses.replace(SETTINGS, token_secret="swarm-token")
    spec = parse_spec(example("swarm-cpu.yaml")["spec"])
    _, cost, placement = plan_placement(spec)
    server = m.desired_servers(OWNER.name, placement)[0]
    wanted = {"name": "LLMSWARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "swarm-token", "key": "token"}}}
    for deployment in (m.server_deployment(OWNER, spec, cost, server, settings), m.routemap_deployment(OWNER, spec, settings)):
        assert wanted in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert all(e["name"] != "LLMSWARM_TOKEN" for e in m.routemap_deployment(OWNER, spec, SETTINGS)["spec"]["template"]["spec"]
               ["containers"][0]["env"])


def test_timestamps_round_trip() -> None:
    from llmswarm_operator.timestamps import epoch, iso

    assert iso(0) == "1970-01-01T00:00:00Z" and iso(1.5, fraction=True) == "1970-01-01T00:00:01.500000Z"
    assert epoch(iso(1.5, fraction=True)) == 1.5 and epoch("1970-01-01T00:00:02Z") == 2.0
    assert epoch(None) is None and epoch("") is None and epoch("yesterday") is None

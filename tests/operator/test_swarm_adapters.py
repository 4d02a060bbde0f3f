"""Adapters on Kubernetes (issue #17): spec.adapters preloaded by every server from a ConfigMap or an image path,
published adapters kept on the route map's claim across its pods, and status listing them."""

from __future__ import annotations

import copy

import pytest

from llmswarm_operator import manifests as m
from llmswarm_operator.swarm_spec import InvalidSpec, parse_spec
from tests.operator.test_pod_hardening import deployments, example, pod


def with_adapters(**route_map: str) -> dict:
    doc = example("swarm-cpu.yaml")
    doc["spec"]["adapters"] = [{"name": "support-v2", "configMap": "support-v2-adapter"},
                               {"name": "sql", "path": "/opt/adapters/sql"}, {"name": "hub", "hub": "acme/sql-lora@v2"}]
    doc["spec"]["routeMap"].update(route_map)
    return doc


def test_servers_load_the_specs_adapters_from_configmaps_and_paths() -> None:
    _, *servers = deployments(with_adapters())
    for server in servers:
        spec = pod(server)
        container = spec["containers"][0]
        args = container["args"]
        loaded = [args[i + 1] for i, a in enumerate(args) if a == "--adapters"]
        assert loaded == [f"support-v2={m.PRELOADED_DIR}/support-v2", "sql=/opt/adapters/sql", "hub=hub:acme/sql-lora@v2"]
        assert {"name": "adapter-0", "configMap": {"name": "support-v2-adapter"}} in spec["volumes"]
        assert {"name": "adapter-0", "mountPath": f"{m.PRELOADED_DIR}/support-v2", "readOnly": True} in container["volumeMounts"]
    # The server's own parser takes every one of them (repeated --adapters add up).
    from llmswarm_cli.main import build_parser

    parsed = build_parser().parse_args(pod(servers[0])["containers"][0]["args"])
    assert parsed.adapters == loaded
    assert m.adapter_sources(parse_spec(with_adapters()["spec"])) == [
        {"name": "support-v2", "source": "configMap/support-v2-adapter"}, {"name": "sql", "source": "path:/opt/adapters/sql"},
        {"name": "hub", "source": "hub:acme/sql-lora@v2"}]


def test_published_adapters_live_on_the_claim_when_one_is_given() -> None:
    routemap = deployments(with_adapters())[0]
    container = pod(routemap)["containers"][0]
    assert container["args"][container["args"].index("--adapter-dir") + 1] == m.ADAPTERS_DIR
    assert {"name": "adapters", "emptyDir": {"sizeLimit": "2Gi"}} in pod(routemap)["volumes"]
    assert routemap["spec"]["strategy"] == {"type": "RollingUpdate"}
    kept = deployments(with_adapters(adapterClaim="llm-adapters"))[0]
    assert {"name": "adapters", "persistentVolumeClaim": {"claimName": "llm-adapters"}} in pod(kept)["volumes"]
    assert kept["spec"]["strategy"] == {"type": "Recreate"}  # one pod holds the claim at a time


@pytest.mark.parametrize("adapters, message", [
    ([{"name": "x"}], "exactly one of configMap, path and hub"),
    ([{"name": "x", "configMap": "a", "path": "/a"}], "exactly one of configMap, path and hub"),
    ([{"name": "x", "hub": "not a repo"}], "hub"),
    ([{"name": "x", "path": "relative"}], "path"),
    ([{"name": "../x", "path": "/a"}], "name"),
    ([{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}], "unique"),
])
def test_bad_adapter_sources_are_refused(adapters: list, message: str) -> None:
    doc = copy.deepcopy(example("swarm-cpu.yaml"))
    doc["spec"]["adapters"] = adapters
    with pytest.raises(InvalidSpec, match=message):
        parse_spec(doc["spec"])



"""The Helm chart through the real Helm v4 engine: lint, render, Kubernetes schemas, conventions, values schema.

Scenarios: the default values and every charts/llmswarm/ci/*-values.yaml (all toggles on; minimal).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import HelmError, HelmValuesError

from llmswarm_operator import manifests as operator_manifests
from llmswarm_operator.settings import PREFIX, OperatorSettings
from tests.chart.cluster import granted
from tests.chart.crd_schema import VALUES_SCHEMA, crd_spec_schema, swarm_schema, swarm_spec_values_schema
from tests.chart.rendering import (
    CHART_DIR,
    NAMESPACE,
    PROMETHEUS_OPERATOR,
    RELEASE,
    Rendered,
    crd_documents,
    env_of,
    load_chart,
    merge,
    pod_templates,
    render,
    scenario_files,
    scenario_values,
    selector_matches,
)
from tests.operator.pod_security import restricted_violations

K8S_VERSION = "1.37"
SCENARIOS = list(scenario_files())
VALUES_FILE = CHART_DIR / "values.yaml"
CRD_KINDS = {"Swarm", "ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    """Each scenario, as installed into a cluster that runs the Prometheus Operator."""
    return {name: render(scenario_values(name), api_versions=PROMETHEUS_OPERATOR) for name in SCENARIOS}


def test_the_ci_scenarios_are_there() -> None:
    assert set(SCENARIOS) >= {"default", "all-on", "minimal"}


# ---- lint and render ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict_finds_no_error_or_warning(scenario: str) -> None:
    report = helm_python.lint(str(CHART_DIR), scenario_values(scenario), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{K8S_VERSION}.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious
    # The only remark left is the missing icon (severity 1, "info"): the project has no logo yet.
    assert [m["error"] for m in report["messages"]] in ([], ["icon is recommended"])


def test_chart_metadata() -> None:
    chart = load_chart()
    try:
        meta = chart.metadata
    finally:
        chart.close()
    assert meta["apiVersion"] == "v2" and meta["name"] == "llmswarm" and meta["type"] == "application"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert meta["appVersion"] == operator_manifests.package_version(), "appVersion must be the project's version (the image tag)"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_renders_the_expected_objects(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    always = {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    assert always <= set(r.kinds())
    assert r.get("Deployment", f"{RELEASE}-operator")
    expected = {
        "default": ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "RoleBinding", "Service",
                    "ServiceAccount"],
        "minimal": ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "RoleBinding", "ServiceAccount"],
        "all-on": ["ClusterKopfPeering", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ConfigMap",
                   "Deployment", "Deployment", "Ingress", "Job", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "Pod",
                   "PodMonitor", "Role", "RoleBinding", "Secret", "Service", "Service", "Service", "ServiceAccount", "ServiceAccount",
                   "ServiceMonitor", "ServiceMonitor", "Swarm"],
    }
    if scenario in expected:
        assert r.kinds() == expected[scenario]
    names = [(m["kind"], m["metadata"]["name"]) for m in r.manifests]
    assert len(names) == len(set(names)), "two objects of one kind with one name"


def test_crds_are_installed_from_crds_folder_only(rendered: dict[str, Rendered]) -> None:
    # Helm installs crds/ before the templates and never templates or deletes them.
    for r in rendered.values():
        assert "CustomResourceDefinition" not in r.kinds()


# ---- Kubernetes schemas ---------------------------------------------------------------------------------------

_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    k: {} for k in ("sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action")}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
    "port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string"}, "scrapeTimeout": {"type": "string"},
    "honorLabels": {"type": "boolean"}, "scheme": {"enum": ["http", "https"]},
    "relabelings": {"type": "array", "items": _RELABEL}, "metricRelabelings": {"type": "array", "items": _RELABEL}}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {"matchLabels": {"type": "object"},
                                                                             "matchExpressions": {"type": "array"}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}


def monitor_schema(endpoints_key: str) -> dict[str, Any]:
    """The part of the Prometheus Operator's monitoring.coreos.com/v1 API that the chart uses, unknown fields refused
    (kubernetes-validate has no schemas for custom resources)."""
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints_key], "properties": {
                    "selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR, "jobLabel": {"type": "string"},
                    endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates_against_kubernetes_schemas(rendered: dict[str, Rendered], scenario: str) -> None:
    for manifest in rendered[scenario].manifests:
        kind = manifest["kind"]
        if kind == "Swarm":
            jsonschema.Draft4Validator(swarm_schema()).validate(manifest)
        elif kind == "ServiceMonitor":
            jsonschema.Draft7Validator(monitor_schema("endpoints")).validate(manifest)
        elif kind == "PodMonitor":
            jsonschema.Draft7Validator(monitor_schema("podMetricsEndpoints")).validate(manifest)
        elif kind in ("ClusterKopfPeering", "KopfPeering"):
            (definition,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == kind]
            assert manifest["apiVersion"] == f"{definition['spec']['group']}/{definition['spec']['versions'][0]['name']}"
            assert ("namespace" in manifest["metadata"]) == (definition["spec"]["scope"] == "Namespaced")
            assert set(manifest) <= {"apiVersion", "kind", "metadata", "status"}
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert {m["kind"] for m in rendered[scenario].manifests} - CRD_KINDS  # most kinds went through kubernetes-validate


def test_kubernetes_validate_would_catch_a_mistake(rendered: dict[str, Rendered]) -> None:
    broken = json.loads(json.dumps(rendered["default"].get("Deployment", f"{RELEASE}-operator")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_monitor_schema_would_catch_a_mistake(rendered: dict[str, Rendered]) -> None:
    monitor = json.loads(json.dumps(rendered["all-on"].get("PodMonitor")))
    monitor["spec"]["podMetricsEndpoints"][0]["relabellings"] = []
    with pytest.raises(jsonschema.ValidationError, match="relabellings"):
        jsonschema.Draft7Validator(monitor_schema("podMetricsEndpoints")).validate(monitor)


# ---- conventions: labels, selectors, security ---------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_labels_and_selectors(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    for m in r.manifests:
        labels = m["metadata"].get("labels") or {}
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                    "app.kubernetes.io/version", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{m['kind']}/{m['metadata']['name']} has no {key}"
        assert labels["app.kubernetes.io/name"] == "llmswarm" and labels["app.kubernetes.io/instance"] == RELEASE
        if m["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert m["metadata"].get("namespace") == NAMESPACE, f"{m['kind']}/{m['metadata']['name']}"
    for m in r.all("Deployment"):
        selector = m["spec"]["selector"]["matchLabels"]
        assert not {"helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"} & set(selector), \
            "a selector with a version in it breaks upgrades"
        assert selector_matches(m["spec"]["selector"], m["spec"]["template"]["metadata"]["labels"])
    # Every Service selects pods the chart or the operator creates.
    pods = [meta.get("labels") or {} for _, meta, _ in pod_templates(r)]
    operator_pods = [operator_manifests.pod_labels(swarm, component, **{operator_manifests.LABEL_SERVER: "x"})
                     for swarm in _swarm_names(r) for component in ("route-map", "block-server")]
    for service in r.all("Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        assert any(selector_matches(selector, labels) for labels in pods + operator_pods), service["metadata"]["name"]


def _swarm_names(r: Rendered) -> list[str]:
    names = [m["metadata"]["name"] for m in r.all("Swarm")]
    for service in r.all("Service"):
        if "llmswarm.dev/swarm" in service["spec"]["selector"]:
            names.append(service["spec"]["selector"]["llmswarm.dev/swarm"])
    return names


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_as_non_root_read_only_without_capabilities(rendered: dict[str, Rendered], scenario: str) -> None:
    for name, _, spec in pod_templates(rendered[scenario]):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            assert container["image"] == f"ghcr.io/llmswarm/node:{operator_manifests.package_version()}-cpu"
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts") or []}
        if name.endswith(("-operator", "-gateway")):
            assert "/tmp" in mounts, f"{name}: Python needs a writable /tmp on a read-only root filesystem"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_pods_pass_the_restricted_profile_and_see_no_gpu(rendered: dict[str, Rendered], scenario: str) -> None:
    for name, meta, spec in pod_templates(rendered[scenario]):
        assert restricted_violations(spec, meta) == [], name
        for container in spec["containers"]:
            # The CUDA image says NVIDIA_VISIBLE_DEVICES=all: none of the chart's pods asks for a GPU.
            assert env_of(container)["NVIDIA_VISIBLE_DEVICES"] == "void", name


def test_the_chart_pull_secrets_reach_the_operators_pods(rendered: dict[str, Rendered]) -> None:
    def operator_env(r: Rendered) -> dict[str, Any]:
        return env_of(r.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0])

    assert operator_env(rendered["default"])["LLMSWARM_OPERATOR_IMAGE_PULL_SECRETS"] == ""
    assert operator_env(rendered["all-on"])["LLMSWARM_OPERATOR_IMAGE_PULL_SECRETS"] == "regcred"
    given = render({"imagePullSecrets": [{"name": "a"}], "operator": {"settings": {"imagePullSecrets": ["b", "c"]}}})
    assert operator_env(given)["LLMSWARM_OPERATOR_IMAGE_PULL_SECRETS"] == "b,c"


def test_resources_are_left_to_the_user_by_default(rendered: dict[str, Rendered]) -> None:
    for _, _, spec in pod_templates(rendered["default"]):
        for container in spec["containers"]:
            assert "resources" not in container
    operator = rendered["all-on"].get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    assert operator["resources"] == scenario_values("all-on")["operator"]["resources"]


def test_operator_probes_use_kopf_liveness_endpoint(rendered: dict[str, Rendered]) -> None:
    container = rendered["default"].get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    minimal = rendered["minimal"].get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "livenessProbe" not in minimal and "ports" not in minimal  # liveness endpoint and metrics turned off


# ---- the operator's settings, one to one --------------------------------------------------------------------

def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def test_operator_settings_values_map_one_to_one_onto_the_environment() -> None:
    fields = [f.name for f in dataclasses.fields(OperatorSettings)]
    defaults = yaml.safe_load(VALUES_FILE.read_text())["operator"]["settings"]
    assert list(defaults) == [_camel(f) for f in fields], "operator.settings must have one key per OperatorSettings field"
    values = {"operator": {"settings": {
        "image": "registry.example/node:7", "imagePullPolicy": "Always", "imagePullSecrets": ["regcred", "team"],
        "namespaces": ["team-a", "team-b"],
        "reconcileInterval": 7.5, "retryDelay": 3, "drainSeconds": 0, "metricsPort": 9191, "metricsHost": "127.0.0.1",
        "livenessEndpoint": "http://0.0.0.0:8181/alive", "peering": "llmswarm", "peeringLifetime": 30, "clusterDomain": "cluster.example",
        "rebalanceMaxMoves": 3, "rebalanceScrapeUrl": "https://{server}.{namespace}:{port}/metrics"}}}
    container = render(values).get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert container["command"] == ["python", "-m", "llmswarm_operator"]
    assert {k for k in env if k.startswith(PREFIX)} == {PREFIX + f.upper() for f in fields}
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert settings == OperatorSettings(
        image="registry.example/node:7", image_pull_policy="Always", image_pull_secrets=("regcred", "team"),
        namespaces=("team-a", "team-b"), reconcile_interval=7.5,
        retry_delay=3.0, drain_seconds=0.0, metrics_port=9191, metrics_host="127.0.0.1",
        liveness_endpoint="http://0.0.0.0:8181/alive", peering="llmswarm", peering_lifetime=30, cluster_domain="cluster.example",
        rebalance_max_moves=3,
        rebalance_scrape_url="https://{server}.{namespace}:{port}/metrics")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9191, "health": 8181}
    assert container["livenessProbe"]["httpGet"]["path"] == "/alive"


def test_default_settings_equal_the_operators_own_defaults_but_the_image() -> None:
    container = render().get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    settings = OperatorSettings.from_env({k: v for k, v in env_of(container).items() if isinstance(v, str)})
    # The operator's own default image is ghcr.io/llmswarm/node:<its version>: the chart says the same. It watches
    # every namespace by default; the chart, its own namespace only (operator.clusterWide).
    assert settings == dataclasses.replace(OperatorSettings(), namespaces=(NAMESPACE,))
    assert settings.routemap_image == container["image"]  # the CPU build, for the operator as for the route maps


def test_more_than_one_replica_shares_a_peering_object() -> None:
    single = render()
    assert single.get("Deployment", f"{RELEASE}-operator")["spec"]["strategy"] == {"type": "Recreate"}
    assert not single.all("ClusterKopfPeering") and not single.all("KopfPeering")
    assert env_of(single.get("Deployment")["spec"]["template"]["spec"]["containers"][0])["LLMSWARM_OPERATOR_PEERING"] == ""
    for values, kind, namespaces in (({"operator": {"replicaCount": 2}}, "KopfPeering", [NAMESPACE]),
                                     ({"operator": {"replicaCount": 2, "clusterWide": True}}, "ClusterKopfPeering", [None]),
                                     ({"operator": {"settings": {"peering": "p", "namespaces": ["a", "b"]}}}, "KopfPeering", ["a", "b"])):
        r = render(values)
        deployment = r.get("Deployment", f"{RELEASE}-operator")
        assert "strategy" not in deployment["spec"]  # rolling: the peers hand over
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        name = values["operator"].get("settings", {}).get("peering") or RELEASE
        assert env["LLMSWARM_OPERATOR_PEERING"] == name
        assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # each replica's name among its peers
        assert [(p["metadata"]["name"], p["metadata"].get("namespace")) for p in r.all(kind)] == [(name, n) for n in namespaces]
        plural = kind.lower() + "s"
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        for namespace in namespaces:
            for verb in ("get", "list", "watch", "patch"):
                assert granted(r, account, namespace, "kopf.dev", plural, verb), (kind, namespace, verb)
    # The CRDs come with the chart (Helm installs crds/ first).
    assert {d["metadata"]["name"] for d in crd_documents()} >= {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


# ---- RBAC ------------------------------------------------------------------------------------------------------

def test_every_rbac_rule_says_why() -> None:
    lines = (CHART_DIR / "templates" / "rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rules) >= 8
    for i in rules:
        above = next(line.strip() for line in reversed(lines[:i]) if not line.strip().startswith("{{"))
        assert above.startswith("#"), f"rbac.yaml line {i + 1}: a rule without a comment saying why"


def _rules(r: Rendered) -> list[dict[str, Any]]:
    return [rule for kind in ("ClusterRole", "Role") for role in r.all(kind) for rule in role["rules"]]


def test_rbac_is_least_privilege(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for rule in _rules(r):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:  # the servers' keys: made and deleted; spec.join's credential: read
                assert set(rule["verbs"]) <= {"get", "create", "delete"}, "the operator never lists or watches Secrets"
    # Watching every namespace: bound cluster-wide. Watching some: bound in each of them only.
    default = render({"operator": {"clusterWide": True}})
    assert {b["roleRef"]["name"] for b in default.all("ClusterRoleBinding")} == {f"{RELEASE}-operator", f"{RELEASE}-operator-cluster"}
    minimal = rendered["minimal"]
    assert [b["roleRef"]["name"] for b in minimal.all("ClusterRoleBinding")] == [f"{RELEASE}-operator-cluster"]
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in minimal.all("RoleBinding")] == [("llmswarm", f"{RELEASE}-operator")]
    cluster = minimal.get("ClusterRole", f"{RELEASE}-operator-cluster")["rules"]
    assert {r for rule in cluster for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    for binding in default.all("ClusterRoleBinding") + minimal.all("RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_owner_references_that_block_deletion_are_allowed(rendered: dict[str, Rendered], scenario: str) -> None:
    """The operator's objects say ``blockOwnerDeletion: true``: with the OwnerReferencesPermissionEnforcement
    admission plugin, that needs ``update`` on ``swarms/finalizers`` wherever it creates them."""
    from tests.chart.cluster import granted

    r = rendered[scenario]
    assert operator_manifests.Owner("s", "n", "u").reference()["blockOwnerDeletion"] is True
    deployment = r.get("Deployment", f"{RELEASE}-operator")
    namespaces = env_of(deployment["spec"]["template"]["spec"]["containers"][0])["LLMSWARM_OPERATOR_NAMESPACES"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    for namespace in namespaces.split(",") if namespaces else [NAMESPACE, "elsewhere"]:
        assert granted(r, account, namespace, "llmswarm.dev", "swarms/finalizers", "update"), namespace


def test_the_operator_watches_its_own_namespace_unless_told_otherwise() -> None:
    def watched(r: Rendered) -> str:
        container = r.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
        return str(env_of(container)["LLMSWARM_OPERATOR_NAMESPACES"])

    default = render()
    assert watched(default) == NAMESPACE
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in default.all("RoleBinding")] == [(NAMESPACE, f"{RELEASE}-operator")]
    assert [b["roleRef"]["name"] for b in default.all("ClusterRoleBinding")] == [f"{RELEASE}-operator-cluster"]
    cluster_wide = render({"operator": {"clusterWide": True}})
    assert watched(cluster_wide) == "" and not cluster_wide.all("RoleBinding")
    assert f"{RELEASE}-operator" in [b["roleRef"]["name"] for b in cluster_wide.all("ClusterRoleBinding")]
    chosen = render({"operator": {"clusterWide": True, "settings": {"namespaces": ["a", "b"]}}})
    assert watched(chosen) == "a,b" and [b["metadata"]["namespace"] for b in chosen.all("RoleBinding")] == ["a", "b"]


def test_peering_gets_its_own_rules() -> None:
    cluster_wide = render({"operator": {"clusterWide": True, "settings": {"peering": "p"}}})
    assert any("clusterkopfpeerings" in rule["resources"] for rule in _rules(cluster_wide))
    namespaced = render({"operator": {"settings": {"peering": "p", "namespaces": ["a"]}}})
    assert any("kopfpeerings" in rule["resources"] for rule in _rules(namespaced))
    assert not any("kopfpeerings" in rule["resources"] or "clusterkopfpeerings" in rule["resources"] for rule in _rules(render()))


# ---- route map, gateway, token ------------------------------------------------------------------------------

def test_route_map_service_types_and_ingress() -> None:
    base = {"routeMap": {"swarmName": "mine", "port": 9000}}
    for service_type in ("ClusterIP", "NodePort", "LoadBalancer"):
        values = {"routeMap": {**base["routeMap"], "service": {"type": service_type, "nodePort": 30001,
                                                               "loadBalancerSourceRanges": ["10.0.0.0/8"]}}}
        service = render(values).get("Service", f"{RELEASE}-routemap")
        assert service["spec"]["type"] == service_type
        assert service["spec"]["selector"] == {"llmswarm.dev/swarm": "mine", "app.kubernetes.io/component": "route-map"}
        # It selects exactly the route-map pods the operator builds for that Swarm.
        assert selector_matches({"matchLabels": service["spec"]["selector"]},
                                operator_manifests.pod_labels("mine", operator_manifests.COMPONENT_ROUTEMAP))
        assert not selector_matches({"matchLabels": service["spec"]["selector"]},
                                    operator_manifests.pod_labels("mine", operator_manifests.COMPONENT_SERVER))
        port = service["spec"]["ports"][0]
        assert port["targetPort"] == "http" and ("nodePort" in port) == (service_type != "ClusterIP")
        assert ("loadBalancerSourceRanges" in service["spec"]) == (service_type == "LoadBalancer")
    ingress = render({**base, "routeMap": {**base["routeMap"], "ingress": {"enabled": True}}}).get("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "mine-routemap", "port": {"number": 9000}}  # the operator's Service for the Swarm
    assert "Service" not in render().kinds() or not render().all("Service", f"{RELEASE}-routemap")


def test_route_map_follows_the_swarm_from_values() -> None:
    values = {"swarm": {"create": True, "spec": {"pools": [{"name": "cpu", "gpuMemory": "2Gi"}], "routeMap": {"port": 8800}}}}
    r = render(values)
    swarm = r.get("Swarm")
    # Helm merges the given spec into the default one (maps merge, lists are replaced).
    assert swarm["metadata"]["name"] == RELEASE
    assert swarm["spec"] == merge(yaml.safe_load(VALUES_FILE.read_text())["swarm"]["spec"], values["swarm"]["spec"])
    test_pod = r.get("Pod")
    assert env_of(test_pod["spec"]["containers"][0])["ROUTEMAP_URL"] == f"http://{RELEASE}-routemap.{NAMESPACE}.svc.cluster.local:8800"


def test_a_swarm_name_the_operator_cannot_use_is_refused() -> None:
    long_release = "a-release-name-that-is-quite-long-indeed"
    r = render({"swarm": {"create": True}}, release=long_release)
    name = r.get("Swarm")["metadata"]["name"]
    assert len(name) <= 30 and not name.endswith("-")
    with pytest.raises(HelmError, match="at most 30 characters"):
        render({"swarm": {"create": True}}, release="9lives")


def test_gateway_runs_the_real_gateway_command() -> None:
    from llmswarm.gateway.app import Gateway
    from llmswarm.gateway.cli import options_from_args
    from llmswarm_cli.main import build_parser

    r = render({"gateway": {"enabled": True, "extraArgs": ["--max-concurrent", "16"]}, "swarm": {"create": True},
                "token": {"existingSecret": "swarm-token"}})
    deployment = r.get("Deployment", f"{RELEASE}-gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["llmswarm", "gateway"]
    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    options = options_from_args(args)
    assert options.swarm == f"http://{RELEASE}-routemap.{NAMESPACE}.svc.cluster.local:8700"
    assert (options.host, options.port, options.model, options.max_concurrent) == ("0.0.0.0", 8080, "smollm2", 16)
    assert env_of(container)["LLMSWARM_TOKEN"] == {"secretKeyRef": {"name": "swarm-token", "key": "token"}}
    # The probes ask paths the gateway's own router serves (built without loading a model), on its port.
    gateway = Gateway.__new__(Gateway)
    gateway.options = options
    routes = {resource.canonical for resource in gateway.app().router.resources()}
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    service = r.get("Service", f"{RELEASE}-gateway")
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    with pytest.raises(HelmError, match=r"gateway\.enabled needs a swarm"):
        render({"gateway": {"enabled": True}})
    explicit = render({"gateway": {"enabled": True, "swarmUrl": "http://routes.example:8700", "model": "org/model"}})
    args = explicit.get("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--swarm", "http://routes.example:8700", "--model", "org/model"]


def test_token_secret_existing_created_or_generated() -> None:
    assert "Secret" not in render().kinds()
    existing = render({"token": {"existingSecret": "mine", "secretKey": "t"}, "swarm": {"create": True}})
    assert "Secret" not in existing.kinds()
    for _, _, spec in pod_templates(existing):
        assert env_of(spec["containers"][0])["LLMSWARM_TOKEN"] == {"secretKeyRef": {"name": "mine", "key": "t"}}
    import base64

    given = render({"token": {"create": True, "value": "s3cret"}}).get("Secret", f"{RELEASE}-token")
    assert base64.b64decode(given["data"]["token"]).decode() == "s3cret"
    first, second = (base64.b64decode(render({"token": {"create": True}}).get("Secret")["data"]["token"]).decode() for _ in range(2))
    assert len(first) == 40 and first.isalnum() and first != second
    assert "LLMSWARM_TOKEN" not in env_of(render().get("Deployment")["spec"]["template"]["spec"]["containers"][0])


# ---- monitoring, dashboard, network policies ----------------------------------------------------------------

def test_monitors_scrape_the_right_pods(rendered: dict[str, Rendered]) -> None:
    r = rendered["all-on"]
    assert not rendered["default"].all("ServiceMonitor") and not rendered["default"].all("PodMonitor")  # off by default
    operator_monitor = r.get("ServiceMonitor", f"{RELEASE}-operator")
    endpoint = operator_monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    operator_service = r.get("Service", f"{RELEASE}-operator")
    assert selector_matches(operator_monitor["spec"]["selector"], operator_service["metadata"]["labels"])
    assert operator_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    gateway_monitor = r.get("ServiceMonitor", f"{RELEASE}-gateway")
    assert selector_matches(gateway_monitor["spec"]["selector"], r.get("Service", f"{RELEASE}-gateway")["metadata"]["labels"])
    pod_monitor = r.get("PodMonitor")
    selector = pod_monitor["spec"]["selector"]
    for component in (operator_manifests.COMPONENT_SERVER, operator_manifests.COMPONENT_ROUTEMAP):
        assert selector_matches(selector, operator_manifests.pod_labels("s", component))
    for _, meta, _ in pod_templates(r):  # not the chart's own pods
        assert not selector_matches(selector, meta["labels"])
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    # The relabelings read labels the operator really puts on its pods (Prometheus sanitizes their names).
    labels = operator_manifests.pod_labels("s", operator_manifests.COMPONENT_SERVER,
                                           **{operator_manifests.LABEL_SERVER: "x", operator_manifests.LABEL_POOL: "p"})
    meta_names = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in labels}
    targets = {}
    for relabel in endpoint["relabelings"]:
        assert set(relabel["sourceLabels"]) <= meta_names, relabel
        targets[relabel["targetLabel"]] = relabel["sourceLabels"]
    assert set(targets) == {"swarm", "pool", "server", "component"}


def test_dashboard_configmap_carries_the_dashboard_file(rendered: dict[str, Rendered]) -> None:
    assert not rendered["default"].all("ConfigMap")
    configmap = rendered["all-on"].get("ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"]["grafana_folder"] == "llmswarm"
    assert json.loads(configmap["data"]["llmswarm.json"]) == json.loads((CHART_DIR / "dashboards" / "llmswarm.json").read_text())
    custom = render({"grafana": {"dashboard": {"enabled": True, "label": "dash", "labelValue": "yes", "namespace": "monitoring"}}})
    configmap = custom.get("ConfigMap")
    assert configmap["metadata"]["labels"]["dash"] == "yes" and configmap["metadata"]["namespace"] == "monitoring"


def test_monitors_only_where_the_prometheus_operator_serves_its_api() -> None:
    values = scenario_values("all-on")
    without = render(values)
    assert not without.all("ServiceMonitor") and not without.all("PodMonitor")  # an install would fail on them
    assert "monitoring.coreos.com/v1" in without.notes  # ...and NOTES say why they are missing
    served = render(values, api_versions=PROMETHEUS_OPERATOR)
    assert len(served.all("ServiceMonitor")) == 2 and len(served.all("PodMonitor")) == 1
    assert "monitoring.coreos.com/v1" not in served.notes
    forced = render(merge(values, {"metrics": {"forceMonitors": True}}))
    assert [m["kind"] for m in forced.manifests if m["kind"].endswith("Monitor")] == [m["kind"] for m in served.manifests
                                                                                     if m["kind"].endswith("Monitor")]


def test_operator_route_maps_gateway_and_test_use_the_cpu_image() -> None:
    version = operator_manifests.package_version()
    r = render(scenario_values("all-on"))
    cpu_image = f"ghcr.io/llmswarm/node:{version}-cpu"
    for name, _, spec in pod_templates(r):
        assert {c["image"] for c in spec["containers"]} == {cpu_image}, name  # none of them needs CUDA
    operator = env_of(r.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0])
    assert operator["LLMSWARM_OPERATOR_ROUTEMAP_IMAGE"] == cpu_image  # the route maps it runs
    assert operator["LLMSWARM_OPERATOR_IMAGE"] == f"ghcr.io/llmswarm/node:{version}"  # block servers: the CUDA build
    tagged = render({"image": {"tag": "7", "cpuTag": "7-slim"}})
    container = tagged.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/llmswarm/node:7-slim"
    assert env_of(container)["LLMSWARM_OPERATOR_IMAGE"] == "ghcr.io/llmswarm/node:7"


def admits_from_outside(policies: list[dict[str, Any]], labels: dict[str, str], port: str) -> bool:
    """Whether a client outside the cluster (a load balancer, a node port, an ingress controller in a namespace no
    selector names) reaches `port` of a pod with `labels` through these NetworkPolicies."""
    selecting = [p["spec"] for p in policies if selector_matches(p["spec"]["podSelector"], labels)]
    if not selecting:
        return True  # no policy isolates the pod
    for policy in selecting:
        for rule in policy.get("ingress") or []:
            ports = [p["port"] for p in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            peers = rule.get("from") or []
            if not peers or any("ipBlock" in peer for peer in peers):
                return True
    return False


def test_network_policies_admit_the_documented_external_access() -> None:
    swarm = "team"
    routemap_pod = operator_manifests.pod_labels(swarm, operator_manifests.COMPONENT_ROUTEMAP)
    server_pod = operator_manifests.pod_labels(swarm, operator_manifests.COMPONENT_SERVER)
    base = {"networkPolicy": {"enabled": True}, "routeMap": {"swarmName": swarm}}
    closed = render(base)
    assert not admits_from_outside(closed.all("NetworkPolicy"), routemap_pod, "http")  # ClusterIP: in-cluster only
    for exposed in ({"service": {"type": "NodePort"}}, {"service": {"type": "LoadBalancer"}}, {"ingress": {"enabled": True}}):
        policies = render(merge(base, {"routeMap": exposed})).all("NetworkPolicy")
        assert admits_from_outside(policies, routemap_pod, "http"), exposed
        assert not admits_from_outside(policies, server_pod, "http"), "the servers stay cluster-internal"
        assert not admits_from_outside(policies, operator_manifests.pod_labels("other", operator_manifests.COMPONENT_ROUTEMAP),
                                       "http"), "only the exposed Swarm's route map"
    gateway_values = merge(base, {"gateway": {"enabled": True}})
    gateway_pod = render(gateway_values).get("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    assert not admits_from_outside(render(gateway_values).all("NetworkPolicy"), gateway_pod, "http")
    exposed_gateway = render(merge(gateway_values, {"gateway": {"service": {"type": "LoadBalancer"}}})).all("NetworkPolicy")
    assert admits_from_outside(exposed_gateway, gateway_pod, "http")
    # networkPolicy.externalFrom narrows who that is.
    narrowed = render(merge(base, {"routeMap": {"ingress": {"enabled": True}}, "networkPolicy": {
        "externalFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}}))
    assert not admits_from_outside(narrowed.all("NetworkPolicy"), routemap_pod, "http")
    assert any(rule.get("from") == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
               for p in narrowed.all("NetworkPolicy") for rule in p["spec"].get("ingress") or []
               if selector_matches(p["spec"]["podSelector"], routemap_pod))


def test_network_policies(rendered: dict[str, Rendered]) -> None:
    assert not rendered["default"].all("NetworkPolicy")
    r = rendered["all-on"]
    operator_pod = r.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["labels"]
    gateway_pod = r.get("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    server_pod = operator_manifests.pod_labels("smollm2", operator_manifests.COMPONENT_SERVER)
    routemap_pod = operator_manifests.pod_labels("smollm2", operator_manifests.COMPONENT_ROUTEMAP)
    test_pod = r.get("Pod")["metadata"]["labels"]
    policies = {p["metadata"]["name"].removeprefix(f"{RELEASE}-"): p["spec"] for p in r.all("NetworkPolicy")}
    assert set(policies) == {"operator", "swarms", "gateway", "routemap-external"}

    def selected(policy: str, labels: dict[str, str]) -> bool:
        return selector_matches(policies[policy]["podSelector"], labels)

    assert selected("operator", operator_pod) and not selected("operator", gateway_pod)
    assert selected("swarms", server_pod) and selected("swarms", routemap_pod)
    assert not selected("swarms", operator_pod) and not selected("swarms", gateway_pod)
    assert selected("gateway", gateway_pod) and not selected("gateway", server_pod)
    # Llmswarm's own pods (gateway, servers announcing, the helm test, a client run as NOTES.txt says, the operator's
    # rebalancer scraping the servers' /metrics) get in.
    allowed = policies["swarms"]["ingress"][0]["from"]
    own = [peer for peer in allowed if "podSelector" in peer]
    for labels in (gateway_pod, server_pod, test_pod, operator_pod, {"app.kubernetes.io/part-of": "llmswarm"}):
        assert any(selector_matches(peer["podSelector"], labels) for peer in own)
    assert allowed[len(own):] == scenario_values("all-on")["networkPolicy"]["swarmFrom"]
    operator_ports = [rule["ports"][0]["port"] for rule in policies["operator"]["ingress"]]
    assert operator_ports == ["metrics", "health"]
    assert policies["operator"]["policyTypes"] == ["Ingress"]
    egress = render({"networkPolicy": {"enabled": True, "operatorEgress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}})
    assert egress.get("NetworkPolicy", f"{RELEASE}-operator")["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_helm_test_hook(rendered: dict[str, Rendered]) -> None:
    assert not rendered["default"].all("Pod"), "no Swarm to test without swarm.create or routeMap.swarmName"
    pod = rendered["all-on"].get("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    assert container["args"] == [(CHART_DIR / "files" / "check_routemap.py").read_text()]
    compile(container["args"][0], "check_routemap.py", "exec")
    env = env_of(container)
    assert env["ROUTEMAP_URL"] == f"http://smollm2-routemap.{NAMESPACE}.svc.cluster.local:8700"
    assert env["LLMSWARM_TOKEN"] == {"secretKeyRef": {"name": f"{RELEASE}-token", "key": "token"}}
    assert pod["spec"]["restartPolicy"] == "Never"


# ---- NOTES.txt ----------------------------------------------------------------------------------------------

def _commands(notes: str) -> list[str]:
    """The shell commands NOTES.txt gives, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", notes)
    return [line.strip() for line in text.splitlines()
            if line.startswith("     ") and line.strip().startswith(("kubectl ", "export ", "llmswarm ", "helm ", "curl "))]


@pytest.mark.parametrize("values", [
    {}, {"swarm": {"create": True}}, {"routeMap": {"swarmName": "team", "service": {"type": "NodePort"}}},
    {"routeMap": {"swarmName": "team", "service": {"type": "LoadBalancer"}}}, "all-on", "minimal",
], ids=["default", "swarm", "nodeport", "loadbalancer", "all-on", "minimal"])
def test_notes_name_objects_that_exist(values: Any) -> None:
    values = scenario_values(values) if isinstance(values, str) else values
    r = render(values)
    commands = _commands(r.notes)
    assert commands, r.notes
    services = {m["metadata"]["name"] for m in r.all("Service")} | {f"{s}-routemap" for s in _swarm_names(r)}
    deployments = {m["metadata"]["name"] for m in r.all("Deployment")}
    secrets = {m["metadata"]["name"] for m in r.all("Secret")}
    for command in commands:
        for match in re.finditer(r"(?:service/|get service |svc/)([-a-z0-9<>]+)", command):
            assert match.group(1) in services or match.group(1) == "<swarm>-routemap", command
        for match in re.finditer(r"deployment/([-a-z0-9]+)", command):
            assert match.group(1) in deployments, command
        for match in re.finditer(r"get secret ([-a-z0-9]+)", command):
            assert match.group(1) in secrets, command
        if command.startswith("helm test"):
            assert r.all("Pod"), "NOTES.txt offers helm test without a test hook"
        if "--command -- llmswarm " in command:
            _parse_llmswarm(command.split("--command -- ", 1)[1])
        elif command.startswith("llmswarm "):
            _parse_llmswarm(command.replace("$ROUTEMAP_URL", "http://x:1"))
        for match in re.finditer(r"--image=(\S+)", command):
            assert match.group(1) == r.get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]["image"]


def _parse_llmswarm(command: str) -> None:
    import shlex

    from llmswarm_cli.main import build_parser

    argv = shlex.split(command)[1:]
    build_parser().parse_args(argv)


# ---- values.yaml and values.schema.json ----------------------------------------------------------------------

def _schema() -> dict[str, Any]:
    return json.loads(VALUES_SCHEMA.read_text())  # type: ignore[no-any-return]


def test_schema_is_draft7_closed_and_described() -> None:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
            for key, child in node["properties"].items():
                if not path.startswith(".swarm.spec"):  # descriptions there are the CRD's own
                    assert child.get("description"), f"{path}.{key} has no description"
                walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    enums = [k for k in ("type", "pullPolicy") if "enum" in schema["properties"]["image"]["properties"].get(k, {})]
    assert enums == ["pullPolicy"]


def test_schema_of_the_swarm_spec_is_the_crds() -> None:
    assert _schema()["properties"]["swarm"]["properties"]["spec"] == swarm_spec_values_schema(), \
        "the CRD changed: run `.venv/bin/python -m tests.chart.crd_schema`"
    assert set(crd_spec_schema()["properties"]) == set(swarm_spec_values_schema()["properties"])


def test_every_value_has_a_comment_and_a_schema_entry() -> None:
    lines = VALUES_FILE.read_text().splitlines()
    schema = _schema()
    stack: list[tuple[int, str, dict[str, Any] | None]] = []
    checked = 0
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][2] if stack else schema
        if parent is None or "properties" not in parent:  # inside a free-form value (securityContext, swarm.spec)
            stack.append((indent, key, None))
            continue
        path = ".".join([k for _, k, _ in stack] + [key])
        assert key in parent["properties"], f"values.yaml {path} is not in values.schema.json"
        node = parent["properties"][key]
        stack.append((indent, key, node if node.get("type") == "object" and key != "spec" else None))
        previous = lines[number - 1].strip() if number else ""
        assert previous.startswith("#"), f"values.yaml line {number + 1}: {path} has no comment above it"
        checked += 1
    assert checked > 80
    # ...and every key the schema knows is in values.yaml (documented defaults for all).
    defaults = yaml.safe_load(VALUES_FILE.read_text())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        for key, child in node.get("properties", {}).items():
            if path == "" and key == "global":
                continue
            assert isinstance(value, dict) and key in value, f"{path}.{key} is in the schema but not in values.yaml"
            if path != ".swarm" or key != "spec":
                walk(child, value[key], f"{path}.{key}")

    walk(schema, defaults, "")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenarios_pass_the_schema(scenario: str) -> None:
    chart = load_chart()
    try:
        chart.validate_schema(scenario_values(scenario))
    finally:
        chart.close()


BAD_VALUES = [
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of 'Always', 'IfNotPresent', 'Never'"),
    ({"operator": {"replicaCount": -1}}, "/operator/replicaCount", "minimum"),
    ({"operator": {"settings": {"metricsPort": 70000}}}, "metricsPort", "want 65,535"),
    ({"operator": {"settings": {"reconcileInterval": 0}}}, "reconcileInterval", ""),
    ({"operator": {"settings": {"livenessEndpoint": "http://0.0.0.0/healthz"}}}, "livenessEndpoint", ""),
    ({"operator": {"settings": {"namespaces": "team-a"}}}, "namespaces", ""),
    ({"operator": {"settings": {"reconcile_interval": 5}}}, "reconcile_interval", ""),
    ({"routeMap": {"service": {"type": "ExternalName"}}}, "/routeMap/service/type", "must be one of"),
    ({"routeMap": {"ingress": {"hosts": [{"host": "x", "paths": [{"path": "/", "pathType": "Regex"}]}]}}}, "pathType", ""),
    ({"metrics": {"podMonitor": {"interval": "fast"}}}, "interval", ""),
    ({"swarm": {"name": "Bad_Name"}}, "name", ""),
    ({"swarm": {"spec": {"pools": []}}}, "pools", ""),
    ({"swarm": {"spec": {"redundancy": 0, "pools": [{"name": "cpu", "gpuMemory": "2Gi"}]}}}, "redundancy", ""),
    ({"swarm": {"spec": {"pools": [{"name": "cpu", "gpuMemory": "2Gi", "relativeSpeed": 0}]}}}, "relativeSpeed", ""),
    ({"swarm": {"spec": {"model": {"quantization": "int4"}, "pools": [{"name": "cpu", "gpuMemory": "2Gi"}]}}}, "quantization", ""),
    ({"swarm": {"spec": {"pools": [{"name": "cpu", "gpuMemory": "2Gi", "gpuMem": "3Gi"}]}}}, "/swarm/spec/pools/0", "'gpuMem' not allowed"),
    ({"gatway": {"enabled": True}}, "gatway", "not allowed"),
]


@pytest.mark.parametrize(("values", "key", "detail"), BAD_VALUES, ids=[str(v[1]) + f"-{i}" for i, v in enumerate(BAD_VALUES)])
def test_values_that_break_the_schema_are_refused_with_a_clear_message(values: dict[str, Any], key: str, detail: str) -> None:
    chart = load_chart()
    try:
        with pytest.raises(HelmValuesError) as raised:
            chart.validate_schema(values)
    finally:
        chart.close()
    message = str(raised.value)
    # The message names the offending value by its path, and the rule it breaks.
    assert re.search(r"- at '[^']*'", message), message
    assert key in message, message
    if detail:
        assert detail in message, message
    # An install (render) refuses them the same way, before any object exists.
    with pytest.raises(HelmValuesError) as raised_render:
        render(values)
    assert "values don't meet the specifications of the schema" in str(raised_render.value)
    assert message.strip() in str(raised_render.value)


def test_values_schema_file_is_valid_json_and_sorted_like_values() -> None:
    schema = _schema()
    defaults = yaml.safe_load(VALUES_FILE.read_text())
    assert [k for k in schema["properties"] if k != "global"] == list(defaults)


def test_files_in_the_chart_are_valid() -> None:
    for path in CHART_DIR.rglob("*.json"):
        json.loads(path.read_text())
    for path in [*CHART_DIR.glob("*.yaml"), *CHART_DIR.glob("ci/*.yaml"), *CHART_DIR.glob("crds/*.yaml")]:
        list(yaml.safe_load_all(path.read_text()))
    assert Path(CHART_DIR / ".helmignore").read_text()


def test_operator_hands_the_token_secret_to_the_swarm() -> None:
    def operator_env(values: dict[str, Any]) -> dict[str, Any]:
        return env_of(render(values).get("Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0])

    assert operator_env({})["LLMSWARM_OPERATOR_TOKEN_SECRET"] == ""
    assert operator_env({"token": {"create": True}})["LLMSWARM_OPERATOR_TOKEN_SECRET"] == f"{RELEASE}-token:token"
    assert operator_env({"token": {"existingSecret": "mine", "secretKey": "t"}})["LLMSWARM_OPERATOR_TOKEN_SECRET"] == "mine:t"
    given = {"operator": {"settings": {"tokenSecret": "other:k"}}, "token": {"existingSecret": "mine"}}
    assert operator_env(given)["LLMSWARM_OPERATOR_TOKEN_SECRET"] == "other:k"

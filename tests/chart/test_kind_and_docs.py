"""kind-config.yaml against the examples' pools, and docs/kubernetes.md against the chart, the CLI and the CRD."""

from __future__ import annotations

import itertools
import re
import shlex
from typing import Any

import jsonschema
import yaml

from llmswarm_cli.main import build_parser
from llmswarm_operator.swarm_spec import parse_spec, plan_placement
from tests.chart.crd_schema import swarm_schema
from tests.chart.rendering import NAMESPACE, PROMETHEUS_OPERATOR, ROOT, load_chart, merge, render

KIND_CONFIG = ROOT / "kind-config.yaml"
DOC = ROOT / "docs" / "kubernetes.md"
EXAMPLES = ROOT / "examples"


def kind_nodes() -> list[dict[str, Any]]:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    return config["nodes"]  # type: ignore[no-any-return]


def taints(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Taints a worker registers with (kubeadm's JoinConfiguration, as kind applies it)."""
    out = []
    for patch in node.get("kubeadmConfigPatches") or []:
        document = yaml.safe_load(patch)
        if document.get("kind") == "JoinConfiguration":
            out += document.get("nodeRegistration", {}).get("taints") or []
    return out


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint["effect"]:
            continue
        if toleration.get("operator", "Equal") == "Exists" and toleration.get("key") in (None, taint["key"]):
            return True
        if toleration.get("key") == taint["key"] and toleration.get("value") == taint.get("value"):
            return True
    return False


def schedulable_workers(pool: dict[str, Any]) -> list[int]:
    """Indexes of the kind workers a pool's pods can run on (node selector and taints)."""
    out = []
    for index, node in enumerate(kind_nodes()):
        if node["role"] != "worker":
            continue
        labels = node.get("labels") or {}
        if all(labels.get(k) == v for k, v in (pool.get("nodeSelector") or {}).items()) and \
                all(tolerates(pool.get("tolerations") or [], taint) for taint in taints(node)):
            out.append(index)
    return out


def test_one_control_plane_and_three_workers_as_pools() -> None:
    nodes = kind_nodes()
    assert [n["role"] for n in nodes] == ["control-plane", "worker", "worker", "worker"]
    pools = [n["labels"]["llmswarm.dev/pool"] for n in nodes[1:]]
    assert len(set(pools)) == 3 and "cpu" in pools
    gpu = [n for n in nodes[1:] if "llmswarm.dev/gpu" in n["labels"]]
    assert len(gpu) == 2 and len({n["labels"]["llmswarm.dev/gpu"] for n in gpu}) == 2  # two GPU pools of different size
    for node in gpu:
        assert taints(node) == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    (cpu,) = [n for n in nodes[1:] if n["labels"]["llmswarm.dev/pool"] == "cpu"]
    assert taints(cpu) == []


def test_the_heterogeneous_example_lands_one_pool_per_gpu_worker() -> None:
    doc = yaml.safe_load((EXAMPLES / "swarm-heterogeneous.yaml").read_text())
    placed = {pool["name"]: schedulable_workers(pool) for pool in doc["spec"]["pools"]}
    assert all(len(workers) == 1 for workers in placed.values()), placed
    assert len({w[0] for w in placed.values()}) == len(placed), "two pools on one worker"
    # Without the toleration, a pool could not use its GPU worker at all.
    untolerant = {**doc["spec"]["pools"][0], "tolerations": []}
    assert schedulable_workers(untolerant) == []


def test_the_cpu_example_and_the_operator_run_on_the_cpu_worker() -> None:
    doc = yaml.safe_load((EXAMPLES / "swarm-cpu.yaml").read_text())
    (pool,) = doc["spec"]["pools"]
    cpu_worker = [i for i, n in enumerate(kind_nodes()) if n.get("labels", {}).get("llmswarm.dev/pool") == "cpu"]
    assert schedulable_workers(pool) == cpu_worker
    operator = render().get("Deployment", "llmswarm-operator")["spec"]["template"]["spec"]
    assert schedulable_workers({"nodeSelector": operator.get("nodeSelector"), "tolerations": operator.get("tolerations")}) == cpu_worker


# ---- docs/kubernetes.md ------------------------------------------------------------------------------------

def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)


def commands() -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            line = line.strip()
            if re.match(r"(kind|kubectl|docker|helm|llmswarm|curl) ", line):
                out.append(shlex.split(line))
    return out


def test_the_walkthrough_goes_from_kind_to_the_client() -> None:
    steps = [" ".join(c[:3]) for c in commands()]
    for expected in ("kind create cluster", "docker build -f", "kind load docker-image", "helm install llmswarm", "kubectl -n llmswarm",
                     "llmswarm routes --swarm", "helm test llmswarm", "docker push registry.example.com/llmswarm/node:0.1.0"):
        assert any(step.startswith(expected) for step in steps), expected
    joined = [" ".join(c) for c in commands()]
    assert any("port-forward service/smollm2-cpu-routemap" in c for c in joined)
    assert any("kind create cluster --config kind-config.yaml" in c for c in joined)


def test_docs_commands_use_real_files_names_and_versions() -> None:
    chart = load_chart()
    try:
        version = chart.metadata["appVersion"]
    finally:
        chart.close()
    for command in commands():
        text = " ".join(command)
        for image in re.findall(r"\S+/llmswarm/node:(\S+)", text):
            assert image in (version, f"{version}-cpu"), text  # the CUDA and the CPU build
        if command[0] == "docker" and command[1] == "build":
            assert command[command.index("-f") + 1] == "node_image/Dockerfile" and command[-1] == "."
            if "--build-arg" in command:
                assert command[command.index("--build-arg") + 1] in ("VARIANT=cpu", "VARIANT=cuda")
        if command[0] == "kind" and "--config" in command:
            assert (ROOT / command[command.index("--config") + 1]).exists()
        if command[0] == "kind" and "--name" in command:
            assert command[command.index("--name") + 1] == yaml.safe_load(KIND_CONFIG.read_text())["name"]
        if command[0] == "kubectl" and "-f" in command:
            path = command[command.index("-f") + 1]
            assert path == "smollm2-pools.yaml" or (ROOT / path).exists(), path  # the first is this page's manifest
        if command[0] == "kubectl" and "patch" in command and "node" in command:
            node = command[command.index("node") + 1]
            workers = ["llmswarm-worker" + (str(i + 1) if i else "") for i in range(3)]
            assert node in workers[:2], node  # the two "GPU" workers, by kind's naming
        if command[0] == "llmswarm":
            build_parser().parse_args(command[1:])
        if command[:4] == ["kubectl", "-n", "llmswarm", "run"]:
            build_parser().parse_args(command[command.index("--command") + 3:])


def helm_values(command: list[str], previous: dict[str, Any]) -> dict[str, Any]:
    """The values a `helm install/upgrade` command line gives (--set, -f files from this page, --reuse-values)."""
    values: dict[str, Any] = dict(previous) if "--reuse-values" in command else {}
    files = {re.match(r"# (\S+)\n", b).group(1): yaml.safe_load(b) for b in blocks("yaml") if re.match(r"# (\S+\.yaml)\n", b)}
    for flag, argument in itertools.pairwise(command):
        if flag == "-f":
            values = merge(values, files[argument])
        if flag == "--set":
            key, _, raw = argument.partition("=")
            value: Any = yaml.safe_load(raw)
            for part in reversed(key.split(".")):
                value = {part: value}
            values = merge(values, value)
    return values


def test_every_helm_command_gives_valid_values() -> None:
    helm = [c for c in commands() if c[0] == "helm" and c[1] in ("install", "upgrade")]
    assert len(helm) == 3
    previous: dict[str, Any] = {}
    for command in helm:
        assert command[3] == "charts/llmswarm" and command[command.index("--namespace") + 1] == NAMESPACE
        values = previous = helm_values(command, previous)
        chart = load_chart()
        try:
            chart.validate_schema(values)
        finally:
            chart.close()
        rendered = render(values)
        if "routeMap" in values:  # the route map it points at is the Swarm the page applies next
            assert values["routeMap"]["swarmName"] in ("smollm2-cpu", "llama70b-mixed")
        if values.get("gateway", {}).get("enabled"):
            assert rendered.get("Service", "llmswarm-gateway")


def test_the_pools_swarm_of_this_page_places_on_the_kind_workers() -> None:
    (swarm,) = [yaml.safe_load(b) for b in blocks("yaml") if "kind: Swarm" in b]
    jsonschema.Draft4Validator(swarm_schema()).validate(swarm)
    _, _, placement = plan_placement(parse_spec(swarm["spec"]))
    assert placement.feasible, placement.message
    lengths = {p.pool: len(p.span) for p in placement.servers}
    assert lengths == {"large": 20, "small": 10}  # twice as fast, twice as long a span
    workers = [schedulable_workers(pool) for pool in swarm["spec"]["pools"]]
    assert workers == [[1], [2]], workers


def test_the_production_values_file_is_valid() -> None:
    (values,) = [yaml.safe_load(b) for b in blocks("yaml") if b.startswith("# values-production.yaml")]
    rendered = render(values, api_versions=PROMETHEUS_OPERATOR)  # kube-prometheus-stack runs there
    assert {"ServiceMonitor", "PodMonitor", "NetworkPolicy", "ConfigMap"} <= set(rendered.kinds())
    gateway = rendered.get("Deployment", "llmswarm-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"][gateway["args"].index("--model") + 1] == values["gateway"]["model"]
    heterogeneous = yaml.safe_load((EXAMPLES / "swarm-heterogeneous.yaml").read_text())
    assert values["routeMap"]["swarmName"] == heterogeneous["metadata"]["name"]
    assert heterogeneous["spec"]["model"]["source"] == values["gateway"]["model"]


def test_docs_link_to_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#:]+)\)", DOC.read_text())
    assert links
    for link in links:
        assert (DOC.parent / link).exists(), link

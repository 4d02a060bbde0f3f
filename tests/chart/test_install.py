"""End to end, as far as this machine allows: the rendered chart applied with the real kubectl to the
Kubernetes API emulator, the operator run as the chart's Deployment runs it, and Swarms it reconciles.

The scenario is ci/all-on-values.yaml (every toggle on, a Swarm from values, a token, Kopf peering), with
the operator's listeners moved to free ports on 127.0.0.1 and short intervals. Every request the operator
makes is checked against the RBAC the chart grants it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmswarm_core.model_store import store_key
from llmswarm_operator.manifests import COMPONENT_ROUTEMAP, COMPONENT_SERVER, routemap_name
from llmswarm_operator.settings import package_version
from llmswarm_operator.store import job_name
from tests.chart.cluster import (
    ChartEmulator,
    audit,
    eventually,
    free_port,
    granted,
    helm_install,
    namespace_paths_parsed,
    operator_process,
    running_chart_cluster,
    swarm_phase,
)
from tests.chart.rendering import NAMESPACE, PROMETHEUS_OPERATOR, RELEASE, ROOT, merge, render, scenario_values, selector_matches
from tests.operator.cluster import FakeControllers, Kubectl

OUTPUT = ROOT / "test-output" / "chart"


def install_values(metrics_port: int, health_port: int) -> dict[str, Any]:
    return merge(scenario_values("all-on"), {"operator": {"settings": {
        "metricsPort": metrics_port, "metricsHost": "127.0.0.1", "livenessEndpoint": f"http://127.0.0.1:{health_port}/healthz",
        "reconcileInterval": 0.5, "retryDelay": 0.5, "drainSeconds": 0}}})


def rendered_server_image() -> str:
    return f"ghcr.io/llmswarm/node:{package_version()}"  # the CUDA build, image.tag's default


# ---- the test ---------------------------------------------------------------------------------------------------

def _server_deployments(emulator: ChartEmulator, swarm: str) -> list[dict[str, Any]]:
    return [d for d in emulator.live("deployments") if (d["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == swarm
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == COMPONENT_SERVER]


def pods_matching(controllers: FakeControllers, selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in controllers.live("pods") if selector_matches(selector, p["metadata"].get("labels") or {})]


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status, await response.text()


@pytest.mark.timeout(180)
async def test_install_the_chart_then_the_operator_reconciles_swarms(tmp_path: Path) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    metrics_port, health_port = free_port(), free_port()
    rendered = render(install_values(metrics_port, health_port), api_versions=PROMETHEUS_OPERATOR)
    installed = rendered.installed()
    hooks = sorted((m["kind"], m["metadata"]["annotations"]["helm.sh/hook"]) for m in rendered.manifests if m not in installed)
    assert hooks == [("Job", "pre-delete"), ("Pod", "test"), ("Role", "pre-delete"), ("RoleBinding", "pre-delete"),
                     ("ServiceAccount", "pre-delete")]  # all but the helm test pod and the uninstall hook
    (OUTPUT / "all-on-installed.yaml").write_text(yaml.safe_dump_all(installed, sort_keys=False))

    async with running_chart_cluster(tmp_path, NAMESPACE) as (emulator, controllers, kubectl):
        # 1. What `helm install` does: CRDs from crds/ first, then the templates (hooks aside).
        # Kopf peering (operator.settings.peering): the chart ships the CRDs and creates the peering object.
        await helm_install(emulator, kubectl, installed)
        assert emulator.stored("clusterkopfpeerings", None, "llmswarm") is not None

        # 2. The operator, as its Deployment runs it (command, env, the token from the Secret).
        deployment = rendered.get("Deployment", f"{RELEASE}-operator")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        controllers.all_ready = True
        async with operator_process(deployment, emulator, kubectl.kubeconfig, OUTPUT / "operator-all-on.log") as (process, env):
            assert env["LLMSWARM_TOKEN"] == "ci-token-not-secret"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}

            # Its probes, as the kubelet would call them.
            probe = container["readinessProbe"]["httpGet"]
            await eventually(lambda: _ok(f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"), 60, "the readiness probe")

            # 3. The Swarm from values is reconciled: servers with the chart's image and the spec's extra args.
            swarm = rendered.get("Swarm")
            name = swarm["metadata"]["name"]
            status = await eventually(lambda: swarm_phase(kubectl, name, "Ready"), 60, f"{name} to be Ready")
            assert status["coverage"]["minReplicas"] >= swarm["spec"]["redundancy"]
            servers = [d for d in emulator.live("deployments")
                       if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == COMPONENT_SERVER]
            assert len(servers) == int(status["serversDesired"]) >= 3
            for server in servers:
                server_container = server["spec"]["template"]["spec"]["containers"][0]
                assert server_container["image"] == env["LLMSWARM_OPERATOR_IMAGE"] == rendered_server_image()
                assert server_container["args"][-2:] == ["--max-sessions", "32"]
            routemap = emulator.stored("deployments", NAMESPACE, routemap_name(name))
            assert routemap is not None  # the CPU build, like the operator's own
            assert routemap["spec"]["template"]["spec"]["containers"][0]["image"] == env["LLMSWARM_OPERATOR_ROUTEMAP_IMAGE"] \
                == container["image"]

            # 4. A Swarm applied afterwards, as a user does.
            example = yaml.safe_load((ROOT / "examples" / "swarm-cpu.yaml").read_text())
            out = await kubectl.apply(ROOT / "examples" / "swarm-cpu.yaml")
            assert "swarm.llmswarm.dev/smollm2-cpu created" in out
            await eventually(lambda: swarm_phase(kubectl, example["metadata"]["name"], "Ready"), 60, "smollm2-cpu to be Ready")

            # 5. A rollout: one more server in its pool moves every span; old servers drain and are deleted.
            old = {d["metadata"]["name"] for d in _server_deployments(emulator, "smollm2-cpu")}
            bigger = json.loads(json.dumps(example))
            bigger["spec"]["pools"][0]["minServers"] = 4
            await kubectl.apply(yaml.safe_dump(bigger))

            async def rolled_out() -> bool:
                now = {d["metadata"]["name"] for d in _server_deployments(emulator, "smollm2-cpu")}
                assert len(now) == 4 and not now & old, sorted(now)
                await swarm_phase(kubectl, "smollm2-cpu", "Ready")
                return True
            await eventually(rolled_out, 60, "the rollout to 4 servers")

            # 6. The chart's objects find the operator's: Services, Ingress, PodMonitor, NetworkPolicies.
            routemap_service = rendered.get("Service", f"{RELEASE}-routemap")
            selected = pods_matching(controllers, {"matchLabels": routemap_service["spec"]["selector"]})
            assert [p["metadata"]["labels"]["app.kubernetes.io/component"] for p in selected] == [COMPONENT_ROUTEMAP]
            assert selected[0]["metadata"]["labels"]["llmswarm.dev/swarm"] == name
            backend = rendered.get("Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
            operator_service = emulator.stored("services", NAMESPACE, backend["name"])
            assert operator_service is not None and backend["name"] == routemap_name(name)
            assert operator_service["spec"]["ports"][0]["port"] == backend["port"]["number"]
            monitored = pods_matching(controllers, rendered.get("PodMonitor")["spec"]["selector"])
            components = sorted({p["metadata"]["labels"]["app.kubernetes.io/component"] for p in monitored})
            assert components == [COMPONENT_SERVER, COMPONENT_ROUTEMAP] or components == sorted([COMPONENT_ROUTEMAP, COMPONENT_SERVER])
            assert len(monitored) == len(servers) + int(await _servers_of(kubectl, "smollm2-cpu")) + 2  # + two route maps
            swarms_policy = rendered.get("NetworkPolicy", f"{RELEASE}-swarms")["spec"]["podSelector"]
            assert {p["metadata"]["name"] for p in pods_matching(controllers, swarms_policy)} == {p["metadata"]["name"] for p in monitored}
            operator_monitor = rendered.get("ServiceMonitor", f"{RELEASE}-operator")
            assert pods_matching(controllers, {"matchLabels": rendered.get("Service", f"{RELEASE}-operator")["spec"]["selector"]})
            stored_service = emulator.stored("services", NAMESPACE, f"{RELEASE}-operator")
            assert stored_service is not None
            assert selector_matches(operator_monitor["spec"]["selector"], stored_service["metadata"]["labels"])

            # 7. Its metrics, where the ServiceMonitor scrapes them, with the Swarms' namespace and name.
            _, text = await get_text(f"http://127.0.0.1:{ports['metrics']}/metrics")
            assert f'llmswarm_swarm_ready{{namespace="{NAMESPACE}",swarm="{name}"}} 1.0' in text
            assert f'llmswarm_swarm_ready{{namespace="{NAMESPACE}",swarm="smollm2-cpu"}} 1.0' in text

            # 8. A Swarm with a model store: its claim and fill Job (the emulator's Job controller completes it),
            # then a new revision (a new Job; the old one is deleted once it succeeded).
            stored = json.loads(json.dumps(example))
            stored["metadata"]["name"] = "smollm2-stored"
            stored["spec"]["modelStore"] = {"size": "2Gi"}
            await kubectl.apply(yaml.safe_dump(stored))
            await eventually(lambda: swarm_phase(kubectl, "smollm2-stored", "Ready"), 60, "smollm2-stored to be Ready")
            stored["spec"]["model"]["revision"] = "v2"
            await kubectl.apply(yaml.safe_dump(stored))

            async def refilled() -> bool:
                jobs = [j["metadata"]["name"] for j in emulator.live("jobs")
                        if (j["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == "smollm2-stored"]
                assert jobs == [job_name("smollm2-stored", store_key("smollm2", "v2"))], jobs
                await swarm_phase(kubectl, "smollm2-stored", "Ready")
                return True
            await eventually(refilled, 60, "the store of the new revision")
            assert process.returncode is None

        # 9. Least privilege, checked: every request the operator made is one the chart's RBAC allows.
        used = audit(rendered, emulator, deployment, OUTPUT, "all-on")
        for needed in [("llmswarm.dev", "swarms", "watch"), ("llmswarm.dev", "swarms/status", "patch"), ("apps", "deployments", "create"),
                       ("", "services", "create"), ("", "configmaps", "create"), ("", "pods", "list"), ("", "events", "create"),
                       ("kopf.dev", "clusterkopfpeerings", "patch"), ("apps", "deployments", "patch"), ("apps", "deployments", "delete"),
                       ("", "services", "delete"), ("batch", "jobs", "create"), ("batch", "jobs", "get"),
                       ("batch", "jobs", "list"), ("batch", "jobs", "delete"), ("", "persistentvolumeclaims", "create"),
                       ("", "persistentvolumeclaims", "get")]:
            assert needed in used, f"the operator never made {needed}: the test saw too little"
    log = (OUTPUT / "operator-all-on.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(120)
async def test_install_minimal_operator_watches_its_namespace_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ci/minimal-values.yaml: namespaced RBAC (RoleBinding in one namespace), no metrics, no probes."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    namespace_paths_parsed(monkeypatch)
    rendered = render(merge(scenario_values("minimal"), {"operator": {"settings": {"reconcileInterval": 0.5, "retryDelay": 0.5}}}))
    deployment = rendered.get("Deployment", f"{RELEASE}-operator")
    example = yaml.safe_load((ROOT / "examples" / "swarm-cpu.yaml").read_text())
    async with running_chart_cluster(tmp_path, NAMESPACE) as (emulator, controllers, kubectl):
        namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (NAMESPACE, "other")]
        await kubectl.apply(yaml.safe_dump_all(namespaces))  # as `helm install --create-namespace` and a team did
        await helm_install(emulator, kubectl, rendered.installed())
        controllers.all_ready = True
        async with operator_process(deployment, emulator, kubectl.kubeconfig, OUTPUT / "operator-minimal.log") as (process, env):
            assert env["LLMSWARM_OPERATOR_NAMESPACES"] == NAMESPACE
            elsewhere = {**example, "metadata": {"name": "elsewhere", "namespace": "other"}}
            await kubectl.apply(yaml.safe_dump(elsewhere))
            await kubectl.apply(ROOT / "examples" / "swarm-cpu.yaml")  # into the kubeconfig's namespace: llmswarm
            await eventually(lambda: swarm_phase(kubectl, "smollm2-cpu", "Ready"), 60, "smollm2-cpu to be Ready")
            other = json.loads(await kubectl("get", "swarm", "elsewhere", "-n", "other", "-o", "json"))
            assert "status" not in other, "the operator acted outside the namespaces it watches"
            assert not [d for d in emulator.live("deployments") if d["metadata"]["namespace"] == "other"]
            assert process.returncode is None
        used = audit(rendered, emulator, deployment, OUTPUT, "minimal")
        assert ("llmswarm.dev", "swarms", "watch") in used and ("apps", "deployments", "create") in used
    log = (OUTPUT / "operator-minimal.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


async def _ok(url: str) -> bool:
    status, _ = await get_text(url)
    assert status == 200, status
    return True


async def _servers_of(kubectl: Kubectl, name: str) -> int:
    return int((await kubectl.get_json("swarm", name))["status"]["serversDesired"])


def test_rbac_check_refuses_what_is_not_granted() -> None:
    rendered = render(scenario_values("minimal"))
    account = f"{RELEASE}-operator"
    assert granted(rendered, account, "llmswarm", "apps", "deployments", "create")
    assert not granted(rendered, account, "elsewhere", "apps", "deployments", "create")  # RoleBinding in llmswarm only
    assert not granted(rendered, account, None, "llmswarm.dev", "swarms", "watch")  # no cluster-wide watch when namespaced
    assert granted(rendered, account, None, "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert not granted(rendered, account, "llmswarm", "", "secrets", "list")  # one named Secret is read, none listed
    assert not granted(rendered, "someone-else", "llmswarm", "apps", "deployments", "create")

"""`helm uninstall` with a Swarm from values: the pre-delete hook deletes the Swarm while the operator still runs,
so it does not outlive the operator in Terminating (with its GPU Deployments running).

Helm's own uninstall cannot run against the emulator (docs/testing.md); what is tested is what Helm would run:
the hooks as rendered by the real Helm engine, and the hook Job's command against the emulated cluster with the
operator running as the chart's Deployment runs it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.cluster import (
    ChartEmulator,
    container_environment,
    eventually,
    granted,
    helm_install,
    namespace_paths_parsed,
    operator_process,
    running_chart_cluster,
    swarm_phase,
    verb_of,
)
from tests.chart.rendering import NAMESPACE, RELEASE, ROOT, Rendered, merge, render, scenario_values
from tests.operator.pod_security import restricted_violations

OUTPUT = ROOT / "test-output" / "chart"
VALUES = merge(scenario_values("minimal"), {"swarm": {"create": True, "name": "chat"},
                                            "operator": {"settings": {"reconcileInterval": 0.5, "retryDelay": 0.5}}})


def hooks(r: Rendered) -> list[dict[str, Any]]:
    return [m for m in r.manifests if (m["metadata"].get("annotations") or {}).get("helm.sh/hook") == "pre-delete"]


def test_a_swarm_from_values_comes_with_a_pre_delete_hook() -> None:
    assert not hooks(render(scenario_values("minimal"))), "no Swarm of the release, nothing to delete"
    r = render(VALUES)
    found = {m["kind"]: m for m in hooks(r)}
    assert set(found) == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    for manifest in found.values():
        kubernetes_validate.validate(manifest, "1.37", strict=True)
        annotations = manifest["metadata"]["annotations"]
        assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    weights = {kind: int(m["metadata"]["annotations"]["helm.sh/hook-weight"]) for kind, m in found.items()}
    assert weights["ServiceAccount"] < weights["RoleBinding"] < weights["Job"] and weights["Role"] < weights["RoleBinding"]
    # Its own least privilege: get and delete of that one Swarm, in the release namespace.
    (rule,) = found["Role"]["rules"]
    assert rule == {"apiGroups": ["llmswarm.dev"], "resources": ["swarms"], "resourceNames": ["chat"], "verbs": ["get", "delete"]}
    assert found["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": found["ServiceAccount"]["metadata"]["name"],
                                                 "namespace": NAMESPACE}]
    pod = found["Job"]["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == found["ServiceAccount"]["metadata"]["name"]
    assert restricted_violations(pod["spec"], pod["metadata"]) == []
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    assert container["args"] == [(ROOT / "charts" / "llmswarm" / "files" / "delete_swarms.py").read_text()]
    assert found["Job"]["spec"]["activeDeadlineSeconds"] > int({e["name"]: e["value"] for e in container["env"]}["TIMEOUT"])
    assert all(m not in r.installed() for m in found.values())  # hooks are not part of the install


async def run_hook(job: dict[str, Any], emulator: ChartEmulator, url: str, tmp: Path, timeout: float | None = None) -> tuple[int, str]:
    """The hook Job's container, as a process with the Job's command and env, talking to the emulated API server."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = container_environment(container, emulator, NAMESPACE)
    if timeout is not None:
        env["TIMEOUT"] = str(timeout)
    host, _, port = url.removeprefix("http://").partition(":")
    account = tmp / "serviceaccount"
    account.mkdir(exist_ok=True)
    full = {**os.environ, **env, "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "SERVICEACCOUNT_DIR": str(account)}
    process = await asyncio.create_subprocess_exec(sys.executable, *container["command"][1:], *container["args"], env=full,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


def hook_requests(emulator: ChartEmulator) -> list[tuple[str | None, str, str, str]]:
    return [(r.namespace, r.resource.group, r.resource.plural, verb_of(r))
            for r in list(emulator) if r.headers.get("User-Agent", "") == "llmswarm-uninstall" and r.resource is not None]


@pytest.mark.timeout(120)
async def test_the_hook_deletes_the_swarm_while_the_operator_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    namespace_paths_parsed(monkeypatch)  # the operator watches the release namespace: Kopf lists Namespaces
    r = render(VALUES)
    job = next(m for m in hooks(r) if m["kind"] == "Job")
    deployment = r.get("Deployment", f"{RELEASE}-operator")
    async with running_chart_cluster(tmp_path, NAMESPACE) as (emulator, controllers, kubectl):
        namespace_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        await kubectl.apply(yaml.safe_dump(namespace_doc))
        await helm_install(emulator, kubectl, r.installed())
        controllers.all_ready = True
        url = controllers.url
        async with operator_process(deployment, emulator, kubectl.kubeconfig, OUTPUT / "operator-uninstall.log"):
            await eventually(lambda: swarm_phase(kubectl, "chat", "Ready"), 60, "the release's Swarm to be Ready")
            assert [d for d in emulator.live("deployments") if (d["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == "chat"]
            code, out = await run_hook(job, emulator, url, tmp_path)
            assert code == 0, out
            assert "every Swarm of the release is gone" in out
            assert emulator.stored("swarms", NAMESPACE, "chat") is None

            async def collected() -> bool:
                left = [d["metadata"]["name"] for d in emulator.live("deployments")
                        if (d["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == "chat"]
                assert not left, left
                return True
            await eventually(collected, 20, "the Swarm's Deployments to be collected")
            # Run again (Helm retries a failed uninstall): nothing left, still a success.
            assert (await run_hook(job, emulator, url, tmp_path))[0] == 0
        # Every request of the hook is one its Role allows.
        account = job["spec"]["template"]["spec"]["serviceAccountName"]
        requests = hook_requests(emulator)
        assert {(g, p, v) for _, g, p, v in requests} == {("llmswarm.dev", "swarms", "get"), ("llmswarm.dev", "swarms", "delete")}
        assert all(granted(r, account, *request) for request in requests)


@pytest.mark.timeout(60)
async def test_without_the_operator_the_hook_fails_and_says_what_to_do(tmp_path: Path) -> None:
    r = render(VALUES)
    job = next(m for m in hooks(r) if m["kind"] == "Job")
    async with running_chart_cluster(tmp_path, NAMESPACE) as (emulator, controllers, kubectl):
        await helm_install(emulator, kubectl, [m for m in r.installed() if m["kind"] == "Swarm"])
        # The finalizer the operator would have put there, with no operator to remove it.
        await kubectl("patch", "swarm", "chat", "--type=merge", "-p", '{"metadata": {"finalizers": ["llmswarm.dev/finalizer"]}}')
        code, out = await run_hook(job, emulator, controllers.url, tmp_path, timeout=2)
        assert code == 1
        assert "still there after 2 s: chat" in out and "finalizers" in out and "Is the operator running?" in out

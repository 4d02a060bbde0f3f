"""An emulated cluster to install the chart into: the operator tests' emulator (tests/operator/cluster.py),
serving every kind the chart creates, and the operator run the way the chart's Deployment runs it.

Two things are added to that harness here:

- the emulator answers discovery of the core group with ``groupVersion: "v1"`` (kmock 0.8 says ``"/v1"``,
  which keeps ``kubectl`` from addressing ServiceAccounts, Secrets, Services and ConfigMaps at all);
- :func:`namespace_paths_parsed` makes kmock parse ``/api/v1/namespaces`` and ``/api/v1/namespaces/NAME``
  (the Namespace list and objects; kmock 0.8 reads the segment after ``namespaces`` as a namespace and
  fails on the list with a 500), which Kopf lists and watches when the operator serves chosen namespaces;
- :func:`audit` checks every API request the operator process made (told apart by its User-Agent) against
  the rendered RBAC: the verb, group, resource and namespace of each must be granted to its ServiceAccount;
- :func:`operator_process` starts ``python -m llmswarm_operator`` as a process with the command and the
  environment of the rendered Deployment's container (Secret references resolved from the emulator, as the
  kubelet does), against the emulator's kubeconfig.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kmock
import yaml

from tests.chart.rendering import NAMESPACE, ROOT, Rendered, crd_documents
from tests.operator.cluster import BUILTINS, VERBS, ClusterEmulator, FakeControllers, Kubectl, declare_crd, write_kubeconfig
from tests.operator.conftest import eventually, free_port  # noqa: F401 - also used by the chart tests through here

# What the chart creates beyond the operator tests' kinds, and the kinds of Kopf's peering CRD and of the
# Prometheus Operator (installed on a cluster that uses those toggles).
CHART_RESOURCES = {
    "v1/serviceaccounts": kmock.ResourceInfo(singular="serviceaccount", kind="ServiceAccount", namespaced=True, verbs=VERBS,
                                             shortnames={"sa"}),
    "v1/secrets": kmock.ResourceInfo(singular="secret", kind="Secret", namespaced=True, verbs=VERBS),
    "rbac.authorization.k8s.io/v1/clusterroles": kmock.ResourceInfo(singular="clusterrole", kind="ClusterRole", namespaced=False,
                                                                    verbs=VERBS),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": kmock.ResourceInfo(singular="clusterrolebinding", kind="ClusterRoleBinding",
                                                                           namespaced=False, verbs=VERBS),
    "rbac.authorization.k8s.io/v1/roles": kmock.ResourceInfo(singular="role", kind="Role", namespaced=True, verbs=VERBS),
    "rbac.authorization.k8s.io/v1/rolebindings": kmock.ResourceInfo(singular="rolebinding", kind="RoleBinding", namespaced=True,
                                                                    verbs=VERBS),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(singular="networkpolicy", kind="NetworkPolicy", namespaced=True,
                                                               verbs=VERBS, shortnames={"netpol"}),
    "networking.k8s.io/v1/ingresses": kmock.ResourceInfo(singular="ingress", kind="Ingress", namespaced=True, verbs=VERBS,
                                                         shortnames={"ing"}),
    "monitoring.coreos.com/v1/servicemonitors": kmock.ResourceInfo(singular="servicemonitor", kind="ServiceMonitor", namespaced=True,
                                                                   verbs=VERBS),
    "monitoring.coreos.com/v1/podmonitors": kmock.ResourceInfo(singular="podmonitor", kind="PodMonitor", namespaced=True, verbs=VERBS),
    "kopf.dev/v1/clusterkopfpeerings": kmock.ResourceInfo(singular="clusterkopfpeering", kind="ClusterKopfPeering", namespaced=False,
                                                          verbs=VERBS),
    "kopf.dev/v1/kopfpeerings": kmock.ResourceInfo(singular="kopfpeering", kind="KopfPeering", namespaced=True, verbs=VERBS),
}

PLURALS = {info.kind: key.rsplit("/", 1)[1] for key, info in {**BUILTINS, **CHART_RESOURCES}.items()} | {"Swarm": "swarms"}


class ChartEmulator(ClusterEmulator):
    """The operator tests' emulator, with the core group's discovery answered as a real API server does."""

    async def _serve_version(self, request: kmock.Request) -> Any:  # type: ignore[override]
        payload = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            payload["groupVersion"] = request.resource.version
        return payload

    def stored(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        for (resource, ns, object_name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and object_name == name and not obj.deleted:
                return obj.last.raw  # type: ignore[no-any-return]
        return None

    def live(self, plural: str) -> Iterator[dict[str, Any]]:
        for (resource, _, _), obj in list(self.objects.items()):
            if resource.plural == plural and not obj.deleted:
                yield obj.last.raw


def namespace_paths_parsed(monkeypatch: Any) -> None:
    """Patch kmock's path parser (for one test) so that the Namespace resource's own paths parse."""
    from kmock._internal import parsing

    original = parsing.parse_path

    def parse_path(path: str) -> parsing.ParsedPath:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
            return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
        return original(path)

    monkeypatch.setattr(parsing, "parse_path", parse_path)


@contextlib.asynccontextmanager
async def running_chart_cluster(tmp: Path, namespace: str) -> AsyncIterator[tuple[ChartEmulator, FakeControllers, Kubectl]]:
    """An emulated cluster with no CRD served yet: :func:`install_crds` plays the apiextensions controller."""
    emulator = ChartEmulator()
    for key, info in {**BUILTINS, **CHART_RESOURCES}.items():
        emulator.resources[key] = info
    async with emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        controllers = FakeControllers(emulator, url)
        await controllers.start()
        try:
            yield emulator, controllers, Kubectl(write_kubeconfig(tmp, url, namespace))
        finally:
            await controllers.stop()


async def helm_install(emulator: ChartEmulator, kubectl: Kubectl, installed: list[dict[str, Any]]) -> None:
    """What `helm install` does: the CRDs from crds/ first, then the rendered templates (hooks aside), each
    checked to be stored as rendered."""
    assert sorted(await install_crds(emulator, kubectl, crd_documents())) == [
        "kopf.dev/v1/clusterkopfpeerings", "kopf.dev/v1/kopfpeerings", "llmswarm.dev/v1alpha1/swarms"]
    out = await kubectl.apply(yaml.safe_dump_all(installed))
    for manifest in installed:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        assert f"/{name} created" in out, f"{kind} {name} not created:\n{out}"
        stored = emulator.stored(PLURALS[kind], manifest["metadata"].get("namespace"), name)
        assert stored is not None, f"{kind} {name} is not stored"
        assert {k: stored.get(k) for k in manifest if k not in ("metadata", "status")} == \
            {k: v for k, v in manifest.items() if k not in ("metadata", "status")}, f"{kind} {name} differs"


async def swarm_phase(kubectl: Kubectl, name: str, phase: str) -> dict[str, Any]:
    status = (await kubectl.get_json("swarm", name)).get("status") or {}
    assert status.get("phase") == phase, f"{name}: phase {status.get('phase')}, conditions {status.get('conditions')}"
    return status  # type: ignore[no-any-return]


async def install_crds(emulator: ChartEmulator, kubectl: Kubectl, documents: list[dict[str, Any]]) -> list[str]:
    """`kubectl apply` the CRDs, then serve each stored one (what the API server does once a CRD is established)."""
    out = await kubectl.apply(yaml.safe_dump_all(documents))
    served = []
    for document in documents:
        stored = emulator.stored("customresourcedefinitions", None, document["metadata"]["name"])
        assert stored is not None, f"{document['metadata']['name']} was not stored: {out}"
        served.append(declare_crd(emulator, stored))
    return served


def container_environment(container: dict[str, Any], emulator: ChartEmulator, namespace: str,
                          pod: str = "pod-0") -> dict[str, str]:
    """The container's env as the kubelet gives it: values, the pod's own fields (`pod`: its name), and Secret keys
    read from the cluster."""
    env = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        if "fieldRef" in item["valueFrom"]:
            fields = {"metadata.name": pod, "metadata.namespace": namespace}
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = emulator.stored("secrets", namespace, ref["name"])
        assert secret is not None, f"{item['name']} refers to Secret {ref['name']}, which is not there"
        env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


@contextlib.asynccontextmanager
async def operator_process(deployment: dict[str, Any], emulator: ChartEmulator, kubeconfig: Path,
                           log: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    """The operator as the chart's Deployment runs it: its command (with this interpreter as `python`) and env."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = list(container["command"]) + list(container.get("args") or [])
    assert command[0] == "python", command
    env = container_environment(container, emulator, deployment["metadata"]["namespace"])
    full_env = {**os.environ, **env, "KUBECONFIG": str(kubeconfig)}
    with open(log, "wb") as out:
        process = await asyncio.create_subprocess_exec(sys.executable, *command[1:], env=full_env, cwd=ROOT, stdout=out,
                                                       stderr=asyncio.subprocess.STDOUT)
    try:
        yield process, env
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def verb_of(request: Any) -> str:
    method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if request.params.get("watch") in ("true", "1") else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete" if request.name else "deletecollection"}[method]


def granted(rendered: Rendered, service_account: str, namespace: str | None, group: str, resource: str, verb: str,
            release_namespace: str = NAMESPACE) -> bool:
    """Whether the chart's (Cluster)Roles and bindings let the ServiceAccount do `verb` on `resource` in `namespace`."""
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in rendered.all("ClusterRole") + rendered.all("Role")}
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": release_namespace}
    for binding in rendered.all("ClusterRoleBinding") + rendered.all("RoleBinding"):
        if subject not in binding["subjects"]:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        if scope is not None and scope != namespace:
            continue  # a RoleBinding grants in its own namespace only (and never cluster-wide lists)
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], None if ref["kind"] == "ClusterRole" else scope, ref["name"]))
        assert role is not None, f"{binding['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}"
        for rule in role["rules"]:
            if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
                return True
    return False


def operator_requests(emulator: ChartEmulator) -> list[tuple[str | None, str, str, str]]:
    """(namespace, group, resource[/subresource], verb) of every API request the operator process made.

    A write that sets an owner reference with ``blockOwnerDeletion: true`` also needs ``update`` on the owner's
    ``finalizers`` subresource: the OwnerReferencesPermissionEnforcement admission plugin (on in most clusters)
    refuses it otherwise; that permission is listed too, as the plugin checks it.
    """
    out = []
    for request in list(emulator):
        agent = request.headers.get("User-Agent", "")
        if request.resource is None or request.resource.plural is None or not agent.startswith(("kopf/", "llmswarm-operator")):
            continue  # not the operator, or discovery (allowed to every authenticated client)
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        verb = verb_of(request)
        out.append((request.namespace, request.resource.group, resource, verb))
        if verb in ("create", "patch", "update") and isinstance(request.data, dict):
            for ref in (request.data.get("metadata") or {}).get("ownerReferences") or []:
                if ref.get("blockOwnerDeletion"):
                    group = ref["apiVersion"].rpartition("/")[0]
                    out.append((request.namespace, group, f"{PLURALS[ref['kind']]}/finalizers", "update"))
    return out


def granted_by_operator(emulator: ChartEmulator) -> set[tuple[str | None, str, str, str]]:
    """(namespace, group, resource, verb) of every permission in the Roles the operator wrote: RBAC refuses to
    create or change a Role that grants more than its writer holds (unless it may `escalate`, which it may not)."""
    out = set()
    for request in operator_writes(emulator, "roles"):
        for rule in request.data.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        out.add((request.namespace, group, resource, verb))
    return out


def operator_writes(emulator: ChartEmulator, plural: str) -> list[Any]:
    return [r for r in list(emulator) if r.resource is not None and r.resource.plural == plural and isinstance(r.data, dict)
            and verb_of(r) in ("create", "patch", "update") and r.headers.get("User-Agent", "").startswith("llmswarm-operator")]


def audit(rendered: Rendered, emulator: ChartEmulator, deployment: dict[str, Any], output: Path, name: str) -> list[tuple[str, str, str]]:
    """Every request the operator made must be one the chart's RBAC allows; returns what it used."""
    requests = operator_requests(emulator)
    assert len(requests) > 20
    service_account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    release_namespace = deployment["metadata"]["namespace"]
    denied = sorted({r for r in requests if not granted(rendered, service_account, *r, release_namespace=release_namespace)}, key=str)
    assert denied == [], f"requests the chart's RBAC would refuse: {denied}"
    escalations = sorted({rule for rule in granted_by_operator(emulator)
                          if not granted(rendered, service_account, *rule, release_namespace=release_namespace)}, key=str)
    assert escalations == [], f"the operator grants what it does not hold (the API server refuses such a Role): {escalations}"
    used = sorted({(r[1], r[2], r[3]) for r in requests})
    (output / f"operator-requests-{name}.json").write_text(json.dumps(used, indent=1))
    return used

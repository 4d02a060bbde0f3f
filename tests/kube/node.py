"""One emulated node for the Kubernetes API emulator: the controllers and the kubelet that make pods run.

:class:`KubeNode` extends the operator tests' :class:`~tests.operator.cluster.FakeControllers`
(whose garbage collector it keeps) with what a real cluster's node side does, all through the
emulator's HTTP API:

- **Deployment controller**: pods from each Deployment's template (labelled with
  ``pod-template-hash``, owned by the Deployment), scaled to ``replicas``, replaced when the
  template changes (``Recreate``, or ``RollingUpdate`` within ``maxSurge``/``maxUnavailable``),
  and the Deployment's ``status`` (replicas, updated, ready, available);
- **Job controller**: one pod at a time from each Job's template (``job-name`` label, owned by the Job),
  another after a failed one until ``backoffLimit`` failures (at once: no back-off delay), and the Job's
  ``status`` (active, succeeded, failed, ``Complete`` or ``Failed`` condition);
- **scheduler**: binds a pending pod to this node when its ``nodeSelector`` matches the node's labels,
  or marks it ``Unschedulable``;
- **kubelet** (kubelet.py): runs the containers of the pods bound to this node as real processes,
  each pod in its own network namespace with its own address (network.py);
- **Service DNS**: every pod's ``/etc/hosts`` maps ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc`` and
  ``<svc>.<ns>.svc.cluster.local`` to the addresses of the *ready* pods the Service selects (like a
  headless Service), or to an address that refuses every connection when none is ready (as kube-proxy
  rejects), rewritten when readiness changes; ``kubernetes.default.svc`` is the API server, reached
  over HTTPS through a forwarder in the node namespace that terminates TLS (certificates.py);
- the node's own log (``node.log``) and one log file per container, under ``log_dir``.

Use :func:`running_node` (or ``start``/``stop``): ``stop`` terminates every pod, removes every
namespace and ``/etc/netns`` entry, and the directories it created on this machine, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import secrets
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.chart.rendering import selector_matches
from tests.kube.api import APPS, BATCH, CORE, Api, ApiError, path
from tests.kube.certificates import ApiServerPki, make_pki
from tests.kube.image import Image
from tests.kube.kubelet import PodRunner
from tests.kube.network import NO_ENDPOINTS_IP, NODE_IP, Forwarder, PodNetwork
from tests.kube.volumes import HostPaths
from tests.operator.cluster import ClusterEmulator, FakeControllers

Body = dict[str, Any]

API_PORT = 443  # where pods reach the API server: HTTPS, terminated by the node's forwarder
TEMPLATE_HASH = "pod-template-hash"


def pod_ready(pod: Body) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])


def owned_by(obj: Body, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def template_hash(template: Body) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def scaled(value: int | str | None, replicas: int, default: str, round_up: bool) -> int:
    """maxSurge / maxUnavailable: an int, or a percentage of replicas (surge rounds up, unavailable down)."""
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        exact = replicas * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


class KubeNode(FakeControllers):
    """Deployment controller, scheduler, kubelet and Service DNS of one node (see the module docstring)."""

    def __init__(
        self,
        emulator: ClusterEmulator,
        url: str,
        *,
        work_dir: Path,
        log_dir: Path,
        images: Callable[[str], Image] = lambda ref: Image(),
        name: str = "node-1",
        labels: Mapping[str, str] | None = None,
        configmap_sync: float = 60.0,
        restart_backoff: float = 10.0,
        retry_interval: float = 1.0,
        interval: float = 0.2,
        manages: Callable[[Body], bool] = lambda deployment: True,
        cluster_domain: str = "cluster.local",
        shutdown_grace: float = 10.0,
    ) -> None:
        """`configmap_sync`: seconds between two reads of a ConfigMap/Secret volume (a real kubelet: about 60-90).
        `manages(deployment)`: whether this node's Deployment controller makes pods for it (the operator's own
        Deployment is left alone when the test runs the operator as a process). `shutdown_grace`: the longest
        grace period :meth:`stop` gives a pod."""
        super().__init__(emulator, url, interval)
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.images = images
        self.name = name
        self.labels = dict(labels or {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"})
        self.configmap_sync = configmap_sync
        self.restart_backoff = restart_backoff
        self.retry_interval = retry_interval
        self.manages = manages
        self.cluster_domain = cluster_domain
        self.shutdown_grace = shutdown_grace
        self.api = Api(url)
        self.network = PodNetwork()
        self.host_paths = HostPaths()
        self.runners: dict[str, PodRunner] = {}
        self.problems: list[str] = []  # what the harness could not do: a test should fail on any
        self.endpoints: dict[tuple[str, str], list[str]] = {}  # (namespace, service) -> ready pod addresses
        self._terminations: set[asyncio.Task[None]] = set()
        self._deployment_status: dict[str, Body] = {}
        self._unschedulable: set[str] = set()
        self._started = time.monotonic()
        self._forwarder: Forwarder | None = None
        self.pki: ApiServerPki | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        await self.network.create()
        target = urlsplit(self.url)
        self.pki = make_pki(self.work_dir / "pki", NODE_IP, self.cluster_domain)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.pki.certificate, self.pki.key)
        self._forwarder = Forwarder(self.network.node, NODE_IP, API_PORT, (target.hostname or "127.0.0.1", target.port or 80), tls)
        await self._forwarder.start()
        await super().start()

    async def stop(self) -> None:
        """Stop the controllers, terminate every pod, remove every namespace and what was created on this machine."""
        try:
            await super().stop()
            runners, self.runners = list(self.runners.values()), {}
            await asyncio.gather(*(r.terminate(self.shutdown_grace) for r in runners), *self._terminations,
                                 return_exceptions=True)
        finally:
            if self._forwarder is not None:
                await self._forwarder.stop()
            await self.api.close()
            await self.network.close()
            self.host_paths.cleanup()

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except ApiError as error:  # the API may refuse a write now and then; a controller tries again
                self.event(None, f"API error: {error}")
            except Exception:  # noqa: BLE001 - a harness bug: recorded, and the node keeps going
                self.problem(traceback.format_exc())
            await asyncio.sleep(self.interval)

    async def step(self) -> None:
        await self._collect_garbage()
        deployments = await self.api.list(path(APPS, "deployments"))
        pods = await self.api.list(path(CORE, "pods"))
        await self._run_deployments_from(deployments, pods)
        await self._run_jobs(await self.api.list(path(BATCH, "jobs")), pods)
        await self._schedule(pods)
        self._run_pods(pods)
        self._update_endpoints(await self.api.list(path(CORE, "services")), pods)

    # ---- what tests use ----

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)
            self.event(None, f"PROBLEM: {message}")

    def event(self, pod: PodRunner | None, message: str) -> None:
        stamp = f"{time.monotonic() - self._started:8.2f}"
        with open(self.log_dir / "node.log", "a") as log:
            log.write(f"{stamp} {pod.key + ': ' if pod else ''}{message}\n")

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A container's output (all its runs), like ``kubectl logs``."""
        pattern = f"{namespace}_{pod}_{container or '*'}.log"
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob(pattern)))

    def runner(self, namespace: str, pod: str) -> PodRunner | None:
        return next((r for r in self.runners.values() if r.namespace == namespace and r.name == pod), None)

    def claim_directory(self, namespace: str, claim: str) -> Path:
        """A claim's volume: one folder, made on first use with mode 777 (as a fresh local-path volume is)."""
        directory = self.work_dir / "claims" / f"{namespace}_{claim}"
        if not directory.is_dir():
            directory.mkdir(parents=True)
            directory.chmod(0o777)
        return directory

    def kubelet_env(self) -> dict[str, str]:
        """What the kubelet gives every container for the API server (the ``kubernetes`` Service)."""
        return {
            "KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(API_PORT),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(API_PORT), "KUBERNETES_PORT": f"tcp://{NODE_IP}:{API_PORT}",
            f"KUBERNETES_PORT_{API_PORT}_TCP": f"tcp://{NODE_IP}:{API_PORT}", f"KUBERNETES_PORT_{API_PORT}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{API_PORT}_TCP_PORT": str(API_PORT), f"KUBERNETES_PORT_{API_PORT}_TCP_ADDR": NODE_IP,
        }

    # ---- Deployment controller ----

    async def _run_deployments_from(self, deployments: list[Body], pods: list[Body]) -> None:
        for deployment in deployments:
            if self.manages(deployment):
                await self._reconcile_deployment(deployment, pods)

    async def _reconcile_deployment(self, deployment: Body, pods: list[Body]) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        namespace = meta.get("namespace") or "default"
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        current = template_hash(template)
        owned = [p for p in pods if owned_by(p, meta.get("uid", ""))]
        new = [p for p in owned if (p["metadata"].get("labels") or {}).get(TEMPLATE_HASH) == current]
        old = [p for p in owned if p not in new]
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            if old:
                for pod in old:
                    await self._delete_pod(pod)
                return
            surge, unavailable = 0, replicas
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = scaled(rolling.get("maxSurge"), replicas, "25%", True)
            unavailable = scaled(rolling.get("maxUnavailable"), replicas, "25%", False)
            if surge == 0 and unavailable == 0:
                unavailable = 1
        # Scale down extra new pods, not-ready ones first.
        for pod in sorted(new, key=pod_ready)[: max(0, len(new) - replicas)]:
            await self._delete_pod(pod)
            new.remove(pod)
        for _ in range(max(0, min(replicas - len(new), replicas + surge - len(new) - len(old)))):
            await self._create_pod(deployment, namespace, template, current)
        # Old pods go while enough pods stay ready.
        ready = sum(pod_ready(p) for p in new + old)
        allowed = ready - (replicas - unavailable)
        for pod in sorted(old, key=pod_ready):
            if pod_ready(pod):
                if allowed <= 0:
                    break
                allowed -= 1
            await self._delete_pod(pod)
        await self._write_deployment_status(deployment, owned, new)

    async def _create_pod(self, deployment: Body, namespace: str, template: Body, current: str) -> None:
        meta = deployment["metadata"]
        template_meta = template.get("metadata") or {}
        account = (template.get("spec") or {}).get("serviceAccountName") or "default"
        if account != "default" and await self.api.get(path(CORE, "serviceaccounts", namespace, account)) is None:
            # The ServiceAccount admission plugin refuses the pod; the ReplicaSet controller retries.
            self.event(None, f"{namespace}/{meta['name']}: FailedCreate: pods are forbidden: serviceaccount "
                             f"\"{account}\" not found")
            return
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{current}-{secrets.token_hex(3)[:5]}", "namespace": namespace,
                "labels": {**(template_meta.get("labels") or {}), TEMPLATE_HASH: current},
                "annotations": dict(template_meta.get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": json.loads(json.dumps(template.get("spec") or {})),
            "status": {"phase": "Pending"},
        }
        await self.api.create(path(CORE, "pods", namespace), pod)

    async def _delete_pod(self, pod: Body) -> None:
        await self.api.delete(path(CORE, "pods", pod["metadata"].get("namespace"), pod["metadata"]["name"]))

    async def _write_deployment_status(self, deployment: Body, owned: list[Body], new: list[Body]) -> None:
        meta = deployment["metadata"]
        replicas = int((deployment.get("spec") or {}).get("replicas", 1))
        ready = sum(pod_ready(p) for p in owned)
        status: Body = {
            "observedGeneration": meta.get("generation", 1), "replicas": len(owned), "updatedReplicas": len(new),
            "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": max(0, replicas - ready),
            "conditions": [{"type": "Available", "status": "True" if ready >= replicas else "False",
                            "reason": "MinimumReplicasAvailable" if ready >= replicas else "MinimumReplicasUnavailable"}],
        }
        key = f"{meta.get('namespace')}/{meta['name']}/{meta.get('uid')}"
        if self._deployment_status.get(key) != status:
            await self.api.patch(path(APPS, "deployments", meta.get("namespace"), meta["name"], "status"), {"status": status})
            self._deployment_status[key] = status

    # ---- Job controller ----

    async def _run_jobs(self, jobs: list[Body], pods: list[Body]) -> None:
        for job in jobs:
            meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
            if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in status.get("conditions") or []):
                continue
            phases = [(p.get("status") or {}).get("phase") for p in pods if owned_by(p, meta.get("uid", ""))]
            succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
            active = len(phases) - succeeded - failed
            new: Body = {"active": active, "succeeded": succeeded, "failed": failed}
            if succeeded:
                new.update(active=0, conditions=[{"type": "Complete", "status": "True", "reason": "Completed"}])
            elif failed > int(spec.get("backoffLimit", 6)):
                new.update(active=0, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                  "message": "Job has reached the specified backoff limit"}])
            elif not active:
                await self._create_job_pod(job)
                new["active"] = 1
            if {k: status.get(k, 0 if k != "conditions" else None) for k in new} != new:
                await self.api.patch(path(BATCH, "jobs", meta.get("namespace"), meta["name"], "status"), {"status": new})
                self.event(None, f"Job {meta.get('namespace')}/{meta['name']}: {new}")

    async def _create_job_pod(self, job: Body) -> None:
        meta, template = job["metadata"], (job.get("spec") or {}).get("template") or {}
        labels = {**((template.get("metadata") or {}).get("labels") or {}), "job-name": meta["name"],
                  "batch.kubernetes.io/job-name": meta["name"], "controller-uid": meta.get("uid", "")}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{secrets.token_hex(3)[:5]}", "namespace": meta.get("namespace"), "labels": labels,
                "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta.get("uid"),
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": json.loads(json.dumps(template.get("spec") or {})),
            "status": {"phase": "Pending"},
        }
        await self.api.create(path(CORE, "pods", meta.get("namespace")), pod)

    # ---- scheduler ----

    async def _schedule(self, pods: list[Body]) -> None:
        for pod in pods:
            meta, spec = pod["metadata"], pod.get("spec") or {}
            if spec.get("nodeName"):
                continue
            where = path(CORE, "pods", meta.get("namespace"), meta["name"])
            selector = spec.get("nodeSelector") or {}
            if all(self.labels.get(k) == v for k, v in selector.items()):
                await self.api.patch(where, {"spec": {"nodeName": self.name}})
            elif meta.get("uid") not in self._unschedulable:
                self._unschedulable.add(meta.get("uid", ""))
                await self.api.patch(where + "/status", {"status": {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]}})

    # ---- kubelet ----

    def _run_pods(self, pods: list[Body]) -> None:
        here = {p["metadata"].get("uid", ""): p for p in pods if (p.get("spec") or {}).get("nodeName") == self.name}
        for uid, pod in here.items():
            if uid not in self.runners:
                runner = PodRunner(self, pod)
                self.runners[uid] = runner
                runner.start()
        for uid in [u for u in self.runners if u not in here]:
            runner = self.runners.pop(uid)
            self.event(runner, "deleted from the API: terminating")
            task = asyncio.create_task(runner.terminate())
            self._terminations.add(task)
            task.add_done_callback(self._terminations.discard)

    # ---- Service DNS ----

    def _update_endpoints(self, services: list[Body], pods: list[Body]) -> None:
        endpoints: dict[tuple[str, str], list[str]] = {}
        for service in services:
            meta, spec = service["metadata"], service.get("spec") or {}
            namespace = meta.get("namespace") or "default"
            selector = spec.get("selector")
            if not selector or spec.get("type") == "ExternalName":
                continue
            chosen = [p for p in pods if (p["metadata"].get("namespace") or "default") == namespace and pod_ready(p)
                      and (p.get("status") or {}).get("podIP") and selector_matches({"matchLabels": selector},
                                                                                     p["metadata"].get("labels") or {})]
            for pod in chosen:
                self._check_ports(service, pod)
            endpoints[(namespace, meta["name"])] = sorted(p["status"]["podIP"] for p in chosen)
        self.endpoints = endpoints
        for runner in list(self.runners.values()):
            self.write_network_files(runner)

    def _check_ports(self, service: Body, pod: Body) -> None:
        """Names resolve to pod addresses here, so a Service port must be its target port (no translation)."""
        ports = {p.get("name"): p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or []}
        for port in (service.get("spec") or {}).get("ports") or []:
            target = port.get("targetPort", port["port"])
            number = ports.get(target) if isinstance(target, str) and not target.isdigit() else int(target)
            if number != port["port"]:
                self.problem(f"Service {service['metadata'].get('namespace')}/{service['metadata']['name']}: port {port['port']} "
                             f"goes to {target} ({number}) of pod {pod['metadata']['name']}; this harness resolves Service names "
                             "to pod addresses and cannot translate ports")

    def hosts(self, runner: PodRunner) -> str:
        assert runner.address is not None
        domain = self.cluster_domain
        lines = ["# Kubernetes-managed hosts file (tests/kube): Service names -> ready pod addresses.",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{runner.address.ip}\t{runner.name}"]
        services = {("default", "kubernetes"): [NODE_IP], **self.endpoints}
        for (namespace, name), addresses in sorted(services.items()):
            names = [f"{name}.{namespace}.svc.{domain}", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
            if namespace == runner.namespace:
                names.append(name)
            for address in addresses or [NO_ENDPOINTS_IP]:
                lines.append(f"{address}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def resolv_conf(self, runner: PodRunner) -> str:
        domain = self.cluster_domain
        return (f"# No DNS server here (tests/kube): Service names are in /etc/hosts.\n"
                f"search {runner.namespace}.svc.{domain} svc.{domain} {domain}\nnameserver 127.0.0.1\n"
                "options ndots:5 attempts:1 timeout:1\n")

    def write_network_files(self, runner: PodRunner) -> None:
        if runner.address is not None and not runner.terminating:
            self.network.write(runner.address, "hosts", self.hosts(runner))
            self.network.write(runner.address, "resolv.conf", self.resolv_conf(runner))


@contextlib.asynccontextmanager
async def running_node(emulator: ClusterEmulator, url: str, **options: Any) -> AsyncIterator[KubeNode]:
    """A started :class:`KubeNode`; everything it made is gone afterwards, also when the test failed."""
    node = KubeNode(emulator, url, **options)
    try:
        await node.start()
        yield node
    finally:
        await node.stop()

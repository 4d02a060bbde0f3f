"""The kubelet of the emulated node: each pod's containers run as real processes.

A :class:`PodRunner` per pod bound to the node does what a kubelet does, in this order:

1. **network**: a network namespace with the pod's own address (network.py), and the pod's
   ``/etc/hosts`` (Service names, kept current by the node) and ``/etc/resolv.conf``; also its
   ``/etc/passwd`` and ``/etc/group`` (with the accounts its images add);
2. **volumes**: ``emptyDir`` -> a fresh folder; ``configMap``/``secret`` -> files laid out like the
   kubelet's atomic writer, read again from the API every ``configmap_sync`` seconds (not when the
   object changes: that delay is real, and is what a stale-file bug needs to show);
   ``persistentVolumeClaim`` -> a folder per claim, shared by every pod that mounts it;
   ``hostPath`` -> the path. A missing ConfigMap/Secret keeps the pod in ``ContainerCreating``.
   Unless ``automountServiceAccountToken`` (the pod's, else its ServiceAccount's) says no, every
   container gets ``token``, ``ca.crt`` (the cluster CA) and ``namespace`` at
   ``/var/run/secrets/kubernetes.io/serviceaccount``;
3. **containers**: the argv from ``command``/``args`` (or the image's entrypoint/cmd) with ``$(VAR)``
   expanded; the environment from the image, the kubelet (``HOSTNAME``, ``KUBERNETES_SERVICE_*``),
   ``envFrom`` and ``env`` (values, ``configMapKeyRef``, ``secretKeyRef``, ``fieldRef``), read from
   the API at each start (a missing key is ``CreateContainerConfigError``); started through
   podinit.py inside the pod's namespaces, stdout and stderr to one log file per container;
4. **probes**: startup, readiness and liveness as written (``httpGet`` and ``tcpSocket`` from the
   node's namespace to the pod's address, ``exec`` inside the container's namespaces), with their
   initial delays, periods, timeouts and thresholds; readiness drives the container's ``ready`` and
   the pod's ``Ready`` condition; a failed startup or liveness probe restarts the container;
5. **restarts** as ``restartPolicy`` says, with the kubelet's back-off (at once, then 10 s, doubling
   up to 300 s; reset after 10 minutes of running);
6. **status**: phase, podIP, conditions and containerStatuses, merge-patched to ``/status`` when
   they change;
7. **termination** (the pod left the API): SIGTERM to each container's process, SIGKILL to its
   process group after ``terminationGracePeriodSeconds``, then the namespace is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.kube.api import CORE, path
from tests.kube.network import NODE_IP, PodAddress, connect_in
from tests.kube.volumes import VolumeError, object_data, object_files, write_atomic

if TYPE_CHECKING:
    from tests.kube.node import KubeNode

Body = dict[str, Any]

PODINIT = Path(__file__).resolve().parent / "podinit.py"
#: The service-account volume the kubelet adds (a projected volume on a real node) and where it is mounted.
API_ACCESS = "kube-api-access"
ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: What a container that is not root must still reach: the Python runtime of the "image" (under /root here).
EXPOSE = [os.path.realpath(sys.base_prefix)]
MAX_BACKOFF = 300.0
BACKOFF_RESET = 600.0
_REFERENCE = re.compile(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))")


class ContainerConfigError(RuntimeError):
    """The container cannot be configured yet (a referenced ConfigMap, Secret or key is missing)."""


class NotEmulated(RuntimeError):
    """The pod asks for something this harness does not do (README.md lists what)."""


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``, anything else stays."""
    def one(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name = match.group(2)
        return env[name] if name in env else match.group(0)

    return _REFERENCE.sub(one, text)


def field_value(pod: Body, field_path: str, address: PodAddress | None) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"), "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"), "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": NODE_IP, "status.hostIPs": NODE_IP,
        "status.podIP": address.ip if address else "", "status.podIPs": address.ip if address else "",
    }
    if field_path in simple:
        return str(simple[field_path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise NotEmulated(f"fieldRef {field_path} is not emulated")


class ContainerRunner:
    """One container of a pod: start, probe, restart, kill."""

    def __init__(self, pod: PodRunner, spec: Body) -> None:
        self.pod = pod
        self.spec = spec
        self.name: str = spec["name"]
        self.image = pod.node.images(str(spec.get("image", "")))
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started = False
        self.ready = False
        self.state: Body = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Body = {}
        self.env: dict[str, str] = {}
        self.user: Body = {"uid": 0, "gid": 0, "groups": []}
        self.done = False  # exited and will not be restarted
        self.log_path = pod.node.log_dir / f"{pod.namespace}_{pod.name}_{self.name}.log"
        self._probes: list[asyncio.Task[None]] = []

    # ---- configuration ----

    async def configure(self) -> Body:
        """What podinit.py needs for the next start: argv, env, mounts, workdir, user, readOnlyRoot, expose."""
        pod = self.pod
        assert pod.address is not None
        defined: dict[str, str] = dict(pod.node.kubelet_env())  # what $(VAR) can refer to
        env = {**self.image.env, "HOSTNAME": pod.name}
        for source in self.spec.get("envFrom") or []:
            prefix = str(source.get("prefix", ""))
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    obj = await pod.read(kind, ref["name"])
                    if obj is None:
                        if ref.get("optional"):
                            continue
                        raise ContainerConfigError(f'{kind.lower()} "{ref["name"]}" not found')
                    for name, value in object_data(kind, obj).items():
                        if re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", prefix + name):
                            defined[prefix + name] = value.decode()
        for item in self.spec.get("env") or []:
            value = await self._env_value(item, defined)
            if value is not None:
                defined[item["name"]] = value
        env.update(defined)
        argv = [expand(a, defined) for a in self.image.command(self.spec)]
        if not argv:
            raise NotEmulated(f"container {self.name}: no command and the image has no entrypoint")
        mounts = []
        declared = list(self.spec.get("volumeMounts") or [])
        if API_ACCESS in pod.volumes and not any(m["mountPath"] == ACCOUNT_DIR for m in declared):
            declared.append({"name": API_ACCESS, "mountPath": ACCOUNT_DIR, "readOnly": True})
        for mount in declared:
            if mount["name"] not in pod.volumes:
                raise NotEmulated(f"container {self.name} mounts volume {mount['name']}, which the pod does not declare")
            source = pod.volumes[mount["name"]]
            if mount.get("subPath"):
                source = Path(os.path.realpath(source / expand(mount["subPath"], defined)))
            pod.node.host_paths.ensure(mount["mountPath"], directory=source.is_dir())
            mounts.append({"source": str(source), "target": mount["mountPath"], "readOnly": bool(mount.get("readOnly"))})
        workdir = str(self.spec.get("workingDir") or self.image.workdir)
        if not any(m["target"] == workdir for m in mounts):
            pod.node.host_paths.ensure(workdir)
        context = {**((pod.pod.get("spec") or {}).get("securityContext") or {}), **(self.spec.get("securityContext") or {})}
        user = self._user(context)
        return {"argv": argv, "env": env, "mounts": mounts, "workdir": workdir, "user": user, "expose": EXPOSE,
                "readOnlyRoot": bool(context.get("readOnlyRootFilesystem"))}

    def _user(self, context: Body) -> Body:
        """uid, gid and supplementary groups: the securityContext's (container over pod), else the image's USER."""
        name, _, group = self.image.user.partition(":")
        if (name and not name.isdigit()) or (group and not group.isdigit()):
            raise NotEmulated(f"image user {self.image.user!r}: only numeric users are emulated (there is no /etc/passwd of the image)")
        uid = int(context.get("runAsUser", name or 0))
        gid = int(context.get("runAsGroup", group or 0))
        if context.get("runAsNonRoot") and uid == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
        pod_context = (self.pod.pod.get("spec") or {}).get("securityContext") or {}
        groups = [int(g) for g in ([pod_context["fsGroup"]] if "fsGroup" in pod_context else [])
                  + list(pod_context.get("supplementalGroups") or [])]
        return {"uid": uid, "gid": gid, "groups": sorted({gid, *groups})}

    async def _env_value(self, item: Body, defined: Mapping[str, str]) -> str | None:
        if "valueFrom" not in item:
            return expand(str(item.get("value", "")), defined)
        source = item["valueFrom"]
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in source:
                ref = source[key]
                obj = await self.pod.read(kind, ref["name"])
                data = object_data(kind, obj) if obj is not None else None
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    what = f'{kind.lower()} "{ref["name"]}" not found' if data is None else \
                        f'couldn\'t find key {ref["key"]} in {kind} {self.pod.namespace}/{ref["name"]}'
                    raise ContainerConfigError(what)
                return data[ref["key"]].decode()
        if "fieldRef" in source:
            return field_value(self.pod.pod, source["fieldRef"]["fieldPath"], self.pod.address)
        raise NotEmulated(f"env {item['name']}: valueFrom {sorted(source)} is not emulated")

    # ---- running ----

    async def run(self) -> None:
        """Start the container, wait for it, and restart it as the restartPolicy says, until the pod goes."""
        backoff = 0.0
        while not self.pod.terminating:
            try:
                launch = await self.configure()
            except ContainerConfigError as error:
                self.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                self.pod.changed()
                await asyncio.sleep(self.pod.node.retry_interval)
                continue
            self.env, self.user = launch["env"], launch["user"]
            started = time.monotonic()
            self.process = await self._spawn(launch)
            self.pod.node.event(self.pod, f"Started container {self.name} (pid {self.process.pid}, uid {self.user['uid']}): "
                                f"{' '.join(launch['argv'])[:300]}")
            self.state = {"running": {"startedAt": now()}}
            self.started = "startupProbe" not in self.spec
            self.ready = self.started and "readinessProbe" not in self.spec
            self.pod.changed()
            self._probes = [asyncio.create_task(self._probe_loop(kind, self.spec[f"{kind}Probe"]))
                            for kind in ("startup", "readiness", "liveness") if f"{kind}Probe" in self.spec]
            code = await self.process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the runtime kills what the main process left behind
            for task in self._probes:
                task.cancel()
            exit_code = code if code >= 0 else 128 - code
            finished = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                        "startedAt": self.state.get("running", {}).get("startedAt"), "finishedAt": now()}
            if code < 0:
                finished["signal"] = -code
            self.started = self.ready = False
            self.last_state = {"terminated": finished}
            self.state = {"terminated": finished}
            self.pod.node.event(self.pod, f"Container {self.name} exited with {exit_code}")
            self.pod.changed()
            policy = self.pod.restart_policy
            if self.pod.terminating or policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                self.done = True
                self.pod.changed()
                return
            if time.monotonic() - started > BACKOFF_RESET:
                backoff = 0.0
            if backoff:
                self.state = {"waiting": {"reason": "CrashLoopBackOff",
                                          "message": f"back-off {backoff:g}s restarting failed container={self.name}"}}
                self.pod.changed()
                await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, self.pod.node.restart_backoff), MAX_BACKOFF)
            self.restarts += 1

    async def _spawn(self, launch: Body) -> asyncio.subprocess.Process:
        pod = self.pod
        assert pod.address is not None
        spec_file = pod.directory / f"{self.name}.podinit.json"
        spec_file.write_text(json.dumps({"hostname": pod.name, **launch}))
        with open(self.log_path, "ab") as log:
            return await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", pod.address.namespace, sys.executable, "-I", "-S", str(PODINIT), str(spec_file),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True,
            )

    async def kill(self, grace: float, why: str) -> None:
        """SIGTERM, then SIGKILL to the process group after `grace` seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        for task in self._probes:  # no more probing of a container being stopped
            if task is not asyncio.current_task():
                task.cancel()
        self.pod.node.event(self.pod, f"Killing container {self.name} ({why}), grace period {grace:g} s")
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(process.wait())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    # ---- probes ----

    async def _probe_loop(self, kind: str, probe: Body) -> None:
        period = float(probe.get("periodSeconds", 10))
        timeout = float(probe.get("timeoutSeconds", 1))
        success_threshold = int(probe.get("successThreshold", 1))
        failure_threshold = int(probe.get("failureThreshold", 3))
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        successes = failures = 0
        while True:
            if kind == "startup" or self.started:  # readiness and liveness wait for the startup probe
                ok, message = await self._probe_once(probe, timeout)
                successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
                if not ok:
                    self.pod.node.event(self.pod, f"{kind} probe of {self.name} failed ({failures}/{failure_threshold}): {message}")
                if kind == "startup":
                    if ok:
                        self.started = True
                        self.ready = "readinessProbe" not in self.spec
                        self.pod.changed()
                        return
                    if failures >= failure_threshold:
                        await self.kill(self._grace(probe), "startup probe failed")
                        return
                elif kind == "readiness":
                    if ok and successes >= success_threshold and not self.ready:
                        self.ready = True
                        self.pod.changed()
                    elif not ok and failures >= failure_threshold and self.ready:
                        self.ready = False
                        self.pod.changed()
                elif failures >= failure_threshold:  # liveness
                    await self.kill(self._grace(probe), "liveness probe failed")
                    return
            await asyncio.sleep(period)

    def _grace(self, probe: Body) -> float:
        return float(probe.get("terminationGracePeriodSeconds", self.pod.grace))

    async def _probe_once(self, probe: Body, timeout: float) -> tuple[bool, str]:
        try:
            if "httpGet" in probe:
                async with asyncio.timeout(timeout):
                    return await self._http_probe(probe["httpGet"], timeout)
            if "tcpSocket" in probe:
                host = probe["tcpSocket"].get("host") or self._pod_ip()
                _, writer = await connect_in(self.pod.node.network.node, host, self._port(probe["tcpSocket"]["port"]), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                return await self._exec_probe([str(a) for a in probe["exec"]["command"]], timeout)
        except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
            return False, f"{type(error).__name__}: {error}"
        self.pod.node.problem(f"pod {self.pod.key}: probe {sorted(probe)} is not emulated")
        return False, "not emulated"

    def _pod_ip(self) -> str:
        assert self.pod.address is not None
        return self.pod.address.ip

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for item in self.spec.get("ports") or []:
            if item.get("name") == port:
                return int(item["containerPort"])
        raise ValueError(f"container {self.name} has no port named {port!r}")

    async def _http_probe(self, get: Body, timeout: float) -> tuple[bool, str]:
        host = get.get("host") or self._pod_ip()
        port = self._port(get["port"])
        reader, writer = await connect_in(self.pod.node.network.node, host, port, timeout)
        if str(get.get("scheme", "HTTP")).upper() == "HTTPS":  # the kubelet does not verify certificates
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await writer.start_tls(context)
        headers = {"Host": f"{host}:{port}", "User-Agent": "kube-probe/1.37", "Accept": "*/*", "Connection": "close"}
        headers.update({h["name"]: h["value"] for h in get.get("httpHeaders") or []})
        request = f"GET {get.get('path', '/')} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            writer.write(request.encode())
            await writer.drain()
            status_line = (await reader.readline()).decode(errors="replace").strip()
        finally:
            writer.close()
        code = int(status_line.split()[1])
        return 200 <= code < 400, status_line

    async def _exec_probe(self, command: list[str], timeout: float) -> tuple[bool, str]:
        process = self.process
        if process is None or process.returncode is not None:
            return False, "container not running"
        probe = await asyncio.create_subprocess_exec(
            "nsenter", "--target", str(process.pid), "--net", "--mount", "--uts",
            f"--setuid={self.user['uid']}", f"--setgid={self.user['gid']}", "--", *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=self.env, start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout):
                out, _ = await probe.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(probe.pid, signal.SIGKILL)
            await probe.wait()
            return False, f"timed out after {timeout:g} s"
        return probe.returncode == 0, out.decode(errors="replace")[-300:]

    def status(self) -> Body:
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"tests-kube://{self.process.pid}" if self.process else "",
            "ready": self.ready, "started": self.started, "restartCount": self.restarts,
            "state": self.state, "lastState": self.last_state,
        }


class PodRunner:
    """One pod on the node: its namespace, volumes, containers and status."""

    def __init__(self, node: KubeNode, pod: Body) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.name: str = meta["name"]
        self.namespace: str = meta.get("namespace") or "default"
        self.uid: str = meta.get("uid", "")
        self.key = f"{self.namespace}/{self.name}"
        spec = pod.get("spec") or {}
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.grace = float(spec.get("terminationGracePeriodSeconds", 30))
        self.directory = node.work_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.address: PodAddress | None = None
        self.volumes: dict[str, Path] = {}
        self.containers = [ContainerRunner(self, c) for c in spec.get("containers") or []]
        self.terminating = False
        self.start_time: str | None = None
        self.waiting: str | None = "ContainerCreating"
        self._changed = asyncio.Event()
        self._written: Body | None = None
        self._transitions: dict[str, tuple[str, str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._volume_files: dict[str, Any] = {}
        self.volumes_synced: float | None = None  # time.monotonic() of the last read of ConfigMap/Secret volumes

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name=f"pod {self.key}"))
        self._tasks.append(asyncio.create_task(self._publish(), name=f"status {self.key}"))

    def changed(self) -> None:
        self._changed.set()

    async def read(self, kind: str, name: str) -> Body | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        return await self.node.api.get(path(CORE, plural, self.namespace, name))

    # ---- lifecycle ----

    async def _run(self) -> None:
        try:
            unsupported = [k for k in ("initContainers", "ephemeralContainers") if (self.pod.get("spec") or {}).get(k)]
            if unsupported:
                raise NotEmulated(f"{', '.join(unsupported)} are not emulated")
            self.directory.mkdir(parents=True, exist_ok=True)
            self.address = await self.node.network.add_pod()
            self.node.write_network_files(self)
            self._write_accounts()
            while True:
                try:
                    await self._set_up_volumes()
                    break
                except VolumeError as error:
                    self.node.event(self, f"FailedMount: {error}")
                    await asyncio.sleep(self.node.retry_interval)
            self.volumes_synced = time.monotonic()
            self.start_time = now()
            self.waiting = None
            self._tasks.append(asyncio.create_task(self._refresh_volumes(), name=f"volumes {self.key}"))
            await asyncio.gather(*(c.run() for c in self.containers))
        except asyncio.CancelledError:
            raise
        except NotEmulated as error:
            self.waiting = "NotEmulated"
            self.node.problem(f"pod {self.key}: {error}")
            self.changed()
        except Exception:  # noqa: BLE001 - a harness bug: say so, loudly
            self.node.problem(f"pod {self.key}: {traceback.format_exc()}")

    def _write_accounts(self) -> None:
        """The images' /etc/passwd and /etc/group (this machine's, plus the accounts the images add), which
        ``ip netns exec`` mounts over /etc like hosts: so ``getpwuid`` knows the image's user, as in the image."""
        assert self.address is not None
        for name in ("passwd", "group"):
            lines = Path(f"/etc/{name}").read_text().splitlines()
            known = {line.split(":")[0] for line in lines}
            for container in self.containers:
                for line in getattr(container.image, name):
                    if line.split(":")[0] not in known:
                        lines.append(line)
                        known.add(line.split(":")[0])
            self.node.network.write(self.address, name, "\n".join(lines) + "\n")

    async def terminate(self, grace: float | None = None) -> None:
        """The pod left the API: stop its containers (SIGTERM, then SIGKILL after the grace period)."""
        self.terminating = True
        wait = self.grace if grace is None else min(grace, self.grace)
        try:
            await asyncio.gather(*(c.kill(wait, "pod deleted") for c in self.containers))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            if self.address is not None:  # (also kills whatever is left in the namespace)
                await self.node.network.remove_pod(self.address)

    # ---- volumes ----

    async def _set_up_volumes(self) -> None:
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            target = self.directory / "volumes" / name
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o777)
                self._own(target)
            elif "configMap" in volume or "secret" in volume:
                await self._write_object_volume(volume, target)
            elif "persistentVolumeClaim" in volume:
                target = self.node.claim_directory(self.namespace, volume["persistentVolumeClaim"]["claimName"])
                self._own(target)  # the kubelet applies fsGroup to a claim's volume as to an emptyDir
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    target.mkdir(parents=True, exist_ok=True)
                elif kind in ("Directory", "File") and not target.exists():
                    raise VolumeError(f"hostPath {target} does not exist")
            else:
                raise NotEmulated(f"volume {name}: {sorted(set(volume) - {'name'})} is not emulated")
            self.volumes[name] = target
        if await self._automount():
            target = self.directory / "volumes" / API_ACCESS
            assert self.node.pki is not None
            account = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
            write_atomic(target, {"token": (f"tests-kube:{self.namespace}:{account}".encode(), 0o644),
                                  "ca.crt": (self.node.pki.ca.read_bytes(), 0o644),
                                  "namespace": (self.namespace.encode(), 0o644)})
            self._own(target)
            self.volumes[API_ACCESS] = target

    async def _automount(self) -> bool:
        """Whether the pod gets its ServiceAccount's token: the pod's setting, else the ServiceAccount's, else yes."""
        spec = self.pod.get("spec") or {}
        if "automountServiceAccountToken" in spec:
            return bool(spec["automountServiceAccountToken"])
        account = await self.node.api.get(path(CORE, "serviceaccounts", self.namespace, spec.get("serviceAccountName") or "default"))
        return bool((account or {}).get("automountServiceAccountToken", True))

    async def _write_object_volume(self, volume: Body, target: Path) -> bool:
        kind = "ConfigMap" if "configMap" in volume else "Secret"
        source = volume["configMap"] if kind == "ConfigMap" else volume["secret"]
        obj = await self.read(kind, source.get("name") if kind == "ConfigMap" else source.get("secretName"))
        files = object_files(kind, source, obj)
        if self._volume_files.get(volume["name"]) == files:
            return False
        write_atomic(target, files)
        self._own(target)
        self._volume_files[volume["name"]] = files
        return True

    def _own(self, target: Path) -> None:
        """``fsGroup``: the volume's files belong to that group, its folders are group-writable and setgid."""
        group = ((self.pod.get("spec") or {}).get("securityContext") or {}).get("fsGroup")
        if group is None:
            return
        for root, directories, files in os.walk(target):
            os.lchown(root, -1, int(group))
            os.chmod(root, os.stat(root).st_mode | 0o2070)
            for name in directories + files:
                os.lchown(os.path.join(root, name), -1, int(group))

    async def _refresh_volumes(self) -> None:
        """The kubelet's sync loop: ConfigMap and Secret volumes are read again every `configmap_sync` seconds."""
        while True:
            await asyncio.sleep(self.node.configmap_sync)
            self.volumes_synced = time.monotonic()
            for volume in (self.pod.get("spec") or {}).get("volumes") or []:
                if "configMap" in volume or "secret" in volume:
                    with contextlib.suppress(VolumeError):
                        if await self._write_object_volume(volume, self.volumes[volume["name"]]):
                            self.node.event(self, f"volume {volume['name']} updated from the API")

    # ---- status ----

    def status(self) -> Body:
        ready = bool(self.containers) and all(c.ready for c in self.containers) and not self.waiting
        phase = "Pending"
        if not self.waiting and any("waiting" not in c.state for c in self.containers):
            phase = "Running"
        if self.containers and all(c.done for c in self.containers):
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        conditions = {"PodScheduled": True, "Initialized": True, "ContainersReady": ready, "Ready": ready}
        statuses = [c.status() for c in self.containers]
        if self.waiting:
            for item in statuses:
                item["state"] = {"waiting": {"reason": self.waiting}}
        out: Body = {
            "phase": phase, "hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}],
            "conditions": [self._condition(kind, value) for kind, value in conditions.items()],
            "containerStatuses": statuses, "qosClass": "BestEffort",
        }
        if self.address is not None:
            out["podIP"], out["podIPs"] = self.address.ip, [{"ip": self.address.ip}]
        if self.start_time:
            out["startTime"] = self.start_time
        return out

    def _condition(self, kind: str, value: bool) -> Body:
        status = "True" if value else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now())
        return {"type": kind, "status": status, "lastTransitionTime": self._transitions[kind][1]}

    async def _publish(self) -> None:
        """Write the pod's status whenever it changes (one writer per pod, as the kubelet's status manager)."""
        while not self.terminating:
            status = self.status()
            if status != self._written:
                try:
                    await self.node.api.patch(path(CORE, "pods", self.namespace, self.name, "status"), {"status": status})
                    self._written = status
                except Exception as error:  # noqa: BLE001 - the API may be busy or the pod gone: try again later
                    self.node.event(self, f"status update failed: {error!r}")
                    await asyncio.sleep(self.node.retry_interval)
                    continue
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):  # (asyncio.wait_for in 3.11 can swallow a cancellation)
                    await self._changed.wait()

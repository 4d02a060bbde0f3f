"""The node harness itself, with small pods of its own (Python's http.server): what runs, how it is reached, what it sees.

Each test starts an emulated cluster with one node (tests/kube/cluster.py) and checks one part of the
kubelet's contract; every test ends by checking that the node left nothing behind (namespaces,
/etc/netns entries, directories it created) and hit no problem it could not emulate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.kube.cluster import Cluster, cluster_with_node, needs_netns
from tests.kube.image import from_dockerfile
from tests.kube.kubelet import expand
from tests.kube.network import NETNS_RUN, connect_in, namespaces_with_prefix
from tests.kube.node import pod_ready
from tests.kube.volumes import write_atomic
from tests.operator.conftest import eventually

T = TypeVar("T")

APP = '''
import http.server, json, os, socket, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok"
        elif self.path == "/whoami":
            writes = {}
            for where in ("/srv/kube-test-scratch/probe", "/var/tmp/kube-test-probe"):
                try:
                    open(where, "w").close()
                    writes[where] = "ok"
                except OSError as error:
                    writes[where] = error.strerror
            body = json.dumps({"hostname": socket.gethostname(), "env": dict(os.environ), "uid": os.getuid(), "gid": os.getgid(),
                               "groups": os.getgroups(), "writes": writes,
                               "scratch_group": os.stat("/srv/kube-test-scratch").st_gid}).encode()
        elif self.path.startswith("/file/"):
            body = open(self.path[len("/file"):], "rb").read()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("serving", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
'''

CLIENT = '''
import json, os, socket, ssl, urllib.request
out = {"resolved": {}, "whoami": {}}
for name in ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local"):
    out["resolved"][name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 8080, type=socket.SOCK_STREAM)})
    out["whoami"][name] = json.load(urllib.request.urlopen(f"http://{name}:8080/whoami", timeout=5))["hostname"]
out["greeting"] = urllib.request.urlopen("http://web:8080/file/srv/kube-test-app/greeting.txt", timeout=5).read().decode()
# The API server as an in-cluster client reaches it: HTTPS verified with the service account's CA.
account = "/var/run/secrets/kubernetes.io/serviceaccount"
tls = ssl.create_default_context(cafile=f"{account}/ca.crt")
namespace = open(f"{account}/namespace").read()
service = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
for base in ("https://kubernetes.default.svc", service):
    request = urllib.request.Request(f"{base}/api/v1/namespaces/{namespace}/pods",
                                     headers={"Authorization": "Bearer " + open(f"{account}/token").read()})
    pods = json.load(urllib.request.urlopen(request, timeout=5, context=tls))
    out.setdefault("api_pods", []).append(sorted(p["metadata"]["name"] for p in pods["items"]))
try:
    socket.create_connection(("nothing-ready", 8080), timeout=3)
    out["nothing_ready"] = "connected"
except OSError as error:
    out["nothing_ready"] = type(error).__name__
print("RESULT " + json.dumps(out), flush=True)
'''


def manifests(greeting: str = "hello v1") -> list[dict[str, Any]]:
    labels = {"app": "web"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app", "namespace": "default"},
         "data": {"app.py": APP, "greeting.txt": greeting}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "default"},
         "data": {"token": base64.b64encode(b"s3cret").decode()}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{
                 "name": "web", "image": "ghcr.io/llmswarm/node:test",
                 "command": ["python", "/srv/kube-test-app/app.py"], "args": ["$(PORT)"],
                 "env": [
                     {"name": "PORT", "value": "8080"},
                     {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                     {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting.txt"}}},
                     {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                     {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                     {"name": "WHERE", "value": "$(POD_IP):$(PORT) $$(PORT)"},
                 ],
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "app", "mountPath": "/srv/kube-test-app", "readOnly": True},
                                  {"name": "scratch", "mountPath": "/srv/kube-test-scratch"}],
                 "securityContext": {"readOnlyRootFilesystem": True},
             }],
             "securityContext": {"fsGroup": 2000},
             "volumes": [{"name": "app", "configMap": {"name": "app"}}, {"name": "scratch", "emptyDir": {}}],
         }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nothing-ready", "namespace": "default"},
         "spec": {"selector": {"app": "none"}, "ports": [{"port": 8080}]}},
    ]


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "ghcr.io/llmswarm/node:test", "command": command, **spec.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"test": name}},
            "spec": {"containers": [container], **spec}}


async def until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Wait until a plain (not async) check is truthy."""
    async def check() -> T:
        return predicate()
    return await eventually(check, timeout, what)


def live(cluster: Cluster, plural: str) -> list[dict[str, Any]]:
    return list(cluster.emulator.live(plural))


def stored_pod(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return cluster.emulator.stored("pods", "default", name)


async def phase(cluster: Cluster, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = stored_pod(cluster, name)
        return found if found and (found.get("status") or {}).get("phase") in phases else None
    return await eventually(check, timeout, f"pod {name} in phase {phases}")


def result_of(cluster: Cluster, name: str) -> dict[str, Any]:
    log = cluster.node.logs("default", name)
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result in the log of {name}:\n{log}"
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


@pytest.fixture
async def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    async with cluster_with_node(tmp_path, f"node-{request.node.name}", configmap_sync=3.0, restart_backoff=1.0) as running:
        prefix, created = running.node.network.prefix, running.node.host_paths
        yield running
        assert running.node.problems == []
    assert namespaces_with_prefix(prefix) == []
    assert [p for p in created.created if p.exists()] == []


# ---- pure parts ------------------------------------------------------------------------------------------------

def test_expansion_follows_kubernetes() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)-$$-$", env) == "1-two-$(C)-$(A)-$-$"


def test_the_node_image_comes_from_its_dockerfile(tmp_path: Path) -> None:
    image = from_dockerfile(Path(__file__).resolve().parents[2] / "node_image" / "Dockerfile", {"VARIANT": "cpu"},
                            replace_paths={"/opt/llmswarm": "/venv"})
    assert image.env["PATH"].startswith("/venv/bin:")
    assert image.env["LLMSWARM_CACHE"] == "/var/cache/llmswarm" and image.env["HOME"] == "/var/cache/llmswarm"
    assert image.workdir == "/var/cache/llmswarm"
    assert image.command({"args": ["--model", "x"]}) == ["llmswarm", "serve", "--model", "x"]
    assert image.command({}) == ["llmswarm", "serve", "--model", "smollm2", "--blocks", "0:30", "--host", "0.0.0.0", "--port", "8701"]
    assert image.command({"command": ["python"], "args": ["-V"]}) == ["python", "-V"]


def test_atomic_writer_layout(tmp_path: Path) -> None:
    write_atomic(tmp_path, {"a.json": (b"1", 0o644), "dir/b": (b"2", 0o600)})
    first = (tmp_path / "..data").readlink()
    assert (tmp_path / "a.json").read_text() == "1" and (tmp_path / "dir" / "b").read_text() == "2"
    assert (tmp_path / "a.json").readlink() == Path("..data/a.json")
    write_atomic(tmp_path, {"a.json": (b"3", 0o644)})
    assert (tmp_path / "a.json").read_text() == "3" and not (tmp_path / "dir").exists()
    assert not (tmp_path / first).exists()


# ---- the node --------------------------------------------------------------------------------------------------

@needs_netns
@pytest.mark.timeout(120)
async def test_deployment_pods_run_for_real_behind_their_service(cluster: Cluster) -> None:
    await cluster.kubectl.apply(yaml.safe_dump_all(manifests()))

    async def two_ready() -> list[dict[str, Any]]:
        pods = [p for p in live(cluster, "pods") if (p["metadata"].get("labels") or {}).get("app") == "web"]
        return pods if len(pods) == 2 and all(pod_ready(p) for p in pods) else []
    pods = await eventually(two_ready, 60, "two ready web pods")
    addresses = {p["status"]["podIP"] for p in pods}
    assert len(addresses) == 2 and all(a.startswith("10.244.") for a in addresses)

    async def deployment_status() -> dict[str, Any] | None:
        status = (await cluster.kubectl.get_json("deployment", "web")).get("status") or {}
        return status if status.get("readyReplicas") == 2 else None
    status = await eventually(deployment_status, 10, "the Deployment's status")
    assert status["updatedReplicas"] == 2 and status["availableReplicas"] == 2
    assert all(p["metadata"]["labels"]["pod-template-hash"] for p in pods)

    await cluster.kubectl.apply(yaml.safe_dump(pod("client", ["python", "-c", CLIENT], restartPolicy="Never")))
    done = await phase(cluster, "client", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", cluster.node.logs("default", "client")
    result = result_of(cluster, "client")
    names = {p["metadata"]["name"] for p in pods}
    for name, resolved in result["resolved"].items():
        assert set(resolved) == addresses, name
        assert result["whoami"][name] in names  # the pod's hostname is its name
    assert result["greeting"] == "hello v1"
    assert all(set(listed) >= names | {"client"} for listed in result["api_pods"])  # pods reach the API server
    assert result["nothing_ready"] == "ConnectionRefusedError"  # a Service without ready pods refuses

    # What one of the web pods sees: env from the Secret, the ConfigMap, fields and $(VAR) expansion.
    web = pods[0]
    seen = json.loads(await _fetch_in(cluster, web["status"]["podIP"], "/whoami"))
    env = seen["env"]
    assert env["TOKEN"] == "s3cret" and env["GREETING"] == "hello v1" and env["POD_NAME"] == web["metadata"]["name"]
    assert env["WHERE"] == f"{web['status']['podIP']}:8080 $(PORT)"
    assert env["PATH"].startswith(str(Path(__file__).resolve().parents[2] / ".venv" / "bin")) or "/bin" in env["PATH"]
    assert env["KUBERNETES_SERVICE_HOST"] == "10.244.0.1" and env["HOSTNAME"] == web["metadata"]["name"]
    assert "PYTEST_CURRENT_TEST" not in env  # the pod's environment is the image's and its own, not the harness's
    # The image's user (USER 10001:10001), fsGroup on the volume, a read-only root filesystem but writable volumes.
    assert (seen["uid"], seen["gid"], sorted(seen["groups"])) == (10001, 10001, [2000, 10001])
    assert seen["scratch_group"] == 2000
    assert seen["writes"] == {"/srv/kube-test-scratch/probe": "ok", "/var/tmp/kube-test-probe": "Read-only file system"}


async def _fetch_in(cluster: Cluster, address: str, where: str) -> str:
    reader, writer = await connect_in(cluster.node.network.node, address, 8080, 5)
    writer.write(f"GET {where} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


@needs_netns
@pytest.mark.timeout(120)
async def test_a_configmap_volume_changes_only_at_the_kubelet_sync_and_env_only_at_restart(cluster: Cluster) -> None:
    watcher = pod("watcher", ["python", "-c", (
        "import os, time\n"
        "last = None\n"
        "while True:\n"
        "    text = open('/srv/kube-test-app/greeting.txt').read()\n"
        "    if text != last:\n"
        "        print(f'{time.time():.2f} FILE {text} ENV {os.environ[\"GREETING\"]}', flush=True)\n"
        "        last = text\n"
        "    time.sleep(0.1)\n")],
        container={"env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting.txt"}}}],
                   "volumeMounts": [{"name": "app", "mountPath": "/srv/kube-test-app"}]},
        volumes=[{"name": "app", "configMap": {"name": "app"}}])
    await cluster.kubectl.apply(yaml.safe_dump_all([manifests()[0], watcher]))

    def seen(text: str) -> list[str]:
        return [line for line in cluster.node.logs("default", "watcher").splitlines() if f"FILE {text}" in line]
    await until(lambda: seen("hello v1"), 30, "the first greeting")
    changed = time.time()
    await cluster.kubectl.apply(yaml.safe_dump(manifests("hello v2")[0]))
    (line,) = await until(lambda: seen("hello v2"), 30, "the new greeting in the file")
    delay = float(line.split()[0]) - changed
    assert 0.5 < delay < 3.0 + 1.5, delay  # not at once: at the node's next sync (every 3 s here)
    assert line.endswith("ENV hello v1")  # the environment is read at container start only


@needs_netns
@pytest.mark.timeout(120)
async def test_probes_restart_a_dead_container_and_set_readiness(cluster: Cluster) -> None:
    # Liveness over TCP on a port nothing listens on: restarted, with the back-off (1 s here, then 2 s).
    dead = pod("dead", ["python", "-c", "import time; print('up', flush=True); time.sleep(600)"], container={
        "livenessProbe": {"tcpSocket": {"port": 9999}, "periodSeconds": 1, "failureThreshold": 2}},
        terminationGracePeriodSeconds=1)
    # Readiness by exec, inside the container's mounts: ready once the container wrote the file.
    slow = pod("slow", ["sh", "-c", "sleep 2; touch /srv/kube-test-scratch/ready; exec sleep 600"], container={
        "readinessProbe": {"exec": {"command": ["test", "-f", "/srv/kube-test-scratch/ready"]}, "periodSeconds": 1},
        "volumeMounts": [{"name": "scratch", "mountPath": "/srv/kube-test-scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}])
    started = time.monotonic()
    await cluster.kubectl.apply(yaml.safe_dump_all([dead, slow]))

    async def restarted_twice() -> bool:
        found = stored_pod(cluster, "dead")
        statuses = (found or {}).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0) >= 2
    await eventually(restarted_twice, 60, "two restarts")
    await until(lambda: cluster.node.logs("default", "dead").count("up") >= 3, 10, "the third run")
    events = (cluster.node.log_dir / "node.log").read_text()
    assert "liveness probe of main failed (2/2)" in events and "Killing container main (liveness probe failed)" in events
    found = stored_pod(cluster, "slow")
    assert found is not None

    async def slow_ready() -> bool:
        found = stored_pod(cluster, "slow")
        return found is not None and pod_ready(found)
    await eventually(slow_ready, 30, "slow ready")
    assert time.monotonic() - started > 2


@needs_netns
@pytest.mark.timeout(120)
async def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_period(cluster: Cluster) -> None:
    stubborn = pod("stubborn", ["python", "-c", (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True))\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(0.1)\n")], terminationGracePeriodSeconds=2)
    await cluster.kubectl.apply(yaml.safe_dump(stubborn))
    await until(lambda: "up" in cluster.node.logs("default", "stubborn"), 30, "the pod up")
    runner = cluster.node.runner("default", "stubborn")
    assert runner is not None and runner.address is not None
    process = runner.containers[0].process
    assert process is not None
    deleted = time.monotonic()
    await cluster.kubectl("delete", "pod", "stubborn", "--wait=false")
    await asyncio.wait_for(process.wait(), 15)
    took = time.monotonic() - deleted
    assert "TERM" in cluster.node.logs("default", "stubborn")
    assert 2 <= took < 5, took
    assert process.returncode == -9  # SIGKILL after the grace period
    namespace = runner.address.namespace
    await until(lambda: not (NETNS_RUN / namespace).exists(), 10, "its network namespace removed")


@needs_netns
@pytest.mark.timeout(120)
async def test_jobs_run_a_pod_to_its_end_and_retry_up_to_their_backoff_limit(cluster: Cluster) -> None:
    """The Job controller: a pod from the template (restartPolicy Never); Complete once one succeeded; a failed
    pod is replaced until backoffLimit failures, then Failed. Both pods write to one claim (shared folder)."""
    def job(name: str, script: str, backoff: int) -> dict[str, Any]:
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default"},
                "spec": {"backoffLimit": backoff, "template": {"metadata": {"labels": {"test": name}}, "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "ghcr.io/llmswarm/node:test", "command": ["sh", "-c", script],
                                    "volumeMounts": [{"name": "data", "mountPath": "/srv/kube-test-claim"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}}}
    await cluster.kubectl.apply(yaml.safe_dump_all([job("good", "echo done >> /srv/kube-test-claim/good", 2),
                                                    job("bad", "echo try >> /srv/kube-test-claim/bad; exit 3", 1)]))

    def condition(name: str) -> str | None:
        found = cluster.emulator.stored("jobs", "default", name) or {}
        return next((c["type"] for c in (found.get("status") or {}).get("conditions") or [] if c.get("status") == "True"), None)
    await until(lambda: condition("good") == "Complete" and condition("bad") == "Failed", 60, "both Jobs to end")
    claim = cluster.node.claim_directory("default", "data")
    assert (claim / "good").read_text() == "done\n"
    assert (claim / "bad").read_text() == "try\ntry\n"  # the first run and one retry (backoffLimit 1)
    bad = cluster.emulator.stored("jobs", "default", "bad") or {}
    assert bad["status"]["failed"] == 2 and bad["status"]["active"] == 0
    pods = [p for p in live(cluster, "pods") if (p["metadata"].get("labels") or {}).get("job-name") == "bad"]
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Failed"}

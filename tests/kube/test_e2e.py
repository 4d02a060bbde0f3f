"""End to end on the emulated node: the chart (real Helm engine) and ``examples/swarm-cpu.yaml`` applied with
``kubectl``, the real operator as a process, and the pods it asks for run for real by the node harness; a
client pod generates through the swarm and gets exactly local transformers' greedy tokens.

Only the model differs from the example: a tiny random Llama (6 blocks, saved as safetensors, given with
``spec.model.architecture`` as docs/operator.md says for a model outside the catalog), so that three real
servers load in seconds. Pods see this machine's filesystem (README.md), so its directory (in test-output/,
not /tmp: the operator gives pods a /tmp of their own) is the model source. Nothing else in the chart or the
example is changed, except the operator's listeners (free ports on 127.0.0.1: the operator runs as a process
here), its reconcile interval (2 s) and drainSeconds (5 s: an old server goes long before the kubelet refreshes a
mounted ConfigMap, so a route map that waited for that refresh would fail the rollout test).

test_e2e_smollm2.py runs the example exactly as written (opt-in: it takes minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from llmswarm_operator.manifests import COMPONENT_SERVER, routemap_name
from tests.chart.cluster import namespace_paths_parsed, operator_process, swarm_phase
from tests.chart.rendering import NAMESPACE, RELEASE, ROOT, render
from tests.kube.cluster import OUTPUT, Cluster, cluster_with_node, install_chart, needs_netns
from tests.kube.network import connect_in
from tests.kube.node import pod_ready
from tests.operator.conftest import eventually, free_port

pytestmark = [needs_netns, pytest.mark.asyncio(loop_scope="module")]

PROMPT = [1, 17, 300, 42, 9, 123, 77, 5]
NEW_TOKENS = 12
ARCHITECTURE = {"numBlocks": 6, "hiddenSize": 64, "intermediateSize": 128, "numAttentionHeads": 4, "numKeyValueHeads": 2}

CLIENT = '''
import json, os, torch
from llmswarm import DistributedModelForCausalLM
model = DistributedModelForCausalLM.from_pretrained(os.environ["MODEL"], swarm=os.environ["SWARM"], progress=False)
ids = torch.tensor([json.loads(os.environ["PROMPT"])])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(os.environ["NEW_TOKENS"]), do_sample=False)
print("RESULT " + json.dumps(out[0].tolist()), flush=True)
'''


def tiny_llama(directory: Path) -> Path:
    """A random 6-block Llama in `directory`, readable by the image's user (pods mount their own /tmp)."""
    shutil.rmtree(directory, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=6, max_position_embeddings=256, rope_theta=10000.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    for item in [directory, *directory.parents[:2], *directory.iterdir()]:
        item.chmod(item.stat().st_mode | 0o755 if item.is_dir() else 0o644)
    return directory


def local_greedy(directory: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """What local transformers generates greedily from `prompt` with the model in `directory`."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return [int(t) for t in out[0]]


def swarm_manifest(model: Path) -> dict[str, Any]:
    swarm = yaml.safe_load((ROOT / "examples" / "swarm-cpu.yaml").read_text())
    swarm["spec"]["model"] = {**swarm["spec"]["model"], "source": str(model), "name": model.name, "architecture": ARCHITECTURE}
    return swarm  # type: ignore[no-any-return]


def client_pod(swarm: str, model: str, name: str, prompt: list[int], new_tokens: int, cache: bool = False) -> list[dict[str, Any]]:
    """The client, as docs/kubernetes.md runs it: a pod in the swarm's namespace, with the node image.

    `cache`: an emptyDir at the image's LLMSWARM_CACHE, for a model the client converts (here the machine's
    /var/cache/llmswarm stands for the image's, which belongs to the image's user; see README.md)."""
    container: dict[str, Any] = {
        "name": "client", "image": "ghcr.io/llmswarm/node:0.1.0", "command": ["python", "/srv/llmswarm-client/client.py"],
        "env": [{"name": "SWARM", "value": f"http://{routemap_name(swarm)}:8700"}, {"name": "MODEL", "value": model},
                {"name": "PROMPT", "value": json.dumps(prompt)}, {"name": "NEW_TOKENS", "value": str(new_tokens)}],
        "volumeMounts": [{"name": "client", "mountPath": "/srv/llmswarm-client", "readOnly": True}],
    }
    volumes: list[dict[str, Any]] = [{"name": "client", "configMap": {"name": "client"}}]
    if cache:
        container["volumeMounts"].append({"name": "cache", "mountPath": "/var/cache/llmswarm"})
        volumes.append({"name": "cache", "emptyDir": {}})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "client", "namespace": NAMESPACE}, "data": {"client.py": CLIENT}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "llmswarm"}},
         "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes}},
    ]


def is_operator(deployment: dict[str, Any]) -> bool:
    return (deployment["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "operator"


def server_pods(cluster: Cluster, swarm: str) -> list[dict[str, Any]]:
    return [p for p in cluster.emulator.live("pods") if (p["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == swarm
            and p["metadata"]["labels"].get("app.kubernetes.io/component") == COMPONENT_SERVER]


def server_deployments(cluster: Cluster, swarm: str) -> set[str]:
    return {d["metadata"]["name"] for d in cluster.emulator.live("deployments")
            if (d["metadata"].get("labels") or {}).get("llmswarm.dev/swarm") == swarm
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == COMPONENT_SERVER}


@dataclass
class Swarm:
    cluster: Cluster
    manifest: dict[str, Any]
    model: str  # the client's SPEC of the model
    prompt: list[int]
    new_tokens: int
    operator: asyncio.subprocess.Process
    operator_log: Path
    client_cache: bool = False

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    def check_operator(self) -> None:
        if self.operator.returncode is not None:  # not worth waiting for anything then
            raise RuntimeError(f"the operator exited with {self.operator.returncode}; see {self.operator_log}")

    async def generate(self, pod: str, timeout: float = 120) -> list[int]:
        """Run a client pod to its end; the tokens it generated through the swarm."""
        manifests = client_pod(self.name, self.model, pod, self.prompt, self.new_tokens, self.client_cache)
        await self.cluster.kubectl.apply(yaml.safe_dump_all(manifests))

        async def done() -> dict[str, Any] | None:
            self.check_operator()
            found = self.cluster.emulator.stored("pods", NAMESPACE, pod)
            return found if (found or {}).get("status", {}).get("phase") in ("Succeeded", "Failed") else None
        finished = await eventually(done, timeout, f"the client pod {pod} to finish")
        output = self.cluster.node.logs(NAMESPACE, pod)
        assert finished["status"]["phase"] == "Succeeded", output[-4000:]
        (line,) = [x for x in output.splitlines() if x.startswith("RESULT ")]
        return json.loads(line.removeprefix("RESULT "))  # type: ignore[no-any-return]

    async def routes(self) -> dict[str, Any]:
        """GET /v1/routes of the route-map pod, from the node."""
        (pod,) = [p for p in self.cluster.emulator.live("pods") if p["metadata"]["name"].startswith(routemap_name(self.name))]
        reader, writer = await connect_in(self.cluster.node.network.node, pod["status"]["podIP"], 8700, 5)
        writer.write(b"GET /v1/routes HTTP/1.0\r\nHost: routemap\r\n\r\n")
        data = await reader.read()
        writer.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def running_swarm(tmp: Path, log_name: str, manifest: dict[str, Any], model: str, prompt: list[int], new_tokens: int,
                        servers: int, ready_timeout: float = 150, client_cache: bool = False,
                        operator_in_pod: bool = False) -> AsyncIterator[Swarm]:
    """The chart installed, the operator running (drainSeconds 5, a 2 s reconcile), `manifest` applied and Ready.

    The operator runs as a process with the emulator's kubeconfig (as in tests/chart), or with `operator_in_pod`,
    as the chart's Deployment on the node (in-cluster config: the service-account token and the cluster CA)."""
    settings: dict[str, Any] = {"reconcileInterval": 2, "retryDelay": 2, "drainSeconds": 5}
    if not operator_in_pod:  # a process on this machine: its listeners on free ports of 127.0.0.1
        settings.update(metricsPort=free_port(), metricsHost="127.0.0.1", livenessEndpoint=f"http://127.0.0.1:{free_port()}/healthz")
    values = {"operator": {"settings": settings}}
    rendered = render(values)
    with pytest.MonkeyPatch.context() as monkeypatch:
        namespace_paths_parsed(monkeypatch)  # Kopf lists Namespaces (see tests/chart/cluster.py)
        async with contextlib.AsyncExitStack() as stack:
            cluster = await stack.enter_async_context(
                cluster_with_node(tmp, log_name, NAMESPACE, manages=lambda d: operator_in_pod or not is_operator(d)))
            # `helm install --create-namespace`: the namespace, the CRDs, then the templates.
            await cluster.kubectl.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
            await install_chart(cluster, rendered.installed())
            deployment = rendered.get("Deployment", f"{RELEASE}-operator")
            log = OUTPUT / log_name / "operator.log"
            if operator_in_pod:
                process = await asyncio.create_subprocess_exec("sleep", "infinity")  # stands for the process: the pod runs it
                stack.callback(process.kill)
            else:
                process, _ = await stack.enter_async_context(operator_process(deployment, cluster.emulator, cluster.kubectl.kubeconfig,
                                                                              log))
            running = Swarm(cluster, manifest, model, prompt, new_tokens, process, log, client_cache)
            await cluster.kubectl.apply(yaml.safe_dump(manifest))

            # The servers the operator asked for are up for real: their probes pass, the Swarm is Ready.
            async def ready_servers() -> list[dict[str, Any]]:
                running.check_operator()
                pods = server_pods(cluster, running.name)
                return pods if len(pods) == servers and all(pod_ready(p) for p in pods) else []
            await eventually(ready_servers, ready_timeout, f"{servers} ready server pods")
            await eventually(lambda: swarm_phase(cluster.kubectl, running.name, "Ready"), 60, f"{running.name} Ready")
            yield running
            assert cluster.node.problems == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def swarm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Swarm]:
    model = tiny_llama(OUTPUT / "models" / "tiny-llama")
    async with running_swarm(tmp_path_factory.mktemp("e2e"), "e2e-swarm-cpu", swarm_manifest(model), str(model), PROMPT, NEW_TOKENS,
                             servers=3) as running:
        yield running


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return local_greedy(OUTPUT / "models" / "tiny-llama", PROMPT, NEW_TOKENS)


@pytest.mark.timeout(300)
async def test_swarm_cpu_generates_through_real_pods_exactly_like_local_transformers(swarm: Swarm, expected: list[int]) -> None:
    started = time.monotonic()
    assert await swarm.generate("client") == expected
    print(f"a client pod generated in {time.monotonic() - started:.1f} s")
    swarm.check_operator()


@pytest.mark.timeout(300)
async def test_after_a_rollout_clients_find_the_new_servers(swarm: Swarm, expected: list[int]) -> None:
    """Two servers instead of three move every span (3 blocks each instead of 2): the new servers start, the
    old ones drain and are deleted. Once the Swarm is Ready again, clients must find the new servers."""
    old = server_deployments(swarm.cluster, swarm.name)
    smaller = json.loads(json.dumps(swarm.manifest))
    smaller["spec"]["pools"][0]["minServers"] = 2
    await swarm.cluster.kubectl.apply(yaml.safe_dump(smaller))

    async def rolled_out() -> set[str]:
        swarm.check_operator()
        now = server_deployments(swarm.cluster, swarm.name)
        assert len(now) == 2 and not now & old, sorted(now)
        await swarm_phase(swarm.cluster.kubectl, swarm.name, "Ready")
        return now
    new = await eventually(rolled_out, 150, "the rollout to 2 servers")
    configmap = swarm.cluster.emulator.stored("configmaps", NAMESPACE, routemap_name(swarm.name))
    assert configmap is not None
    recorded = {s["id"] for s in json.loads(configmap["data"]["routes.json"])["servers"]}
    served = {s["id"]: s["state"] for s in (await swarm.routes())["servers"]}
    print(f"operator's record: {sorted(recorded)}; served: {served}")
    assert recorded == new
    assert set(served) == new, f"the route map serves {served}, the operator's record says {sorted(recorded)}"
    assert await swarm.generate("client-after-rollout") == expected

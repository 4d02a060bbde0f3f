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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from llmswarm_operator.manifests import ANNOTATION_DRAINING, COMPONENT_SERVER, LABEL_SERVER, identity_secret_name, routemap_name
from tests.chart.cluster import namespace_paths_parsed, operator_process, swarm_phase, verb_of
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


# The same generation, in an inference session and through transformers' own generate loop (a streamer): after
# each new token k in PAUSE_AT, the client writes where its session is (at-k: the chain of servers) to HANDSHAKE (a
# folder of this machine) and waits for the test's go-k there, so that what the test does then provably lands
# between two decode steps; it reports how many tokens came after each go.
PAUSED_CLIENT = '''
import json, os, time, torch
from pathlib import Path
from transformers.generation.streamers import BaseStreamer
from llmswarm import DistributedModelForCausalLM
handshake, pauses = Path(os.environ["HANDSHAKE"]), set(json.loads(os.environ["PAUSE_AT"]))
model = DistributedModelForCausalLM.from_pretrained(os.environ["MODEL"], swarm=os.environ["SWARM"], progress=False)
ids, new_tokens = torch.tensor([json.loads(os.environ["PROMPT"])]), int(os.environ["NEW_TOKENS"])

class Pauses(BaseStreamer):
    def __init__(self, session):
        self.session, self.puts, self.after = session, 0, {}
    def put(self, value):
        self.puts += 1
        token = self.puts - 1  # the first put is the prompt
        for k in self.after:
            self.after[k] += 1
        if token in pauses:
            (handshake / f"at-{token}").write_text(json.dumps({"chain": self.session.chain, "position": self.session.position}))
            deadline = time.monotonic() + 300
            while not (handshake / f"go-{token}").exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"no go after token {token}")
                time.sleep(0.02)
            self.after[token] = 0
    def end(self):
        pass

with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
    streamer = Pauses(session)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    print("CHAIN " + json.dumps(session.chain), flush=True)
print("AFTER " + json.dumps(streamer.after), flush=True)
print("RESULT " + json.dumps(out[0].tolist()), flush=True)
'''


def client_pod(swarm: str, model: str, name: str, prompt: list[int], new_tokens: int, cache: bool = False,
               script: str = "client.py", env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The client, as docs/kubernetes.md runs it: a pod in the swarm's namespace, with the node image.

    `cache`: an emptyDir at the image's LLMSWARM_CACHE, for a model the client converts (here the machine's
    /var/cache/llmswarm stands for the image's, which belongs to the image's user; see README.md).
    `script`: client.py (CLIENT) or paused.py (PAUSED_CLIENT), with `env` added."""
    container: dict[str, Any] = {
        "name": "client", "image": "ghcr.io/llmswarm/node:0.1.0", "command": ["python", f"/srv/llmswarm-client/{script}"],
        "env": [{"name": "SWARM", "value": f"http://{routemap_name(swarm)}:8700"}, {"name": "MODEL", "value": model},
                {"name": "PROMPT", "value": json.dumps(prompt)}, {"name": "NEW_TOKENS", "value": str(new_tokens)},
                *({"name": k, "value": v} for k, v in (env or {}).items())],
        "volumeMounts": [{"name": "client", "mountPath": "/srv/llmswarm-client", "readOnly": True}],
    }
    volumes: list[dict[str, Any]] = [{"name": "client", "configMap": {"name": "client"}}]
    if cache:
        container["volumeMounts"].append({"name": "cache", "mountPath": "/var/cache/llmswarm"})
        volumes.append({"name": "cache", "emptyDir": {}})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "client", "namespace": NAMESPACE},
         "data": {"client.py": CLIENT, "paused.py": PAUSED_CLIENT}},
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
    starter: Callable[[], Awaitable[None]] | None = None  # start another operator process (once this one ended)

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
        return json.loads(await self.client_output(pod, "RESULT", timeout))  # type: ignore[no-any-return]

    async def client_output(self, pod: str, key: str, timeout: float = 120) -> str:
        """Once the client pod `pod` succeeded: the rest of its output line that starts with `key`."""
        async def done() -> dict[str, Any] | None:
            self.check_operator()
            found = self.cluster.emulator.stored("pods", NAMESPACE, pod)
            return found if (found or {}).get("status", {}).get("phase") in ("Succeeded", "Failed") else None
        finished = await eventually(done, timeout, f"the client pod {pod} to finish")
        output = self.cluster.node.logs(NAMESPACE, pod)
        assert finished["status"]["phase"] == "Succeeded", output[-4000:]
        (line,) = [x for x in output.splitlines() if x.startswith(f"{key} ")]
        return line.removeprefix(f"{key} ")

    async def start_paused(self, pod: str, pauses: list[int]) -> PausedClient:
        """Start a client pod that pauses after each new token in `pauses` (PAUSED_CLIENT)."""
        handshake = OUTPUT / "handshake" / pod
        shutil.rmtree(handshake, ignore_errors=True)
        handshake.mkdir(parents=True)
        for folder in (handshake, handshake.parent):
            folder.chmod(0o777)  # the client runs as the image's user
        manifests = client_pod(self.name, self.model, pod, self.prompt, self.new_tokens, self.client_cache, "paused.py",
                               {"HANDSHAKE": str(handshake), "PAUSE_AT": json.dumps(pauses)})
        await self.cluster.kubectl.apply(yaml.safe_dump_all(manifests))
        return PausedClient(self, pod, handshake)

    async def kill_operator(self) -> None:
        """SIGKILL: the operator cleans nothing up."""
        self.operator.kill()
        await self.operator.wait()

    async def start_operator(self) -> None:
        assert self.starter is not None, "the operator runs in a pod here"
        await self.starter()

    async def routes(self) -> dict[str, Any]:
        """GET /v1/routes of the route-map pod, from the node."""
        (pod,) = [p for p in self.cluster.emulator.live("pods") if p["metadata"]["name"].startswith(routemap_name(self.name))]
        reader, writer = await connect_in(self.cluster.node.network.node, pod["status"]["podIP"], 8700, 5)
        writer.write(b"GET /v1/routes HTTP/1.0\r\nHost: routemap\r\n\r\n")
        data = await reader.read()
        writer.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


@dataclass
class PausedClient:
    """A client pod of PAUSED_CLIENT, stopped after a token until go()."""
    swarm: Swarm
    pod: str
    handshake: Path

    async def at(self, token: int, timeout: float = 120) -> dict[str, Any]:
        """Wait until the client stopped after new token `token`; its session then ({"chain": [[id, start, end]...]})."""
        async def stopped() -> dict[str, Any] | None:
            self.swarm.check_operator()
            found = self.swarm.cluster.emulator.stored("pods", NAMESPACE, self.pod)
            phase = (found or {}).get("status", {}).get("phase")
            assert phase not in ("Succeeded", "Failed"), self.swarm.cluster.node.logs(NAMESPACE, self.pod)[-4000:]
            path = self.handshake / f"at-{token}"
            return json.loads(path.read_text()) if path.exists() else None
        return await eventually(stopped, timeout, f"the client {self.pod} to stop after token {token}")

    def go(self, token: int) -> None:
        (self.handshake / f"go-{token}").touch()

    async def result(self, timeout: float = 120) -> tuple[list[int], dict[int, int], list[tuple[str, int, int]]]:
        """The tokens, how many came after each go, and the session's chain at the end."""
        tokens = json.loads(await self.swarm.client_output(self.pod, "RESULT", timeout))
        after = {int(k): v for k, v in json.loads(await self.swarm.client_output(self.pod, "AFTER")).items()}
        chain = [tuple(hop) for hop in json.loads(await self.swarm.client_output(self.pod, "CHAIN"))]
        shutil.rmtree(self.handshake, ignore_errors=True)
        return tokens, after, chain  # type: ignore[return-value]


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
            if not operator_in_pod:
                async def start() -> None:
                    assert running.operator.returncode is not None, "the operator still runs"
                    next_log = log.with_name(f"operator-{sum(1 for _ in log.parent.glob('operator*.log'))}.log")
                    running.operator, _ = await stack.enter_async_context(
                        operator_process(deployment, cluster.emulator, cluster.kubectl.kubeconfig, next_log))
                    running.operator_log = next_log
                running.starter = start
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


# ---- changes while a client generates; an operator restarted mid-rollout --------------------------------------------
# These go on from the rollout test's Swarm (2 servers of 3 blocks, redundancy 1), in this order.


def with_spec(swarm: Swarm, redundancy: int, servers: int) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(json.dumps(swarm.manifest))
    manifest["spec"]["redundancy"] = redundancy
    manifest["spec"]["pools"][0]["minServers"] = servers
    return manifest


def deployment_spans(cluster: Cluster, swarm: str) -> dict[str, tuple[int, int]]:
    """Each server Deployment's blocks, from its server's command line."""
    spans = {}
    for name in server_deployments(cluster, swarm):
        deployment = cluster.emulator.stored("deployments", NAMESPACE, name)
        assert deployment is not None
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        start, end = args[args.index("--blocks") + 1].split(":")
        spans[name] = (int(start), int(end))
    return spans


def uid(cluster: Cluster, plural: str, name: str) -> str | None:
    found = cluster.emulator.stored(plural, NAMESPACE, name)
    return None if found is None else str(found["metadata"]["uid"])


async def converged(swarm: Swarm, servers: set[str]) -> bool:
    """Exactly `servers` as Deployments, each with one ready pod, and the Swarm Ready for its current generation."""
    swarm.check_operator()
    now = server_deployments(swarm.cluster, swarm.name)
    assert now == servers, sorted(now)
    pods = server_pods(swarm.cluster, swarm.name)
    assert sorted(p["metadata"]["labels"][LABEL_SERVER] for p in pods) == sorted(servers) and all(map(pod_ready, pods))
    found = swarm.cluster.emulator.stored("swarms", NAMESPACE, swarm.name)  # (polled: no kubectl process each time)
    assert found is not None
    status, generation = found.get("status") or {}, found["metadata"].get("generation")
    assert status.get("phase") == "Ready", status.get("conditions")
    assert status.get("observedGeneration") == generation, (status.get("observedGeneration"), generation)
    return True


async def created(swarm: Swarm, old: set[str], count: int) -> set[str]:
    """The server Deployments beyond `old`, once there are `count` of them."""
    swarm.check_operator()
    added = server_deployments(swarm.cluster, swarm.name) - old
    return added if len(added) == count else set()


@pytest.mark.timeout(400)
async def test_a_pool_scaled_and_a_server_deployment_deleted_while_a_client_generates(swarm: Swarm, expected: list[int]) -> None:
    """One generation through two changes, each landing between two decode steps; it ends with local tokens.

    1. Redundancy 1 -> 2 and the pool 2 -> 4 servers (two more of 3 blocks): the client stops after token 3 while
       the change is applied, decodes tokens 4-6 while the new servers start, and stops again until the Swarm is
       Ready with them.
    2. After token 8, the Deployment of the client's first server (blocks 0-3) is deleted. Its pod gets SIGTERM and
       would let the open session finish (up to the server's 30 s --drain-timeout); the test ends that wait as
       the end of a grace period does (SIGKILL), so that the session outlives its server. The client fails over
       to the other server of those blocks (replaying the session there); the operator brings the Deployment
       back, with the same identity Secret (the same server id), and its pod becomes ready."""
    old = server_deployments(swarm.cluster, swarm.name)
    assert sorted(deployment_spans(swarm.cluster, swarm.name).values()) == [(0, 3), (3, 6)]
    client = await swarm.start_paused("client-changes", [3, 6, 8])
    assert {hop[0] for hop in (await client.at(3))["chain"]} == old
    await swarm.cluster.kubectl.apply(yaml.safe_dump(with_spec(swarm, redundancy=2, servers=4)))
    new = await eventually(lambda: created(swarm, old, 2), 60, "2 new server Deployments")
    client.go(3)
    await client.at(6)  # tokens 4-6 went through the swarm while the new servers started
    servers = old | new
    await eventually(lambda: converged(swarm, servers), 150, "4 servers of redundancy 2")
    assert sorted(deployment_spans(swarm.cluster, swarm.name).values()) == [(0, 3), (0, 3), (3, 6), (3, 6)]
    client.go(6)

    victim, start, end = (await client.at(8))["chain"][0]
    assert victim in servers and (start, end) == (0, 3)
    before, secret = uid(swarm.cluster, "deployments", victim), uid(swarm.cluster, "secrets", identity_secret_name(victim))
    (pod,) = [p for p in server_pods(swarm.cluster, swarm.name) if p["metadata"]["labels"][LABEL_SERVER] == victim]
    runner = swarm.cluster.node.runner(NAMESPACE, pod["metadata"]["name"])
    assert runner is not None
    await swarm.cluster.kubectl("delete", "deployment", victim, "--wait=false")

    async def terminating() -> bool:
        return runner.terminating
    await eventually(terminating, 30, f"{victim}'s pod to get SIGTERM")
    await asyncio.gather(*(c.kill(0, "the grace period ended (the test)") for c in runner.containers))
    assert all(c.process is None or c.process.returncode is not None for c in runner.containers)

    async def back() -> bool:
        swarm.check_operator()
        return uid(swarm.cluster, "deployments", victim) not in (None, before)  # a new Deployment of the same server
    await eventually(back, 30, f"the Deployment {victim} back")
    client.go(8)  # (its new pod is not ready yet)
    tokens, after, chain = await client.result()
    assert tokens == expected
    assert after == {3: NEW_TOKENS - 3, 6: NEW_TOKENS - 6, 8: NEW_TOKENS - 8}  # decode steps ran after each change
    survivor, start, end = chain[0]
    assert survivor != victim and survivor in servers and (start, end) == (0, 3), chain
    await eventually(lambda: converged(swarm, servers), 150, f"{victim} ready again")
    assert uid(swarm.cluster, "secrets", identity_secret_name(victim)) == secret


def operator_writes_since(cluster: Cluster, first: int, plural: str, verb: str) -> list[Any]:
    """The operator's `verb` requests on `plural` from the emulator's `first`-th request on."""
    return [r for r in list(cluster.emulator)[first:] if r.resource is not None and r.resource.plural == plural
            and verb_of(r) == verb and r.headers.get("User-Agent", "").startswith("llmswarm-operator")]


def created_names(requests: list[Any]) -> list[str]:
    return sorted(r.data["metadata"]["name"] for r in requests)


@pytest.mark.timeout(300)
async def test_an_operator_restarted_mid_rollout_converges_and_does_nothing_twice(swarm: Swarm) -> None:
    """Back to redundancy 1 with one server of all 6 blocks, a new name. The operator is killed (SIGKILL) as soon
    as it created the new Deployment, before its pod is ready and so before any old server could go, and started
    again. The rollout finishes: the new server's Deployment, Service and key Secret were created once (the
    Deployment and Secret kept: the same uids), each of the four old servers was drained once and deleted."""
    old = server_deployments(swarm.cluster, swarm.name)
    first = len(list(swarm.cluster.emulator))
    await swarm.cluster.kubectl.apply(yaml.safe_dump(with_spec(swarm, redundancy=1, servers=1)))
    (new,) = await eventually(lambda: created(swarm, old, 1), 60, "the new server Deployment")
    await swarm.kill_operator()
    # Mid-rollout: the old servers all there, the new one not ready.
    assert old | {new} == server_deployments(swarm.cluster, swarm.name)
    assert not any(p["metadata"]["labels"][LABEL_SERVER] == new and pod_ready(p) for p in server_pods(swarm.cluster, swarm.name))
    kept = {("deployments", new): uid(swarm.cluster, "deployments", new),
            ("secrets", identity_secret_name(new)): uid(swarm.cluster, "secrets", identity_secret_name(new))}
    assert None not in kept.values(), kept
    await swarm.start_operator()

    await eventually(lambda: converged(swarm, {new}), 150, "the rollout to one server after the restart")
    assert deployment_spans(swarm.cluster, swarm.name) == {new: (0, 6)}
    assert {key: uid(swarm.cluster, *key) for key in kept} == kept
    for plural, name in (("deployments", new), ("services", new), ("secrets", identity_secret_name(new))):
        assert created_names(operator_writes_since(swarm.cluster, first, plural, "create")) == [name], plural
    drains = [r.name for r in operator_writes_since(swarm.cluster, first, "deployments", "patch")
              if ((r.data.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DRAINING)]
    assert sorted(drains) == sorted(old)

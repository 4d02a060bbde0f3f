"""End to end with a model store: ``examples/swarm-cpu.yaml`` plus ``spec.modelStore``, on the emulated node.

The operator makes the store's claim and its fill Job; the node's Job controller runs the Job's pod for real
(``python -m llmswarm_core.model_store`` writing the tiny model, split per block, into the claim's folder); only
then does the operator create the servers, which mount the claim read-only and serve ``--model
/var/lib/llmswarm/models/KEY``. A client gets exactly local transformers' tokens, and a restarted server
converts nothing: the store's files are untouched and the fill ran once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmswarm_core.model_store import READY_FILE, store_key
from llmswarm_operator.manifests import MODELS_DIR
from llmswarm_operator.store import job_name
from tests.chart.cluster import swarm_phase
from tests.chart.rendering import NAMESPACE
from tests.kube.cluster import OUTPUT, needs_netns
from tests.kube.node import pod_ready
from tests.kube.test_e2e import NEW_TOKENS, PROMPT, Swarm, local_greedy, running_swarm, server_pods, swarm_manifest, tiny_llama
from tests.operator.conftest import eventually

pytestmark = [needs_netns, pytest.mark.asyncio(loop_scope="module")]

MODEL = OUTPUT / "models" / "tiny-llama-stored"


def fill_pods(swarm: Swarm) -> list[dict[str, Any]]:
    return [p for p in swarm.cluster.emulator.live("pods") if (p["metadata"].get("labels") or {}).get("job-name")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def swarm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Swarm]:
    model = tiny_llama(MODEL)
    manifest = swarm_manifest(model)
    manifest["spec"]["modelStore"] = {"size": "1Gi"}
    async with running_swarm(tmp_path_factory.mktemp("e2e-store"), "e2e-model-store", manifest, str(model), PROMPT,
                             NEW_TOKENS, servers=3, ready_timeout=240) as running:
        yield running


def store_files(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.timeout(400)
async def test_servers_serve_from_the_store_that_one_job_filled(swarm: Swarm) -> None:
    key = store_key(str(MODEL), "")
    claim = swarm.cluster.node.claim_directory(NAMESPACE, f"{swarm.name}-models")
    assert (claim / key / READY_FILE).is_file()
    assert sorted(p.name for p in (claim / key).glob("block-*.safetensors")) == [f"block-{b:05d}.safetensors" for b in range(6)]
    (fill,) = fill_pods(swarm)
    assert fill["metadata"]["labels"]["job-name"] == job_name(swarm.name, key)
    assert fill["status"]["phase"] == "Succeeded"
    assert "model store: filled" in swarm.cluster.node.logs(NAMESPACE, fill["metadata"]["name"])
    status = await swarm_phase(swarm.cluster.kubectl, swarm.name, "Ready")
    assert status["modelStore"]["phase"] == "Ready" and status["modelStore"]["path"] == f"{MODELS_DIR}/{key}"
    for pod in server_pods(swarm.cluster, swarm.name):
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1] == f"{MODELS_DIR}/{key}"
        assert "converting" not in swarm.cluster.node.logs(NAMESPACE, pod["metadata"]["name"])

    assert await swarm.generate("client-stored") == local_greedy(MODEL, PROMPT, NEW_TOKENS)


@pytest.mark.timeout(400)
async def test_a_restarted_server_converts_nothing(swarm: Swarm) -> None:
    key = store_key(str(MODEL), "")
    claim = swarm.cluster.node.claim_directory(NAMESPACE, f"{swarm.name}-models")
    before = store_files(claim)
    old_names = {p["metadata"]["name"] for p in server_pods(swarm.cluster, swarm.name)}
    victim = server_pods(swarm.cluster, swarm.name)[0]
    await swarm.cluster.kubectl("delete", "pod", victim["metadata"]["name"], "--wait=false")

    async def replaced() -> list[dict[str, Any]]:
        swarm.check_operator()
        pods = server_pods(swarm.cluster, swarm.name)
        names = {p["metadata"]["name"] for p in pods}
        return pods if len(pods) == 3 and victim["metadata"]["name"] not in names and all(map(pod_ready, pods)) else []
    pods = await eventually(replaced, 180, "the server's new pod to be ready")
    (new,) = [p for p in pods if p["metadata"]["name"] not in old_names]
    log = swarm.cluster.node.logs(NAMESPACE, new["metadata"]["name"])
    assert "converting" not in log and "filled" not in log
    assert store_files(claim) == before  # nothing in the store was written again
    assert len(fill_pods(swarm)) == 1  # and the fill ran once
    marker = json.loads((claim / key / READY_FILE).read_text())
    assert marker["source"] == str(MODEL)
    assert await swarm.generate("client-after-restart") == local_greedy(MODEL, PROMPT, NEW_TOKENS)

"""High availability: two operator processes with Kopf peering; one acts, the other waits; when the active one is
killed, the other takes over and reconciles what comes next."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.cluster import ROOT, declare_crd
from tests.operator.conftest import Cluster, eventually, free_port

PEERING_CRDS = [ROOT / "charts" / "llmswarm" / "crds" / f"{plural}.kopf.dev.yaml" for plural in ("clusterkopfpeerings", "kopfpeerings")]
PEERING = "llmswarm"
LIFETIME = 4  # seconds a silent peer counts as alive


def swarm(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "swarm-cpu.yaml").read_text())
    doc["metadata"]["name"] = name
    return doc  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def operator(cluster: Cluster, pod: str, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m llmswarm_operator` as a replica of the chart's Deployment would run it (POD_ID from the pod name)."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_ID": pod, "LLMSWARM_OPERATOR_PEERING": PEERING,
           "LLMSWARM_OPERATOR_PEERING_LIFETIME": str(LIFETIME), "LLMSWARM_OPERATOR_RECONCILE_INTERVAL": "0.5",
           "LLMSWARM_OPERATOR_RETRY_DELAY": "0.5", "LLMSWARM_OPERATOR_METRICS_PORT": "0",
           "LLMSWARM_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{free_port()}/healthz"}
    with open(log, "wb") as out:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llmswarm_operator", env=env, cwd=ROOT, stdout=out,
                                                       stderr=asyncio.subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def ready(cluster: Cluster, name: str) -> bool:
    status = (await cluster.kubectl.get_json("swarm", name)).get("status") or {}
    assert status.get("phase") == "Ready", status.get("phase")
    return True


def peers(cluster: Cluster) -> dict[str, Any]:
    found = [p for p in cluster.controllers.live("clusterkopfpeerings") if p["metadata"]["name"] == PEERING]
    return dict((found[0].get("status") or {}) if found else {})


@pytest.mark.timeout(120)
async def test_two_replicas_one_acts_and_the_other_takes_over(cluster: Cluster, tmp_path: Path) -> None:
    for path in PEERING_CRDS:
        declare_crd(cluster.emulator, yaml.safe_load(path.read_text()))  # the peering CRDs the chart ships
    await cluster.kubectl.apply(yaml.safe_dump({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                                "metadata": {"name": PEERING}}))
    cluster.controllers.all_ready = True
    async with operator(cluster, "operator-a", tmp_path / "a.log") as a, operator(cluster, "operator-b", tmp_path / "b.log") as b:
        async def both_peers() -> dict[str, Any]:
            found = peers(cluster)
            assert set(found) == {"operator-a", "operator-b"}, found
            return found
        known = await eventually(both_peers, 30, "both replicas in the peering object")
        priorities = {pod: info["priority"] for pod, info in known.items()}
        assert len(set(priorities.values())) == 2, f"equal priorities pause every replica: {priorities}"
        active, passive = sorted(priorities, key=priorities.__getitem__, reverse=True)
        await cluster.kubectl.apply(yaml.safe_dump(swarm("first")))
        await eventually(lambda: ready(cluster, "first"), 30, "the first Swarm to be Ready")
        logs = {"operator-a": tmp_path / "a.log", "operator-b": tmp_path / "b.log"}
        assert "create: phase" in logs[active].read_text(errors="replace")
        assert "phase" not in logs[passive].read_text(errors="replace"), "the waiting replica reconciled too"

        # The active replica dies without saying goodbye (a node lost, OOM-killed): no clean exit, no peering update.
        victim = a if active == "operator-a" else b
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await cluster.kubectl.apply(yaml.safe_dump(swarm("second")))
        await eventually(lambda: ready(cluster, "second"), LIFETIME + 30, "the other replica to take over")
        survivor = b if victim is a else a
        assert survivor.returncode is None
        assert "Resuming operations" in logs[passive].read_text(errors="replace")

"""``python -m llmswarm_operator`` and ``kopf run -m llmswarm_operator.entry`` run the operator as a process."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.operator.cluster import running_cluster
from tests.operator.conftest import eventually, free_port

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "python-m": [sys.executable, "-m", "llmswarm_operator"],
    "kopf-run": [str(Path(sys.prefix) / "bin" / "kopf"), "run", "-m", "llmswarm_operator.entry", "--standalone", "--all-namespaces"],
}


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
async def test_the_operator_runs_as_a_process(tmp_path: Path, command: str) -> None:
    async with running_cluster(tmp_path) as (_, _, controllers, kubectl):
        env = {
            **os.environ, "KUBECONFIG": str(kubectl.kubeconfig), "LLMSWARM_OPERATOR_RECONCILE_INTERVAL": "0.5",
            "LLMSWARM_OPERATOR_METRICS_PORT": str(free_port()), "LLMSWARM_OPERATOR_METRICS_HOST": "127.0.0.1",
            "LLMSWARM_OPERATOR_LIVENESS_ENDPOINT": f"http://127.0.0.1:{free_port()}/healthz",
            "LLMSWARM_OPERATOR_IMAGE": "registry.example/node:1",
        }
        process = await asyncio.create_subprocess_exec(*COMMANDS[command], env=env, cwd=ROOT,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await kubectl.apply(ROOT / "examples" / "swarm-cpu.yaml")

            async def servers() -> list[dict[str, object]]:
                found = [d for d in controllers.live("deployments") if d["metadata"]["name"].startswith("smollm2-cpu-cpu-")]
                assert len(found) == 3, [d["metadata"]["name"] for d in controllers.live("deployments")]
                return found
            found = await eventually(servers, timeout=30, what="the operator process to create the servers")
            images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in found}  # type: ignore[index]
            assert images == {"registry.example/node:1"}  # settings came from the environment
        finally:
            process.terminate()
            output, _ = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode is not None
        assert b"Traceback" not in output, output.decode()[-3000:]


async def test_bad_settings_stop_the_operator_at_once() -> None:
    env = {**os.environ, "LLMSWARM_OPERATOR_RECONCILE_INTERVAL": "soon"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llmswarm_operator", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"LLMSWARM_OPERATOR_RECONCILE_INTERVAL='soon'" in err

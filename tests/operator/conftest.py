"""Fixtures for the operator tests: an emulated cluster, and the real operator running in-process."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kopf
import pytest

from llmswarm_operator.handlers import register
from llmswarm_operator.kubeapi import KubeClient
from llmswarm_operator.runtime import Runtime
from llmswarm_operator.settings import OperatorSettings
from tests.operator.cluster import ClusterEmulator, FakeControllers, Kubectl, running_cluster

INTERVAL = 0.2  # the operator's timer in these tests

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    emulator: ClusterEmulator
    url: str
    controllers: FakeControllers
    kubectl: Kubectl
    kubeconfig: Path


@dataclass
class Operator:
    """The operator running in its own thread and event loop, as it would in its own process.

    (In the test's loop, Kopf would cancel the test's own later tasks when it stops: it
    stops every task started after it.)
    """

    runtime: Runtime
    thread: threading.Thread
    stop_flag: threading.Event
    liveness_url: str
    errors: list[BaseException] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        if self.thread.is_alive():
            raise AssertionError("the operator did not stop within 20 s")


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as (emulator, url, controllers, kubectl):
        monkeypatch.setenv("KUBECONFIG", str(kubectl.kubeconfig))
        yield Cluster(emulator, url, controllers, kubectl, kubectl.kubeconfig)


def operator_settings(**overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "image": "ghcr.io/llmswarm/node:test", "reconcile_interval": INTERVAL, "retry_delay": INTERVAL,
        "drain_seconds": 0.0, "metrics_host": "127.0.0.1", "metrics_port": free_port(), "liveness_endpoint": "",
        # No route map runs in the emulated cluster: reading one is refused at once (no cluster DNS lookup).
        "routemap_url": "http://127.0.0.1:1/{namespace}/{swarm}",
    }
    values.update(overrides)
    return OperatorSettings(**values)


async def start_operator(settings: OperatorSettings | None = None) -> Operator:
    settings = settings or operator_settings()
    registry = kopf.OperatorRegistry()
    register(registry, settings.reconcile_interval)
    runtime = Runtime(settings, KubeClient())
    stop_flag, ready_flag = threading.Event(), threading.Event()
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, clusterwide=True, standalone=True, memo=kopf.Memo(runtime=runtime),
                stop_flag=stop_flag, ready_flag=ready_flag, liveness_endpoint=liveness,
            ))
        except asyncio.CancelledError:
            pass  # how Kopf ends on a stop flag
        except BaseException as error:
            errors.append(error)
            raise

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    if not await asyncio.to_thread(ready_flag.wait, 20):
        raise AssertionError(f"the operator did not start: {errors}")
    return Operator(runtime, thread, stop_flag, liveness, errors)


async def settle(cluster: Cluster, timeout: float = 3.0) -> None:
    """Wait (a little) until no Swarm has a Kopf handler in progress.

    Stopping Kopf while a change handler runs makes it start the object's timer again after
    it stopped the timers, and then wait 5 s for that orphan: this keeps tests quick.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [
            swarm for swarm in cluster.controllers.live("swarms")
            for key, value in (swarm["metadata"].get("annotations") or {}).items()
            if key.startswith("kopf.zalando.org/register.") and not json.loads(value).get("failure")
        ]
        if not busy:
            return
        await asyncio.sleep(0.05)


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[Operator]:
    op = await start_operator()
    try:
        yield op
    finally:
        if op.running:
            await settle(cluster)
            await op.stop()


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 15.0, what: str = "") -> T:
    """Retry an async check until it returns a truthy value (returned) or raise with its last error."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await check()
            if result:
                return result
        except (AssertionError, aiohttp.ClientError, OSError) as error:  # not there yet, or not answering yet
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}: {last}") from last
        await asyncio.sleep(0.05)

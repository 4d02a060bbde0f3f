"""Gateway fixtures: a real gateway (in a background event loop) over the shared 3-server swarm."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llmswarm.gateway.app import Gateway
from llmswarm.gateway.options import GatewayOptions

TOKEN = "gateway-test-token"


class GatewayThread:
    """A Gateway on its own event loop in a background thread, as it would run in its own process."""

    def __init__(self, options: GatewayOptions, model: Any = None) -> None:
        self.gateway = Gateway(options, model)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.url = ""

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@pytest.fixture(scope="session")
def gateway(swarm3: Any, model3: Any) -> Iterator[GatewayThread]:
    """The gateway under test: token set, a small queue, the shared model object (so no second load)."""
    options = GatewayOptions(swarm=swarm3.url, port=0, token=TOKEN, max_concurrent=4, max_queued=4, max_tokens=512,
                             max_body_bytes=64 * 1024, write_timeout=5.0)
    with GatewayThread(options, model=model3) as running:
        yield running


@pytest.fixture(scope="session")
def _loaded_tokenizer(smollm2: Any) -> Any:
    return smollm2.tokenizer()


@pytest.fixture()
def tokenizer(_loaded_tokenizer: Any) -> Any:
    """Each test's own copy (a quarter of a second): one that sets padding_side, say, changes no other test."""
    return copy.deepcopy(_loaded_tokenizer)


@pytest.fixture()
def api(gateway: GatewayThread) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    return session


def server_sessions(swarm: Any) -> list[int]:
    """Open inference sessions on each block server of the swarm."""
    return [int(requests.get(f"{s.url}/info", timeout=5).json()["sessions"]) for s in swarm.routes().servers]


def wait_sessions_freed(swarm: Any, timeout: float = 30.0, before: list[int] | None = None) -> list[int]:
    """Wait until no server holds more sessions than in `before` (what a test saw before it opened any); the
    counts then. Other sessions (another test's, closing late) do not keep it waiting: it never waits for the
    whole swarm to be empty unless `before` is left out (then every server is compared with 0)."""
    limit = before if before is not None else [0] * len(server_sessions(swarm))
    deadline = time.monotonic() + timeout
    while True:
        sessions = server_sessions(swarm)
        if all(now <= then for now, then in zip(sessions, limit, strict=True)) or time.monotonic() > deadline:
            return sessions
        time.sleep(0.05)


def settled_sessions(swarm: Any, quiet: float = 1.0, timeout: float = 30.0) -> list[int]:
    """The servers' session counts once they have stayed the same for `quiet` seconds (sessions that earlier
    tests closed are freed asynchronously), or the last counts after `timeout`."""
    deadline = time.monotonic() + timeout
    sessions = server_sessions(swarm)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = server_sessions(swarm)
        if now != sessions:
            sessions, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return sessions


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        series, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if series == name and got == want:
            return float(value)
    return 0.0

"""`llmswarm up --rebalance` with a real Prometheus: skewed load at one span moves a server there.

The test starts Prometheus (Debian package ``prometheus``) on 127.0.0.1 with a 1 s scrape
interval; it finds the block servers through the route map's HTTP service discovery
(``/v1/targets``), so a server that moves to a new process on a new port is scraped too.
It then starts ``llmswarm up --rebalance --prometheus-url ...`` as a user would, with three
servers: blocks [0, 15) twice and [15, 30) once. Two generations open their sessions (one
through each [0, 15) server) and pause in the middle; the test drives load at blocks
[15, 30) only. The rebalancer must move one [0, 15) server to [15, 30), make-before-break:
the replacement is online before the old server drains. The paused generations then go on
and must equal local transformers token for token, and the capacity of the bottleneck
block, as Prometheus measures it, must rise.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
import torch
import yaml

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm_control.load_metrics import PROMQL, ScrapeSource, Target
from llmswarm_core import wire
from llmswarm_core.routemap import RouteMap
from tests.conftest import OUTPUT, chat_ids
from tests.helpers import metric_total

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (apt-get install prometheus)"),
]

LOGS = OUTPUT / "rebalance-local"
HOT = (15, 30)  # the span the load goes to
NEW_TOKENS, PAUSE_AFTER = 24, 16
INTERVAL = 4  # seconds between rebalance rounds (and the rate window)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def block_query(template: str, block: int) -> str:
    """A per-server expression summed over the servers whose span holds `block` (docs/metrics.md)."""
    return (f"sum(({template}) * on(instance) (llmswarm_span_start <= bool {block}) "
            f"* on(instance) (llmswarm_span_end > bool {block}))")


@contextmanager
def prometheus(routemap_url: str) -> Iterator[str]:
    assert PROMETHEUS is not None
    directory = LOGS / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "llmswarm",
            "http_sd_configs": [{"url": f"{routemap_url}/v1/targets", "refresh_interval": "1s"}],
        }],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def query(prometheus_url: str, expression: str) -> float | None:
    answer = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def routes(url: str) -> RouteMap:
    return RouteMap.model_validate_json(requests.get(f"{url}/v1/routes", timeout=10).content)


def metric(url: str, name: str, **labels: str) -> float:
    return metric_total(requests.get(f"{url}/metrics", timeout=10).text, name, **labels)


class PausingStreamer:
    """A generate() streamer that holds the generation after `pause_after` new tokens until `resume` is set."""

    def __init__(self, pause_after: int, resume: threading.Event, on_pause: Any) -> None:
        self.pause_after = pause_after
        self.resume = resume
        self.on_pause = on_pause
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == self.pause_after + 1:
            self.on_pause()
            assert self.resume.wait(300), "the move did not happen"

    def end(self) -> None:
        pass


class Load:
    """Threads sending forward passes over blocks [15, 30) to the online servers holding them, in turn."""

    def __init__(self, url: str, threads: int = 2, tokens: int = 16) -> None:
        self.url = url
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.sent = 0
        body = {"kind": "forward", "start": HOT[0], "end": HOT[1]}
        self.frame = wire.encode(body, {"hidden": torch.randn(1, tokens, 576, generator=torch.Generator().manual_seed(0))})
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, offset: int) -> None:
        http = requests.Session()
        turn = offset
        while not self.stop.is_set():
            servers = [s for s in routes(self.url).servers if s.state == "online" and s.start <= HOT[0] and s.end >= HOT[1]]
            if not servers:
                time.sleep(0.1)
                continue
            server = servers[turn % len(servers)]
            turn += 1
            for _ in range(4):
                try:
                    reply = http.post(f"{server.url}/v1/forward", data=self.frame, timeout=60,
                                      headers={"Content-Type": "application/octet-stream"})
                except requests.RequestException as error:
                    self.errors.append(repr(error))
                    break
                if reply.status_code != 200:
                    self.errors.append(f"{server.id}: {reply.status_code}")
                    break
                self.sent += 1

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def local_greedy(local: Any, ids: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        return local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()


def test_skewed_load_moves_a_server_make_before_break(local_smollm2: Any) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with prometheus(url) as prometheus_url, open(LOGS / "llmswarm-up.log", "wb") as up_log:
        up = subprocess.Popen(
            [sys.executable, "-m", "llmswarm_cli.main", "up", "--servers", "3", "--blocks-per-server", "15", "--port", str(port),
             "--rebalance", "--rebalance-interval", str(INTERVAL), "--min-gain", "2", "--prometheus-url", prometheus_url],
            stdout=up_log, stderr=subprocess.STDOUT,
        )
        loads: list[Load] = []
        try:
            run(url, prometheus_url, up, local_smollm2, loads)
        finally:
            for item in loads:
                item.close()
            up.send_signal(signal.SIGTERM)
            try:
                assert up.wait(90) == 0, (LOGS / "llmswarm-up.log").read_text()[-3000:]
            except subprocess.TimeoutExpired:
                up.kill()
                raise
    assert loads and not loads[0].errors, loads[0].errors if loads else "no load"
    text = (LOGS / "llmswarm-up.log").read_text()
    assert "rebalancing every 4 s from http://127.0.0.1:" in text
    assert re.search(r"rebalance: moving local-[02] from blocks 0:15 to 15:30", text), text[-3000:]


def run(url: str, prometheus_url: str, up: subprocess.Popen[bytes], local: Any, loads: list[Load]) -> None:
    began = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - began, 1)

    deadline = time.monotonic() + 300
    while True:
        assert up.poll() is None, (LOGS / "llmswarm-up.log").read_text()[-3000:]
        try:
            current = routes(url)
            if sum(1 for s in current.servers if s.state == "online") == 3:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the swarm did not come up"
        time.sleep(0.5)
    phase("swarm online")
    first = {s.id: (s.start, s.end) for s in current.servers}
    assert first == {"local-0": (0, 15), "local-1": (15, 30), "local-2": (0, 15)}

    # Two generations, each through one of the [0, 15) servers, paused in the middle.
    prompts = ["Write a short poem about autumn.", "Explain photosynthesis simply."]
    models, expected, chains, results = [], [], {}, {}
    for avoid in ("local-0", "local-2"):
        model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=url, progress=False,
                                                            client_config=ClientConfig(max_retries=8))
        model.client.ban(avoid, 3600)
        models.append(model)
    inputs = [chat_ids(models[0].tokenizer, p) for p in prompts]
    expected = [local_greedy(local, ids) for ids in inputs]
    resume = threading.Event()
    paused = [threading.Event(), threading.Event()]
    errors: list[BaseException] = []

    def generate(i: int) -> None:
        try:
            model, ids = models[i], inputs[i]
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                def on_pause() -> None:
                    chains[i] = session.chain
                    paused[i].set()

                streamer = PausingStreamer(PAUSE_AFTER, resume, on_pause)
                results[i] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                            streamer=streamer).tolist()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            paused[i].set()

    generations = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(2)]
    for thread in generations:
        thread.start()
    for event in paused:
        assert event.wait(180), "a generation did not reach its pause"
    assert not errors, errors
    phase("generations paused")
    assert {chains[0][0][0], chains[1][0][0]} == {"local-0", "local-2"}, chains
    assert {s.id: (s.start, s.end) for s in routes(url).servers} == first, "a server moved before the load started"

    hot_capacity = block_query("llmswarm_throughput_tokens_per_second", HOT[0])
    served = block_query("sum by (instance) (rate(llmswarm_tokens_processed_total[5s]))", HOT[0])
    capacity_before = poll(lambda: query(prometheus_url, hot_capacity), "the bottleneck block's capacity in Prometheus")

    # Skewed load: only blocks [15, 30). The watcher checks make-before-break on every snapshot.
    snapshots: list[RouteMap] = []
    violations: list[str] = []
    moved: dict[str, str] = {}
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            try:
                snapshot = routes(url)
            except requests.RequestException:
                continue
            snapshots.append(snapshot)
            online = snapshot.coverage(("online",))
            if min(online) < 1:
                violations.append(f"version {snapshot.version}: a block has no online server: {online}")
            states = {s.id: s.state for s in snapshot.servers}
            for old in ("local-0", "local-2"):
                if states.get(old, "gone") != "online" and "old" not in moved:
                    moved["old"] = old
                    newcomers = [s for s in snapshot.servers if s.id not in first]
                    if not any(s.state == "online" and (s.start, s.end) == HOT for s in newcomers):
                        violations.append(f"{old} left [0, 15) before its replacement was online: {snapshot.servers}")
                    resume.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = Load(url).start()
    loads.append(load)
    time.sleep(INTERVAL)
    served_before = query(prometheus_url, served)
    try:
        assert resume.wait(300), "the rebalancer did not move a server to the loaded span"
        phase("old server draining")
        for thread in generations:
            thread.join(180)
    finally:
        resume.set()
        watching.set()
        watcher.join(10)
    assert not errors, errors
    phase("generations done")
    assert not violations, violations
    assert [results[0], results[1]] == expected, "a generation running during the move changed its output"
    mover = moved["old"]
    assert any(chain[0][0] == mover for chain in chains.values()), "no generation had a session on the moved server"

    # After the move: two servers on [15, 30), one on [0, 15); the old process drained and left.
    def settled() -> RouteMap | None:
        now = routes(url)
        spans = sorted((s.start, s.end) for s in now.servers if s.state == "online")
        return now if spans == [(0, 15), (15, 30), (15, 30)] and all(s.state == "online" for s in now.servers) else None

    after = poll(settled, "the swarm to settle after the move", timeout=120)
    assert mover not in {s.id for s in after.servers}
    newcomer = next(s for s in after.servers if s.id not in first)
    assert (newcomer.start, newcomer.end) == HOT

    capacity_after = poll(lambda: (v if (v := query(prometheus_url, hot_capacity)) and v > capacity_before else None),
                          "Prometheus to measure more capacity on the bottleneck block", timeout=60)
    assert capacity_after > capacity_before
    time.sleep(INTERVAL)
    served_after = query(prometheus_url, served)

    # The rebalancer's own metrics (route-map /metrics): one round moved one server, later rounds leave it be.
    phase("capacity measured")
    assert metric(url, "llmswarm_rebalance_moves_total") == 1
    assert metric(url, "llmswarm_rebalance_rounds_total", result="moved") == 1
    unchanged = metric(url, "llmswarm_rebalance_rounds_total", result="unchanged")
    poll(lambda: metric(url, "llmswarm_rebalance_rounds_total", result="unchanged") > unchanged,
         "a round after the move", timeout=60)
    assert metric(url, "llmswarm_rebalance_moves_total") == 1
    phase("a later round left it")

    # The direct-scrape source reads the same servers: the loaded ones are busy, the other is not.
    collected = asyncio.run(ScrapeSource(baseline_seconds=2.0).collect([Target(s.id, s.url) for s in after.servers]))
    assert not collected.missing, collected.errors
    hot_ids = [s.id for s in after.servers if (s.start, s.end) == HOT]
    cold_id = next(s.id for s in after.servers if (s.start, s.end) == (0, 15))
    assert all(collected.loads[i].busy > collected.loads[cold_id].busy for i in hot_ids), collected.loads
    assert all(collected.loads[i].tokens_rate > 0 for i in hot_ids)

    # The queries the Prometheus source runs all answer for every server.
    for name, expression in PROMQL.items():
        assert query(prometheus_url, expression.replace("{window}", "10s")) is not None, name

    (LOGS / "result.json").write_text(json.dumps({
        "moved": mover, "replacement": newcomer.id,
        "bottleneck_block_capacity_tokens_per_second": {"before": capacity_before, "after": capacity_after},
        "bottleneck_block_served_tokens_per_second": {"before": served_before, "after": served_after},
        "load_requests": load.sent,
        "phases_seconds": phases,
    }, indent=1))


def poll(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)

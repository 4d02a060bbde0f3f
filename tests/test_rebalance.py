"""The rebalancer's pure parts (planner, assignment, fresh plan) and its metrics sources against real HTTP.

Properties (hypothesis): no move below the minimum gain, redundancy kept after every move,
bounded moves, convergence (a complete plan is a fixed point: planning again with the same
demand moves nothing), and the bottleneck the plan promises is the one its spans give.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from bench.fresh_plan import Capacity, capacity_bottleneck, fresh_plan, upper_bound
from llmswarm_cli.main import build_parser, main
from llmswarm_control.load_metrics import (
    PROMQL,
    MetricsError,
    PrometheusSource,
    ScrapeSource,
    ServerLoad,
    Target,
    load_between,
    parse_sample,
    promql,
)
from llmswarm_control.placement import Pool, place
from llmswarm_control.rebalance import (
    Move,
    Server,
    apply_moves,
    block_demand,
    bottleneck,
    plan,
    spare,
)
from llmswarm_control.routemap_service import prometheus_targets
from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord
from llmswarm_core.spans import Span, coverage
from llmswarm_node.metrics import ServerMetrics
from llmswarm_operator.assignment import Assignment, fits, moved
from llmswarm_operator.manifests import DesiredServer, desired_servers, server_name
from llmswarm_operator.planner import ExistingServer, plan_servers
from tests.helpers import serving

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")


def three(hot_utilisation: float = 1.0, throughput: float = 50.0) -> list[Server]:
    """[0, 15) twice, [15, 30) once; the [15, 30) server is busy."""
    return [Server("a", Span(0, 15), throughput), Server("b", Span(15, 30), throughput, hot_utilisation),
            Server("c", Span(0, 15), throughput)]


# ---- the planner ------------------------------------------------------------------------------------------------------


def test_a_server_moves_to_the_loaded_span() -> None:
    servers = three()
    result = plan(30, servers, min_gain=0.25)
    assert result.moves == (Move("a", Span(0, 15), Span(15, 30)),)  # equal candidates: the first one
    assert result.before == 0.0 and result.bottleneck_block == 15
    assert result.after == 50.0 and result.gain > 0.25
    assert result.spans == {"a": Span(15, 30), "b": Span(15, 30), "c": Span(0, 15)}
    assert result.demand == (0.0,) * 15 + (50.0,) * 15  # the busy server's load stays on its blocks
    # The spare throughput of the current spans is sum(t x (1 - u)).
    assert spare(30, servers) == [100.0] * 15 + [0.0] * 15


def test_the_least_busy_candidate_moves() -> None:
    servers = [Server("a", Span(0, 15), 50, 0.3), Server("b", Span(15, 30), 50, 1.0), Server("c", Span(0, 15), 50, 0.1)]
    assert [m.server for m in plan(30, servers, min_gain=0.25).moves] == ["c"]


def test_no_move_below_the_minimum_gain() -> None:
    # Idle swarm, measured throughputs differ: moving "c" raises the bottleneck from 40 to 50 (+25 %), "a" to 45.
    servers = [Server("a", Span(0, 15), 50), Server("b", Span(15, 30), 40), Server("c", Span(0, 15), 45)]
    held = plan(30, servers, min_gain=0.3)
    assert held.moves == () and held.gain == pytest.approx(0.25)
    assert held.after == held.before == 40 and held.spans == {s.id: s.span for s in servers}
    assert "not more than the minimum gain" in held.reason
    taken = plan(30, servers, min_gain=0.2)
    assert taken.moves == (Move("c", Span(0, 15), Span(15, 30)),) and taken.after == 50


def test_a_gain_from_a_saturated_bottleneck_is_finite() -> None:
    result = plan(30, three(), min_gain=0.25)
    assert result.before == 0 and 0 < result.gain < float("inf")


def test_two_hot_spans_need_two_moves() -> None:
    servers = [Server("a", Span(0, 10), 10), Server("b", Span(10, 20), 10, 1.0), Server("c", Span(20, 30), 10, 1.0),
               Server("d", Span(0, 10), 10), Server("e", Span(0, 10), 10)]
    one = plan(30, servers, min_gain=0.1, max_moves=1)
    assert one.moves == () and not one.complete  # one move lifts one hot span; the bottleneck stays at 0
    two = plan(30, servers, min_gain=0.1, max_moves=2)
    assert sorted((m.new.start, m.new.end) for m in two.moves) == [(10, 20), (20, 30)]
    assert two.after == 10.0 and two.complete


def test_redundancy_blocks_a_move_that_would_uncover() -> None:
    servers = [Server("a", Span(0, 15), 50), Server("b", Span(15, 30), 50, 1.0)]
    result = plan(30, servers, min_gain=0.0, max_moves=2)
    assert result.moves == ()
    # With a spare server on [0, 15) but redundancy 2 there is nothing to give either.
    servers = three()
    assert plan(30, servers, redundancy=2, min_gain=0.0).moves == ()


def test_immovable_and_whole_model_servers_stay() -> None:
    servers = [Server("a", Span(0, 15), 50, movable=False), Server("b", Span(15, 30), 50, 1.0),
               Server("c", Span(0, 15), 50, movable=False), Server("full", Span(0, 30), 5)]
    assert plan(30, servers, min_gain=0.0, max_moves=4).moves == ()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan(30, [Server("a", Span(0, 15), 1), Server("a", Span(15, 30), 1)])
    with pytest.raises(ValueError, match="outside"):
        plan(10, [Server("a", Span(0, 15), 1)])
    with pytest.raises(ValueError, match="utilisation"):
        Server("a", Span(0, 1), 1, utilisation=1.5)
    with pytest.raises(ValueError, match="demand"):
        plan(30, three(), demand=[0.0])


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, list[Server], int]:
    num_blocks = draw(st.integers(4, 24))
    redundancy = draw(st.integers(1, 2))
    servers = []
    for i in range(draw(st.integers(1, 10))):
        length = draw(st.integers(1, num_blocks))
        start = draw(st.integers(0, num_blocks - length))
        servers.append(Server(f"s{i}", Span(start, start + length), draw(st.sampled_from([5.0, 10.0, 20.0, 35.0])),
                              draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 0.9, 1.0]))))
    return num_blocks, servers, redundancy


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(swarms(), st.integers(1, 4), st.sampled_from([0.0, 0.1, 0.25, 1.0]))
def test_plan_properties(swarm: tuple[int, list[Server], int], max_moves: int, min_gain: float) -> None:
    num_blocks, servers, redundancy = swarm
    result = plan(num_blocks, servers, redundancy=redundancy, min_gain=min_gain, max_moves=max_moves)
    before = coverage(num_blocks, [s.span for s in servers])
    floor = [min(redundancy, c) for c in before]
    # Bounded: at most max_moves distinct servers, each keeping its span length, inside the model.
    assert len(result.moves) <= max_moves
    assert len({m.server for m in result.moves}) == len(result.moves)
    by_id = {s.id: s for s in servers}
    for move in result.moves:
        assert move.old == by_id[move.server].span and len(move.new) == len(move.old) and move.new != move.old
        assert 0 <= move.new.start and move.new.end <= num_blocks
    # Redundancy kept after every move, in the order they run (make-before-break never uncovers a block).
    current = list(servers)
    for move in result.moves:
        current = apply_moves(current, [move])
        after = coverage(num_blocks, [s.span for s in current])
        assert all(a >= f for a, f in zip(after, floor, strict=True)), (move, after, floor)
    # Moves only above the minimum gain, and the promised bottleneck is what the new spans give.
    level, _ = bottleneck(spare(num_blocks, servers, result.demand, result.spans))
    assert level == pytest.approx(result.after)
    if result.moves:
        assert result.gain > min_gain and result.after > result.before
    else:
        assert result.after == result.before and result.spans == {s.id: s.span for s in servers}
    # Convergence: a complete plan is a fixed point with the same metrics (the same demand per block).
    if result.complete:
        again = plan(num_blocks, apply_moves(servers, result.moves), redundancy=redundancy, min_gain=min_gain,
                     max_moves=max_moves, demand=result.demand)
        assert again.moves == (), again.reason


@FAST
@given(swarms(), st.integers(1, 3), st.sampled_from([0.05, 0.25]))
def test_rounds_converge(swarm: tuple[int, list[Server], int], max_moves: int, min_gain: float) -> None:
    num_blocks, servers, redundancy = swarm
    demand = block_demand(num_blocks, servers)
    objective = bottleneck(spare(num_blocks, servers, demand))[0]
    for _ in range(50):
        result = plan(num_blocks, servers, redundancy=redundancy, min_gain=min_gain, max_moves=max_moves, demand=demand)
        if not result.moves:
            return
        assert result.after > objective * (1 + min_gain) - 1e-9 or objective <= 0
        servers, objective = apply_moves(servers, result.moves), result.after
    raise AssertionError("rounds with the same metrics kept moving servers")


def test_demand_belongs_to_blocks() -> None:
    servers = three(hot_utilisation=0.5)
    assert block_demand(30, servers) == [0.0] * 15 + [25.0] * 15
    result = plan(30, servers, min_gain=0.0)
    assert result.moves and result.demand == tuple(block_demand(30, servers))


# ---- the fresh plan (the benchmark's) ----------------------------------------------------------------------------------


def heterogeneous(n: int) -> list[Capacity]:
    classes = [(300.0, 40), (150.0, 12), (100.0, 8), (50.0, 4)]
    return [Capacity(f"s{i}", classes[i % 4][0] * (0.8 + 0.4 * ((i * 37) % 11) / 10), classes[i % 4][1]) for i in range(n)]


def test_fresh_plan_comes_close_to_the_upper_bound() -> None:
    servers = heterogeneous(200)
    spans = fresh_plan(80, servers, redundancy=2, polish_seconds=0.5)
    assert all(len(spans[s.id]) == min(s.max_blocks, 80) for s in servers)
    assert min(coverage(80, spans.values())) >= 2
    value, bound = capacity_bottleneck(80, servers, spans), upper_bound(80, servers)
    assert 0.95 * bound <= value <= bound


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 100), st.integers(1, 12)), min_size=1, max_size=12), st.integers(1, 12),
       st.randoms(use_true_random=False))
def test_upper_bound_bounds_every_placement(specs: list[tuple[float, int]], num_blocks: int, rng: object) -> None:
    servers = [Capacity(f"s{i}", c, m) for i, (c, m) in enumerate(specs)]
    spans = {}
    for s in servers:
        length = rng.randint(1, min(s.max_blocks, num_blocks))  # type: ignore[attr-defined]
        start = rng.randint(0, num_blocks - length)  # type: ignore[attr-defined]
        spans[s.id] = Span(start, start + length)
    assert capacity_bottleneck(num_blocks, servers, spans) <= upper_bound(num_blocks, servers) + 1e-9


# ---- the assignment (Kubernetes) -------------------------------------------------------------------------------------


def test_moved_servers_get_new_names_and_fit_the_placement() -> None:
    def name(start: int, end: int, ordinal: int) -> str:
        return server_name("sw", "cpu", Span(start, end), ordinal)

    placement = place(30, [Pool("cpu", min_servers=3, blocks_per_server=15)])
    desired = desired_servers("sw", placement)
    assert [d.name for d in desired] == [name(0, 15, 0), name(15, 30, 0), name(0, 15, 1)]
    assignment, renamed = moved("sw", desired, [Move(name(0, 15, 0), Span(0, 15), Span(15, 30))],
                                taken={name(15, 30, 1)})  # a draining server of that name still exists
    assert renamed == {name(0, 15, 0): name(15, 30, 2)}
    assert [d.name for d in assignment.servers] == [name(15, 30, 2), name(15, 30, 0), name(0, 15, 1)]
    assert fits(assignment, "sw", placement)
    assert Assignment.from_json(assignment.to_json()) == assignment
    assert Assignment.from_json("{not json") is None and Assignment.from_json('{"servers": [{"name": 1}]}') is None
    # Another placement (a fourth server), a foreign name or an uncovered block: the placement wins.
    assert not fits(assignment, "sw", place(30, [Pool("cpu", min_servers=4, blocks_per_server=15)]))
    assert not fits(assignment, "other", placement)
    uncovered = Assignment(tuple(DesiredServer(f"sw-cpu-15-30-{i}", "cpu", Span(15, 30)) for i in range(3)))
    assert not fits(uncovered, "sw", placement)
    with pytest.raises(ValueError, match="not desired"):
        moved("sw", desired, [Move("sw-cpu-9-9-9", Span(0, 15), Span(15, 30))])


def test_an_overlapping_move_keeps_the_old_server_until_the_new_one_is_ready() -> None:
    # [0, 10) moves to [5, 15) with redundancy 1: blocks 5..9 have only the old server until the new one is ready.
    old = ExistingServer("sw-p-0-10-0", "p", Span(0, 10))
    other = ExistingServer("sw-p-10-20-0", "p", Span(10, 20))
    desired = [DesiredServer("sw-p-5-15-0", "p", Span(5, 15)), DesiredServer("sw-p-10-20-0", "p", Span(10, 20)),
               DesiredServer("sw-p-0-5-0", "p", Span(0, 5))]
    existing = {s.name: s for s in (old, other)}
    waiting = plan_servers(desired, existing, {old.name: True, other.name: True}, num_blocks=20, redundancy=1,
                           now=0.0, drain_seconds=30)
    assert old.name not in waiting.drain and any(e.name == old.name and e.state == "online" for e in waiting.entries)
    existing.update({d.name: ExistingServer(d.name, "p", d.span) for d in desired})
    ready = {name: True for name in existing}
    done = plan_servers(desired, existing, ready, num_blocks=20, redundancy=1, now=0.0, drain_seconds=30)
    assert done.drain == [old.name]


# ---- metrics sources -----------------------------------------------------------------------------------------------


class Endpoints:
    """Real ServerMetrics registries served over HTTP at /<server>/metrics; `busy` ones always compute."""

    def __init__(self) -> None:
        self.metrics: dict[str, ServerMetrics] = {}
        self.busy: set[str] = set()
        self.last: dict[str, float] = {}
        self.url = ""

    def add(self, server: str, span: tuple[int, int], throughput: float, claims: str | None = None) -> None:
        m = ServerMetrics()
        m.throughput.set(throughput)
        m.span_start.set(span[0])
        m.span_end.set(span[1])
        m.info.labels("m", "float32", claims or server).set(1)
        self.metrics[server] = m
        self.last[server] = time.monotonic()

    async def handle(self, request: web.Request) -> web.Response:
        server = request.match_info["server"]
        if server not in self.metrics:
            return web.Response(status=404)
        now = time.monotonic()
        if server in self.busy:
            self.metrics[server].latency.labels("forward").observe(now - self.last[server])
            self.metrics[server].requests.labels("forward", "ok").inc()
            self.metrics[server].tokens.labels("forward").inc(16)
        self.last[server] = now
        return web.Response(body=generate_latest(self.metrics[server].registry), content_type="text/plain")


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    fake = Endpoints()
    app = web.Application()
    app.router.add_get("/{server}/metrics", fake.handle)
    async with serving(app) as url:
        fake.url = url
        yield fake


def test_parse_sample_and_rates() -> None:
    m = ServerMetrics()
    m.throughput.set(42.5)
    m.span_start.set(3)
    m.span_end.set(9)
    m.info.labels("m", "float32", "x").set(1)
    m.active_sessions.set(2)
    m.queue_depth.set(1)
    m.latency.labels("step").observe(0.5)
    m.latency.labels("open").observe(7.0)  # opening sessions is not compute
    m.requests.labels("step", "ok").inc(3)
    m.tokens.labels("inference").inc(30)
    first = parse_sample(generate_latest(m.registry).decode(), 100.0)
    assert (first.server_id, first.throughput, first.start, first.end) == ("x", 42.5, 3, 9)
    assert (first.busy_seconds, first.requests, first.tokens, first.active_sessions) == (0.5, 3.0, 30.0, 2.0)
    m.latency.labels("step").observe(1.5)
    m.tokens.labels("forward").inc(10)
    second = parse_sample(generate_latest(m.registry).decode(), 102.0)
    load = load_between("x", first, second)
    assert load is not None and load.busy == 0.75 and load.tokens_rate == 5.0 and load.utilisation == 1.0  # queue 1
    assert load_between("x", second, first) is None  # counters went back: a restart
    with pytest.raises(ValueError, match="not a block server"):
        parse_sample("# nothing\n", 0.0)
    assert ServerLoad("x", 10, busy=0.3).utilisation == 0.3 and ServerLoad("x", 10, busy=3.0).utilisation == 1.0


async def test_scrape_source_measures_rates_over_http(endpoints: Endpoints) -> None:
    endpoints.add("hot", (15, 30), 40.0)
    endpoints.add("cold", (0, 15), 60.0)
    endpoints.add("impostor", (0, 15), 60.0, claims="someone-else")
    endpoints.busy = {"hot"}
    # Windows of a second or more: the server's clock and the client's differ by a request's latency.
    source = ScrapeSource(lambda t: f"{endpoints.url}/{t.id}/metrics", baseline_seconds=1.0)
    targets = [Target("hot"), Target("cold"), Target("gone"), Target("impostor")]
    first = await source.collect(targets)
    assert set(first.loads) == {"hot", "cold"} and sorted(first.missing) == ["gone", "impostor"]
    assert "404" in first.errors["gone"] and "someone-else" in first.errors["impostor"]
    assert first.loads["hot"].utilisation == pytest.approx(1.0, abs=0.15) and first.loads["cold"].utilisation == 0.0
    assert (first.loads["hot"].throughput, first.loads["hot"].start, first.loads["hot"].end) == (40.0, 15, 30)
    assert 0.95 <= first.window
    await asyncio.sleep(1.0)
    second = await source.collect([Target("hot"), Target("cold")])  # rates since the previous call: no baseline wait
    assert second.loads["hot"].busy == pytest.approx(1.0, abs=0.15) and second.loads["hot"].request_rate > 0


async def test_scrape_source_reads_a_live_route_map_style_url(endpoints: Endpoints) -> None:
    endpoints.add("s", (0, 1), 1.0)
    source = ScrapeSource(baseline_seconds=0.1)  # default: the target's base URL + /metrics
    collected = await source.collect([Target("s", f"{endpoints.url}/s")])
    assert set(collected.loads) == {"s"}


async def test_prometheus_source(endpoints: Endpoints, tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("needs Debian's prometheus (apt-get install prometheus)")
    endpoints.add("hot", (15, 30), 40.0)
    endpoints.add("cold", (0, 15), 60.0)
    endpoints.busy = {"hot"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = endpoints.url.removeprefix("http://")
    # Two jobs on one host:port would share the `instance` label; a real setup has one instance per server.
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [
        {"job_name": name, "metrics_path": f"/{name}/metrics",
         "static_configs": [{"targets": [host], "labels": {"instance": f"{name}.example:8701"}}]}
        for name in endpoints.metrics
    ]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=error",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        source = PrometheusSource(url, window=3)
        deadline = time.monotonic() + 60
        while True:
            try:
                collected = await source.collect([Target("hot"), Target("cold"), Target("unknown")])
            except MetricsError:
                collected = None
            if collected is not None and not set(collected.missing) - {"unknown"} \
                    and collected.loads["hot"].busy > 0.5:
                break
            assert time.monotonic() < deadline, collected
            await asyncio.sleep(0.5)
        assert collected.missing == ["unknown"]
        hot, cold = collected.loads["hot"], collected.loads["cold"]
        assert (hot.throughput, hot.start, hot.end, cold.throughput, cold.start, cold.end) == (40.0, 15, 30, 60.0, 0, 15)
        assert hot.utilisation > 0.5 and cold.utilisation == 0.0 and hot.tokens_rate > 0 and cold.tokens_rate == 0
        async with aiohttp.ClientSession() as http:
            with pytest.raises(MetricsError, match="answered 400"):
                await source.query(http, "sum(")
    finally:
        process.terminate()
        await process.wait()
    with pytest.raises(MetricsError, match="cannot query Prometheus"):
        await PrometheusSource(url, timeout=2).collect([Target("hot")])


def test_promql_is_documented() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    for name, query in promql(60).items():
        assert query in text, f"docs/metrics.md lacks the {name} query: {query}"
    assert set(PROMQL) == {"server_id", "throughput", "span_start", "span_end", "busy", "queue_depth", "active_sessions",
                           "request_rate", "tokens_rate"}


# ---- local substrate pieces --------------------------------------------------------------------------------------------


def test_route_map_serves_prometheus_targets() -> None:
    routes = RouteMap(model=ModelInfo(name="m", num_blocks=30, hidden_size=8), version=1, servers=[
        ServerRecord(id="a", url="http://127.0.0.1:4100", start=0, end=15, state="online"),
        ServerRecord(id="b", url="https://node-2:8701/prefix/", start=15, end=30, state="draining"),
    ])
    assert prometheus_targets(routes) == [
        {"targets": ["127.0.0.1:4100"], "labels": {"__scheme__": "http", "__metrics_path__": "/metrics"}},
        {"targets": ["node-2:8701"], "labels": {"__scheme__": "https", "__metrics_path__": "/prefix/metrics"}},
    ]


def test_up_rebalance_flags() -> None:
    args = build_parser().parse_args(["up", "--rebalance", "--rebalance-interval", "5", "--min-gain", "0.5",
                                      "--max-moves", "2", "--prometheus-url", "http://127.0.0.1:9090"])
    assert (args.rebalance, args.rebalance_interval, args.min_gain, args.max_moves, args.prometheus_url) == (
        True, 5.0, 0.5, 2, "http://127.0.0.1:9090")
    plain = build_parser().parse_args(["up"])
    assert (plain.rebalance, plain.rebalance_interval, plain.min_gain, plain.max_moves, plain.prometheus_url) == (
        False, 30.0, 0.25, 1, None)


def test_up_refuses_bad_rebalance_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--rebalance", "--rebalance-interval", "0", "--port", "0"]) == 2  # before any server starts
    assert "interval must be > 0" in capsys.readouterr().err

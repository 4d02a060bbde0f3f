"""The rebalancer of the local substrate (``llmswarm up --rebalance``): a thin loop over the pure planner.

Every ``interval`` seconds, one round: read the route map, measure the online servers
(:mod:`~llmswarm_control.load_metrics`: Prometheus when a URL is given, else their
``/metrics``), plan (:func:`~llmswarm_control.rebalance.plan`) and run the moves one at a
time with :meth:`LocalSwarm.move <llmswarm_local.swarm.LocalSwarm.move>`
(make-before-break). A round is skipped while a server is joining or draining, and until
a full measuring window has passed since the last move, so every plan sees load measured
on the current spans.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmswarm_control.load_metrics import LoadSource, MetricsError, PrometheusSource, ScrapeSource, Target
from llmswarm_control.rebalance import Move, Plan, Server, plan
from llmswarm_control.rebalance_metrics import RebalanceMetrics
from llmswarm_core.security import client_ssl_context
from llmswarm_core.spans import Span
from llmswarm_local.swarm import LocalSwarm, LocalSwarmError

log = logging.getLogger("llmswarm.rebalance")

NAMESPACE, SWARM = "", "local"  # labels of the rebalance metrics in the local substrate


@dataclass
class RebalanceOptions:
    interval: float = 30.0  # seconds between rounds
    min_gain: float = 0.25  # smallest relative bottleneck gain worth a move
    max_moves: int = 1  # servers moved per round, at most
    prometheus_url: str | None = None  # None: scrape the servers' /metrics directly
    window: float | None = None  # seconds of load each round looks at (default: the interval)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("the rebalance interval must be > 0")
        if self.min_gain < 0 or self.max_moves < 0:
            raise ValueError("min_gain and max_moves must be >= 0")

    @property
    def measure_window(self) -> float:
        return self.window if self.window is not None else self.interval


@dataclass(frozen=True)
class Round:
    """One round: what was decided and, if servers moved, which (old id, new id, move)."""

    time: float  # Unix time
    result: str  # moved | unchanged | skipped | failed
    message: str
    plan: Plan | None = None
    moved: tuple[tuple[str, str, Move], ...] = ()
    utilisation: dict[str, float] = field(default_factory=dict)


class LocalRebalancer:
    def __init__(self, swarm: LocalSwarm, options: RebalanceOptions | None = None, source: LoadSource | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.swarm = swarm
        self.options = options or RebalanceOptions()
        o = self.options
        if source is None:
            ssl_context = client_ssl_context(swarm.options.tls_ca) if swarm.options.tls_cert else None
            source = (PrometheusSource(o.prometheus_url, window=o.measure_window) if o.prometheus_url
                      else ScrapeSource(ssl_context=ssl_context))
        self.source = source
        self.report = report or (lambda text: log.info("%s", text))
        self.metrics = RebalanceMetrics(swarm.registry)
        self.rounds: list[Round] = []
        self.last_move = 0.0  # monotonic time the last move finished
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the loop -----------------------------------------------------------------------------------------------------
    def start(self) -> LocalRebalancer:
        self._thread = threading.Thread(target=self._run, name="rebalancer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.options.interval):
            try:
                self.run_round()
            except Exception as error:  # a failed round must not end the loop
                log.exception("rebalance round failed")
                self._record(Round(time.time(), "failed", f"{type(error).__name__}: {error}"))

    # ---- one round ----------------------------------------------------------------------------------------------------
    def run_round(self) -> Round:
        o = self.options
        routes = self.swarm.routes()
        busy = [s.id for s in routes.servers if s.state != "online"]
        if busy:
            return self._record(Round(time.time(), "skipped", f"servers {', '.join(busy)} are joining or draining"))
        settle = self.last_move + o.measure_window - time.monotonic()
        if self.last_move and settle > 0:
            return self._record(Round(time.time(), "skipped", f"measuring the new spans for {settle:.0f} s more"))
        online = list(routes.servers)
        if not online:
            return self._record(Round(time.time(), "skipped", "no online server"))
        try:
            collected = asyncio.run(self.source.collect([Target(s.id, s.url) for s in online]))
        except MetricsError as error:
            return self._record(Round(time.time(), "failed", str(error)))
        if collected.missing:
            return self._record(Round(time.time(), "skipped", f"no metrics yet for {collected.describe_missing()}"))
        servers = [
            Server(s.id, Span(s.start, s.end), collected.loads[s.id].throughput or s.throughput,
                   collected.loads[s.id].utilisation)
            for s in online
        ]
        utilisation = {s.id: s.utilisation for s in servers}
        result = plan(self.swarm.num_blocks, servers, redundancy=self.swarm.options.redundancy, min_gain=o.min_gain,
                      max_moves=o.max_moves)
        if not result.moves:
            return self._record(Round(time.time(), "unchanged", result.reason, result, utilisation=utilisation))
        moved: list[tuple[str, str, Move]] = []
        for move in result.moves:
            self.report(f"rebalance: moving {move.server} from blocks {move.old} to {move.new} ({result.reason})")
            try:
                new_index = self.swarm.move(self.swarm.index_of(move.server), move.new)
            except (LocalSwarmError, KeyError) as error:
                self.last_move = time.monotonic()
                message = f"moving {move.server} to {move.new} failed: {error}"
                return self._record(Round(time.time(), "failed", message, result, tuple(moved), utilisation))
            new_id = self.swarm.server_ids[new_index]
            moved.append((move.server, new_id, move))
            self.report(f"rebalance: {new_id} serves blocks {move.new}; {move.server} drains")
        self.last_move = time.monotonic()
        return self._record(Round(time.time(), "moved", result.reason, result, tuple(moved), utilisation))

    def _record(self, entry: Round) -> Round:
        self.rounds.append(entry)
        plan_ = entry.plan
        self.metrics.observe(NAMESPACE, SWARM, entry.result, moves=len(entry.moved),
                             gain=plan_.gain if plan_ is not None else None,
                             bottleneck=plan_.before if plan_ is not None else None, when=entry.time)
        if entry.result in ("failed",) or entry.moved:
            log.info("rebalance round %s: %s", entry.result, entry.message)
        else:
            log.debug("rebalance round %s: %s", entry.result, entry.message)
        return entry

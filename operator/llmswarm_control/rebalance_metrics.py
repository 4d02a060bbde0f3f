"""What the rebalancer did, as Prometheus metrics: shared by the operator and the local substrate."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

SWARM_LABELS = ("namespace", "swarm")
REBALANCE_RESULTS = ("moved", "unchanged", "skipped", "failed")


class RebalanceMetrics:
    """What the rebalancer did, per Swarm (the local substrate uses namespace "" and swarm "local")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rounds = Counter("llmswarm_rebalance_rounds", "Rebalance rounds, by result (moved, unchanged, skipped, failed)",
                              [*SWARM_LABELS, "result"], registry=r)
        self.moves = Counter("llmswarm_rebalance_moves", "Servers the rebalancer moved to another span", SWARM_LABELS,
                             registry=r)
        self.gain = Gauge("llmswarm_rebalance_gain",
                          "Relative bottleneck gain of the best plan of the last measured round (moved or not)",
                          SWARM_LABELS, registry=r)
        self.bottleneck = Gauge("llmswarm_rebalance_bottleneck_tokens_per_second",
                                "Spare throughput of the bottleneck block at the last measured round", SWARM_LABELS,
                                registry=r)
        self.last_move = Gauge("llmswarm_rebalance_last_move_timestamp_seconds",
                               "Unix time of the last round that moved servers", SWARM_LABELS, registry=r)

    def observe(self, namespace: str, swarm: str, result: str, *, moves: int = 0, gain: float | None = None,
                bottleneck: float | None = None, when: float | None = None) -> None:
        key = (namespace, swarm)
        self.rounds.labels(*key, result).inc()
        self.moves.labels(*key).inc(moves)
        if gain is not None:
            self.gain.labels(*key).set(gain)
        if bottleneck is not None:
            self.bottleneck.labels(*key).set(bottleneck)
        if moves and when is not None:
            self.last_move.labels(*key).set(when)

    def forget(self, namespace: str, swarm: str) -> None:
        for metric in (self.moves, self.gain, self.bottleneck, self.last_move):
            remove_series(metric, namespace, swarm)
        for result in REBALANCE_RESULTS:
            remove_series(self.rounds, namespace, swarm, result)


def remove_series(metric: Any, *labels: str) -> None:
    """Drop one labelled series, if it exists."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass

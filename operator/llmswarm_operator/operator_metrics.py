"""The operator's own Prometheus metrics, on their own registry and HTTP listener (``/metrics``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmswarm_control.rebalance_metrics import SWARM_LABELS, RebalanceMetrics, remove_series

SERVER_STATES = ("desired", "ready", "joining", "online", "draining")


class OperatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconciles = Counter("llmswarm_operator_reconciles", "Reconciliations of Swarms, by trigger and result",
                                  ["trigger", "result"], registry=r)
        self.errors = Counter("llmswarm_operator_reconcile_errors", "Reconciliations that failed, by kind of error",
                              ["kind"], registry=r)
        self.duration = Histogram("llmswarm_operator_reconcile_duration_seconds", "Time one reconciliation takes",
                                  ["trigger"], registry=r,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.writes = Counter("llmswarm_operator_object_writes", "Objects created, updated or deleted, by verb and kind",
                              ["verb", "kind"], registry=r)
        self.min_replicas = Gauge("llmswarm_swarm_min_replicas", "Fewest online servers covering any block of a Swarm",
                                  SWARM_LABELS, registry=r)
        self.target_replicas = Gauge("llmswarm_swarm_target_replicas", "Redundancy a Swarm asks for", SWARM_LABELS,
                                     registry=r)
        self.uncovered = Gauge("llmswarm_swarm_uncovered_blocks", "Blocks of a Swarm that no online server covers",
                               SWARM_LABELS, registry=r)
        self.servers = Gauge("llmswarm_swarm_servers", "Servers of a Swarm, by state", [*SWARM_LABELS, "state"],
                             registry=r)
        self.ready = Gauge("llmswarm_swarm_ready", "1 when the Swarm's phase is Ready", SWARM_LABELS, registry=r)
        self.routemap_version = Gauge("llmswarm_swarm_routemap_version", "Version of a Swarm's published route map",
                                      SWARM_LABELS, registry=r)
        self.placement_feasible = Gauge("llmswarm_swarm_placement_feasible",
                                        "1 when the pools can give every block the asked redundancy", SWARM_LABELS,
                                        registry=r)
        self.missing_bytes = Gauge("llmswarm_swarm_placement_missing_bytes",
                                   "Server memory the pools lack to reach the asked redundancy", SWARM_LABELS, registry=r)
        self.rebalance = RebalanceMetrics(r)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def observe_writes(self, writes: Mapping[str, int]) -> None:
        for what, count in writes.items():
            verb, kind = what.split(" ", 1)
            self.writes.labels(verb, kind).inc(count)

    def observe_swarm(self, namespace: str, swarm: str, status: Mapping[str, Any]) -> None:
        key = (namespace, swarm)
        coverage = status.get("coverage") or {}
        if "minReplicas" not in coverage:  # an invalid spec: nothing was measured
            self.ready.labels(*key).set(0)
            return
        self.min_replicas.labels(*key).set(coverage.get("minReplicas", 0))
        self.target_replicas.labels(*key).set(coverage.get("targetReplicas", 0))
        self.uncovered.labels(*key).set(len(coverage.get("uncoveredBlocks") or []))
        servers = [s for s in status.get("servers") or [] if not s.get("outside")]  # the operator's own
        counts = {
            "desired": sum(1 for s in servers if s.get("desired")),
            "ready": sum(1 for s in servers if s.get("ready")),
            "joining": sum(1 for s in servers if s.get("state") == "joining"),
            "online": sum(1 for s in servers if s.get("state") == "online"),
            "draining": sum(1 for s in servers if s.get("state") == "draining"),
        }
        for state, count in counts.items():
            self.servers.labels(*key, state).set(count)
        self.ready.labels(*key).set(1 if status.get("phase") == "Ready" else 0)
        self.routemap_version.labels(*key).set((status.get("routeMap") or {}).get("version", 0))
        placement = status.get("placement") or {}
        self.placement_feasible.labels(*key).set(1 if placement.get("feasible") else 0)
        self.missing_bytes.labels(*key).set(placement.get("missingBytes", 0))

    def forget(self, namespace: str, swarm: str) -> None:
        """Drop the series of a deleted Swarm."""
        for gauge in (self.min_replicas, self.target_replicas, self.uncovered, self.ready, self.routemap_version,
                      self.placement_feasible, self.missing_bytes):
            remove_series(gauge, namespace, swarm)
        for state in SERVER_STATES:
            remove_series(self.servers, namespace, swarm, state)
        self.rebalance.forget(namespace, swarm)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> int:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

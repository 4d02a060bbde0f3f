"""One rebalance round of one Swarm (the Kubernetes substrate): measure, plan, move make-before-break.

:class:`~llmswarm_operator.runtime.Runtime` calls :func:`rebalance_round` from the
rebalance timer, under the Swarm's lock, when ``spec.rebalance.enabled`` and a round is due
(:func:`due`: ``intervalSeconds`` after the last round and after the Swarm last became
Ready). A round:

1. reconciles (the same level-based step as the reconcile timer) and goes on only when
   the Swarm is still ``Ready``: no rollout or earlier move is in progress, and when no
   online outside server holds blocks of it (:mod:`llmswarm_operator.outside`);
2. measures every online server (:class:`~llmswarm_control.load_metrics.PrometheusSource`
   with ``spec.rebalance.prometheusUrl``, else
   :class:`~llmswarm_control.load_metrics.ScrapeSource` on each server's Service);
3. plans with :func:`~llmswarm_control.rebalance.plan` (``minGain`` from the spec, at most
   the operator's ``rebalance_max_moves`` servers);
4. if servers move, reconciles again with the new :class:`~llmswarm_operator.assignment.Assignment`:
   the moved servers' new Deployments are created next to the old ones, which drain only
   once the new ones are ready (:mod:`~llmswarm_operator.planner`), and the assignment is
   stored in the route-map ConfigMap.

It returns the reconcile outcome with ``status.rebalance`` (last round, its result, the
bottleneck, and the last rebalance: time, gain, moves) and a ``Rebalanced`` Event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmswarm_control.load_metrics import LoadSource, MetricsError, PrometheusSource, ScrapeSource, Target
from llmswarm_control.rebalance import Plan, Server, plan
from llmswarm_operator import manifests as m
from llmswarm_operator.assignment import moved
from llmswarm_operator.kubeapi import KubeClient
from llmswarm_operator.reconcile import Outcome, reconcile
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.status import find_condition
from llmswarm_operator.swarm_spec import InvalidSpec, SwarmSpec, parse_spec
from llmswarm_operator.timestamps import epoch, iso

log = logging.getLogger("llmswarm.operator.rebalance")

Body = dict[str, Any]

#: Seconds between the two scrapes of a server the rebalancer has not measured before.
BASELINE_SECONDS = 2.0


@dataclass
class RoundResult:
    outcome: Outcome
    result: str  # moved | unchanged | skipped | failed
    message: str
    plan: Plan | None = None
    moves: int = 0


def enabled_spec(body: Mapping[str, Any]) -> SwarmSpec | None:
    """The spec, when it is valid and asks for rebalancing."""
    try:
        spec = parse_spec(body.get("spec"))
    except InvalidSpec:
        return None
    return spec if spec.rebalance.enabled else None


def due(body: Mapping[str, Any], spec: SwarmSpec, last_round: float | None, now: float) -> bool:
    """A round is due while the Swarm is Ready, `intervalSeconds` after it became Ready and after the last round
    (so load is measured on the current spans for a whole interval)."""
    status = body.get("status") or {}
    ready = find_condition(status, "Ready")
    ready_since = epoch(ready.get("lastTransitionTime")) if ready is not None and ready.get("status") == "True" else None
    if ready_since is None:
        return False
    if last_round is None:
        last_round = epoch((status.get("rebalance") or {}).get("lastRound"))
    return now >= max(last_round or 0.0, ready_since) + spec.rebalance.interval_seconds


def source_for(spec: SwarmSpec, settings: OperatorSettings, namespace: str,
               previous: LoadSource | None = None) -> LoadSource:
    """Prometheus when the spec names one, else direct scraping; keeps `previous` when it is still the right one
    (a scrape source holds the last sample of every server)."""
    url = spec.rebalance.prometheus_url
    if url:
        if isinstance(previous, PrometheusSource) and previous.url == url.rstrip("/") \
                and previous.window == spec.rebalance.interval_seconds:
            return previous
        return PrometheusSource(url, window=spec.rebalance.interval_seconds)
    if isinstance(previous, ScrapeSource):
        return previous

    def url_for(target: Target) -> str:
        host = m.service_host(target.id, namespace, settings)
        return settings.rebalance_scrape_url.format(host=host, server=target.id, namespace=namespace, port=spec.server.port)

    return ScrapeSource(url_for, baseline_seconds=BASELINE_SECONDS)


async def rebalance_round(kube: KubeClient, settings: OperatorSettings, body: Mapping[str, Any], spec: SwarmSpec,
                          source: LoadSource, now: float) -> RoundResult | None:
    """One round; None when the spec is invalid (the reconcile handlers report that)."""
    outcome = await reconcile(kube, settings, body, now)
    if outcome.invalid:
        return None
    name = (body.get("metadata") or {}).get("name", "")
    if outcome.phase != "Ready":
        return _finish(outcome, body, source, now, "skipped", f"the Swarm is {outcome.phase}: waiting until it is Ready")
    held = sum(1 for s in outcome.outside if s.online)
    if held:  # the planner would count their blocks as unserved, and cannot move them: no round until they leave
        return _finish(outcome, body, source, now, "skipped", f"{held} outside server(s) hold blocks of this Swarm: "
                       "rounds wait until only the operator's servers serve it")
    online = [e for e in outcome.entries if e.state == "online"]
    try:
        collected = await source.collect([Target(e.name) for e in online])
    except MetricsError as error:
        return _finish(outcome, body, source, now, "failed", str(error))
    if collected.missing:
        return _finish(outcome, body, source, now, "skipped", f"no metrics for {collected.describe_missing()}"[:1000])
    servers = [
        Server(e.name, e.span, collected.loads[e.name].throughput, collected.loads[e.name].utilisation, e.pool)
        for e in sorted(online, key=lambda e: e.name)
    ]
    result = plan(outcome.num_blocks, servers, redundancy=spec.redundancy, min_gain=spec.rebalance.min_gain,
                  max_moves=settings.rebalance_max_moves)
    if not result.moves:
        return _finish(outcome, body, source, now, "unchanged", result.reason, result)
    assignment, renamed = moved(name, outcome.desired, result.moves, outcome.workloads)
    outcome = await reconcile(kube, settings, body, now, assignment=assignment)
    moves = [
        {"server": mv.server, "newServer": renamed[mv.server], "pool": next(s.pool for s in servers if s.id == mv.server),
         "from": str(mv.old), "to": str(mv.new)}
        for mv in result.moves
    ]
    text = "; ".join(f"{x['server']} (blocks {x['from']}) -> {x['newServer']} (blocks {x['to']})" for x in moves)
    outcome.events.append(("Normal", "Rebalanced", f"{result.reason}: {text}"))
    return _finish(outcome, body, source, now, "moved", result.reason, result, moves)


def _finish(outcome: Outcome, body: Mapping[str, Any], source: LoadSource, now: float, result: str, message: str,
            planned: Plan | None = None, moves: list[dict[str, Any]] | None = None) -> RoundResult:
    previous = (body.get("status") or {}).get("rebalance") or {}
    status: Body = {"source": source.kind, "lastRound": iso(now), "result": result, "message": message}
    if planned is not None:
        status["bottleneckThroughput"] = round(planned.before, 3)
        status["bottleneckBlock"] = planned.bottleneck_block
        status["bestGain"] = round(planned.gain, 4)
    if moves:
        status["lastRebalance"] = {
            "time": iso(now), "gain": round(planned.gain, 4) if planned else 0.0,
            "bottleneckBefore": round(planned.before, 3) if planned else 0.0,
            "bottleneckAfter": round(planned.after, 3) if planned else 0.0, "moves": moves,
        }
    elif previous.get("lastRebalance"):
        status["lastRebalance"] = previous["lastRebalance"]
    outcome.status["rebalance"] = status
    return RoundResult(outcome, result, message, planned, len(moves or []))

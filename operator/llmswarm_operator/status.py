"""The Swarm's status: phase, conditions, servers, coverage. Pure: built from what reconcile saw.

Phases:

- ``Pending``: servers are starting and some block has no online server yet;
- ``Progressing``: every block is served, but a rollout is not finished (a desired server
  is not ready, or an old one is still draining);
- ``Ready``: every desired server is ready, no old server is left, every block has at least
  ``redundancy`` online servers;
- ``Degraded``: nothing is left to roll out, but the pools cannot give every block
  ``redundancy`` servers (``placement.message`` says which blocks and how much memory
  is missing);
- ``Failed``: the spec is invalid, or the API server refuses the operator's writes (the
  ``Ready`` condition says what to fix); the servers that exist keep running.

Coverage counts the operator's online servers and the online outside servers (servers that
joined the Swarm's route map on their own, :mod:`llmswarm_operator.outside`); ``servers``
lists both, outside ones with ``outside: true``.

Conditions ``Ready``, ``Progressing`` and ``Degraded`` follow the Kubernetes conventions
(``status``, ``reason``, ``message``, ``lastTransitionTime`` kept while the status stays).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmswarm_control.placement import Placement
from llmswarm_core.spans import ranges
from llmswarm_operator.outside import OutsideServer
from llmswarm_operator.planner import ServerPlan
from llmswarm_operator.timestamps import now_iso

Body = dict[str, Any]

PENDING, PROGRESSING, READY, DEGRADED, FAILED = "Pending", "Progressing", "Ready", "Degraded", "Failed"
PHASES = (PENDING, PROGRESSING, READY, DEGRADED, FAILED)


@dataclass(frozen=True)
class Seen:
    """What one reconciliation established."""

    redundancy: int
    placement: Placement
    plan: ServerPlan
    online_coverage: Sequence[int]  # online servers per block, the operator's and outside ones
    routemap_version: int
    routemap_url: str
    routemap_configmap: str
    generation: int | None = None
    conflicts: tuple[str, ...] = ()  # objects the Swarm needs that exist and belong to something else
    outside: tuple[OutsideServer, ...] = ()  # servers in the route map that the operator did not create


def conflict_message(conflicts: Sequence[str]) -> str:
    return "; ".join(conflicts)


def phase_of(seen: Seen) -> str:
    low = min(seen.online_coverage, default=0)
    if not seen.plan.converged:
        return PENDING if low == 0 else PROGRESSING
    if seen.placement.feasible and low >= seen.redundancy:
        return READY
    return DEGRADED


def swarm_status(seen: Seen, previous: Mapping[str, Any] | None, now: str | None = None) -> Body:
    now = now or now_iso()
    phase = phase_of(seen)
    coverage = list(seen.online_coverage)
    low = min(coverage, default=0)
    short = [b for b, c in enumerate(coverage) if c < seen.redundancy]
    entries = seen.plan.entries
    desired = [e for e in entries if e.desired]
    ready = sum(1 for e in desired if e.ready)
    old = [e for e in entries if not e.desired]
    draining = sum(1 for e in old if e.state == "draining")

    progress = f"{ready} of {len(desired)} servers ready"
    if old:
        progress += f"; {len(old)} old server(s) still running ({draining} draining)"
    if seen.outside:
        progress += f"; {len(seen.outside)} outside server(s) ({sum(1 for s in seen.outside if s.online)} online)"

    if phase == READY:
        ready_reason, ready_message = "AllServersReady", f"{progress}; every block has at least {low} online servers"
    elif phase in (PENDING, PROGRESSING):
        ready_reason, ready_message = "RollingOut", progress
    elif not seen.placement.feasible:
        ready_reason, ready_message = "PlacementInsufficient", seen.placement.message
    else:
        ready_reason, ready_message = "BelowRedundancy", f"blocks {ranges(short)} have fewer than {seen.redundancy} online servers"

    if seen.conflicts:
        # The Swarm cannot be whole while another object holds one of its names: that comes first.
        phase = DEGRADED if phase == READY else phase
        ready_reason, ready_message = "ObjectConflict", conflict_message(seen.conflicts)
        degraded = (True, "ObjectConflict", conflict_message(seen.conflicts))
    elif not seen.placement.feasible:
        degraded = (True, "PlacementInsufficient", seen.placement.message)
    elif short:
        degraded = (True, "BelowRedundancy", f"blocks {ranges(short)} have fewer than {seen.redundancy} online servers")
    else:
        degraded = (False, "AtRedundancy", f"every block has at least {seen.redundancy} online servers")

    old_conditions = (previous or {}).get("conditions") or []
    conditions = [
        condition("Ready", phase == READY, ready_reason, ready_message, old_conditions, now, seen.generation),
        condition("Progressing", not seen.plan.converged, "RollingOut" if not seen.plan.converged else "Converged",
                  progress, old_conditions, now, seen.generation),
        condition("Degraded", degraded[0], degraded[1], degraded[2], old_conditions, now, seen.generation),
    ]
    status: Body = {
        "phase": phase,
        "conditions": conditions,
        "servers": [
            *({"name": e.name, "pool": e.pool, "start": e.span.start, "end": e.span.end, "ready": e.ready,
               "state": e.state, "desired": e.desired, "outside": False} for e in entries),
            *(s.status() for s in seen.outside),
        ],
        "serversDesired": len(desired),
        "serversOutside": len(seen.outside),
        "serversReady": ready,
        "readyServers": f"{ready}/{len(desired)}",
        "coverage": {
            "minReplicas": low,
            "targetReplicas": seen.redundancy,
            "uncoveredBlocks": [b for b, c in enumerate(coverage) if c == 0],
            "shortBlocks": ranges(short),
        },
        "placement": {
            "feasible": seen.placement.feasible,
            "message": seen.placement.message,
            "missingBytes": seen.placement.missing_bytes,
            "servers": len(seen.placement.servers),
        },
        "routeMap": {
            "version": seen.routemap_version,
            "url": seen.routemap_url,
            "configMap": seen.routemap_configmap,
        },
    }
    if seen.generation is not None:
        status["observedGeneration"] = seen.generation
    return status


def invalid_status(message: str, generation: int | None, previous: Mapping[str, Any] | None, now: str | None = None) -> Body:
    """Status of a Swarm whose spec cannot be acted on. Other fields (servers, coverage) stay as they were."""
    return failed_status("InvalidSpec", message, "the spec must be fixed first", generation, previous, now)


def refused_status(reason: str, message: str, generation: int | None, previous: Mapping[str, Any] | None,
                   now: str | None = None) -> Body:
    """Status of a Swarm whose objects the API server refuses to write (RBAC, admission, validation).

    Like an invalid spec, it needs a person: the ``Ready`` and ``Degraded`` conditions carry the API
    server's reason and answer; what exists keeps running, and the operator keeps trying (a granted
    permission heals it without anyone touching the Swarm).
    """
    return failed_status(reason, message, "the API server refuses the operator's writes", generation, previous, now)


def failed_status(reason: str, message: str, progress: str, generation: int | None, previous: Mapping[str, Any] | None,
                  now: str | None = None) -> Body:
    """Phase ``Failed``: the Swarm cannot be acted on until a person fixes what `message` says."""
    now = now or now_iso()
    old_conditions = (previous or {}).get("conditions") or []
    status: Body = {
        "phase": FAILED,
        "conditions": [
            condition("Ready", False, reason, message, old_conditions, now, generation),
            condition("Progressing", False, reason, progress, old_conditions, now, generation),
            condition("Degraded", True, reason, message, old_conditions, now, generation),
        ],
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def condition(
    kind: str, value: bool, reason: str, message: str, previous: Sequence[Mapping[str, Any]], now: str,
    generation: int | None = None,
) -> Body:
    text = "True" if value else "False"
    since = now
    for old in previous:
        if old.get("type") == kind and old.get("status") == text and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
    out: Body = {"type": kind, "status": text, "reason": reason, "message": message[:4000], "lastTransitionTime": since}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def find_condition(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for item in (status or {}).get("conditions") or []:
        if item.get("type") == kind:
            return item  # type: ignore[no-any-return]
    return None

"""Decide, from what exists and what should exist, what to do with servers. Pure, no I/O.

``plan_servers(desired, existing, ready, ...)`` returns plain data that the reconciler
executes. Its rules keep coverage during a rollout:

- a desired server is ``online`` in the route map once its pod is ready, ``joining`` before;
- an old server (no longer desired) that is not ready is deleted at once: it serves nothing;
- an old ready server leaves only when it is not needed: when every desired server is
  ready, or when every block of its span keeps at least ``redundancy`` other ready
  servers. It is first ``draining`` in the route map (clients open no new session on it)
  for ``drain_seconds``, then deleted. If it becomes needed again while draining (a new
  server failed), it goes back to ``online``.

The drain start is kept on the server's workload (an annotation), so the plan depends
only on what the cluster shows: a restarted operator makes the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord, ServerState
from llmswarm_core.spans import Span, coverage
from llmswarm_operator.manifests import DesiredServer


@dataclass(frozen=True)
class ExistingServer:
    name: str
    pool: str
    span: Span
    draining_since: float | None = None  # epoch seconds


@dataclass(frozen=True)
class ServerEntry:
    """One server as the status and the route map show it."""

    name: str
    pool: str
    span: Span
    ready: bool
    state: ServerState
    desired: bool


@dataclass
class ServerPlan:
    entries: list[ServerEntry] = field(default_factory=list)  # servers that stay (for now)
    drain: list[str] = field(default_factory=list)  # start draining now
    undrain: list[str] = field(default_factory=list)  # needed again: stop draining
    delete: list[str] = field(default_factory=list)  # remove the workload and its Service

    @property
    def converged(self) -> bool:
        """Every desired server is ready and no old server is left (once `delete` is done)."""
        return all(e.desired and e.ready for e in self.entries)


def plan_servers(
    desired: Sequence[DesiredServer],
    existing: Mapping[str, ExistingServer],
    ready: Mapping[str, bool],
    *,
    num_blocks: int,
    redundancy: int,
    now: float,
    drain_seconds: float,
) -> ServerPlan:
    plan = ServerPlan()
    desired_names = {d.name for d in desired}
    for server in desired:
        is_ready = bool(ready.get(server.name)) and server.name in existing
        plan.entries.append(ServerEntry(server.name, server.pool, server.span, is_ready,
                                        "online" if is_ready else "joining", True))
        old = existing.get(server.name)
        if old is not None and old.draining_since is not None:
            plan.undrain.append(server.name)
    all_desired_ready = all(e.ready for e in plan.entries)

    old_servers = sorted((s for s in existing.values() if s.name not in desired_names), key=lambda s: s.name)
    serving = coverage(num_blocks, [e.span for e in plan.entries if e.ready])
    serving_old = [s for s in old_servers if ready.get(s.name)]
    counts = [a + b for a, b in zip(serving, coverage(num_blocks, [s.span for s in serving_old]), strict=True)]
    for old in old_servers:
        if not ready.get(old.name):
            plan.delete.append(old.name)
            continue
        without = counts[:]
        for block in range(old.span.start, min(old.span.end, num_blocks)):
            without[block] -= 1
        needed = not all_desired_ready and any(
            without[b] < redundancy for b in range(old.span.start, min(old.span.end, num_blocks))
        )
        if needed:
            if old.draining_since is not None:
                plan.undrain.append(old.name)
            plan.entries.append(ServerEntry(old.name, old.pool, old.span, True, "online", False))
            continue
        counts = without
        if old.draining_since is None:
            plan.drain.append(old.name)
            plan.entries.append(ServerEntry(old.name, old.pool, old.span, True, "draining", False))
        elif now - old.draining_since >= drain_seconds:
            plan.delete.append(old.name)
        else:
            plan.entries.append(ServerEntry(old.name, old.pool, old.span, True, "draining", False))
    return plan


def online_coverage(num_blocks: int, entries: Iterable[ServerEntry]) -> list[int]:
    """Servers per block that clients can use (ready and not draining)."""
    return coverage(num_blocks, [e.span for e in entries if e.state == "online"])


def route_map(
    model: ModelInfo,
    entries: Iterable[ServerEntry],
    urls: Mapping[str, str],
    dtype: str,
    previous: RouteMap | None,
) -> RouteMap:
    """The map to publish; its version goes up by one whenever what it says changes."""
    servers = sorted(
        (ServerRecord(id=e.name, url=urls[e.name], start=e.span.start, end=e.span.end, state=e.state, dtype=dtype)
         for e in entries),
        key=lambda r: (r.start, r.end, r.id),
    )
    version = 1
    if previous is not None:
        same = previous.model == model and previous.servers == servers
        version = previous.version if same else previous.version + 1
    return RouteMap(model=model, version=version, servers=servers)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def ready_servers(pods: Iterable[Mapping[str, Any]], label: str) -> dict[str, bool]:
    """Server name -> whether at least one of its pods is ready."""
    out: dict[str, bool] = {}
    for pod in pods:
        name = ((pod.get("metadata") or {}).get("labels") or {}).get(label)
        if name:
            out[name] = out.get(name, False) or pod_ready(pod)
    return out

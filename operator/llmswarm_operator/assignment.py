"""Where the rebalancer put the servers of a Swarm: kept next to the route map. Pure, no I/O.

Placement (:func:`~llmswarm_operator.swarm_spec.plan_placement`) decides *which* servers a
Swarm has: how many per pool and how long their spans are. The rebalancer only moves
spans, so its result is the same servers at other positions: an :class:`Assignment`,
stored as ``assignment.json`` in the route-map ConfigMap (the reconciler reads that
ConfigMap anyway; a timer tick with an old copy of the Swarm cannot undo a move).

An assignment is used while it still fits the placement (:func:`fits`): the same number
of servers per pool with the same span lengths, every span inside the model, every block
held by at least as many servers as the placement gives it (up to the redundancy). When
the spec changes the placement, the placement wins and the assignment is dropped.

A moved server is a new server (its name says its span): it is created next to the old
one, which drains once it is ready, exactly as in a rollout of a changed spec.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llmswarm_control.placement import Placement
from llmswarm_control.rebalance import Move
from llmswarm_core.spans import Span, coverage
from llmswarm_operator.manifests import ASSIGNMENT_FILE, DesiredServer, server_name

__all__ = ["ASSIGNMENT_FILE", "Assignment", "fits", "moved"]


@dataclass(frozen=True)
class Assignment:
    servers: tuple[DesiredServer, ...]

    def to_json(self) -> str:
        return json.dumps({"servers": [{"name": s.name, "pool": s.pool, "start": s.span.start, "end": s.span.end}
                                       for s in self.servers]}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Assignment | None:
        """The stored assignment, or None when there is none or it cannot be read."""
        try:
            data = json.loads(text)
            servers = tuple(DesiredServer(str(s["name"]), str(s["pool"]), Span(int(s["start"]), int(s["end"])))
                            for s in data["servers"])
        except (ValueError, KeyError, TypeError):
            return None
        return cls(servers)


def fits(assignment: Assignment, swarm: str, placement: Placement) -> bool:
    """Whether `assignment` is the placement's servers at other positions, with the placement's coverage."""
    servers = assignment.servers
    if not servers:
        return False
    shapes = Counter((s.pool, len(s.span)) for s in servers)
    if shapes != Counter((p.pool, len(p.span)) for p in placement.servers):
        return False
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        return False
    if any(s.span.end > placement.num_blocks or not _named_for(s, swarm) for s in servers):
        return False
    have = coverage(placement.num_blocks, [s.span for s in servers])
    return all(h >= min(placement.redundancy, c) for h, c in zip(have, placement.coverage, strict=True))


def _named_for(server: DesiredServer, swarm: str) -> bool:
    ordinal = server.name.rsplit("-", 1)[-1]
    return ordinal.isdigit() and server_name(swarm, server.pool, server.span, int(ordinal)) == server.name


def moved(swarm: str, desired: Sequence[DesiredServer], moves: Iterable[Move],
          taken: Iterable[str] = ()) -> tuple[Assignment, dict[str, str]]:
    """The assignment after `moves` (by server name) and the new name of each moved server.

    A moved server gets the first free name for its pool and new span, never one that is
    in use (`taken`: every server workload that exists, draining ones included).
    """
    used = set(taken) | {d.name for d in desired}
    by_name: Mapping[str, Move] = {m.server: m for m in moves}
    unknown = set(by_name) - {d.name for d in desired}
    if unknown:
        raise ValueError(f"moves of servers that are not desired: {sorted(unknown)}")
    out, renamed = [], {}
    for server in desired:
        move = by_name.get(server.name)
        if move is None:
            out.append(server)
            continue
        if move.old != server.span or len(move.new) != len(server.span):
            raise ValueError(f"move {move} does not fit server {server.name} at {server.span}")
        ordinal = 0
        while (name := server_name(swarm, server.pool, move.new, ordinal)) in used:
            ordinal += 1
        used.add(name)
        renamed[server.name] = name
        out.append(DesiredServer(name, server.pool, move.new))
    return Assignment(tuple(out)), renamed

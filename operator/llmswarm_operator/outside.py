"""Outside servers: block servers in a Swarm's route map that the operator did not create. Pure, no I/O.

Anyone with the swarm's join credential may run ``llmswarm serve --join URL`` and announce a
server to a Swarm's route map. The operator reads the published map (``GET /v1/routes``,
:mod:`llmswarm_operator.reconcile`) and sorts its servers here:

- a server is the operator's own when its id is one the operator knows (a server workload of
  the Swarm, a desired server, a server of its last record) or is named the way the operator
  names the Swarm's servers (``<swarm>-<pool>-<key>-<start>-<end>-<n>``, for a pool of the spec:
  one of its own that was just deleted may still be announcing);
- every other server of the Swarm's model is outside.

Outside servers that are ``online`` hold their blocks for placement (:func:`coverage_of`), and
the status lists every outside server with ``outside: true``. The operator never creates,
changes or deletes anything for an outside server: it has no workload for one. When one stops
announcing, the route map drops it, the next reconciliation no longer counts it, and the
placement covers its blocks again.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmswarm_core.routemap import ModelInfo, RouteMap, ServerState
from llmswarm_core.spans import Span, coverage
from llmswarm_operator.manifests import pool_key, server_name


@dataclass(frozen=True)
class OutsideServer:
    """A server in the route map that is not the operator's."""

    id: str
    url: str
    span: Span
    state: ServerState
    throughput: float = 0.0

    @property
    def online(self) -> bool:
        return self.state == "online"

    def status(self) -> dict[str, Any]:
        """Its entry in ``status.servers``."""
        return {"name": self.id, "url": self.url, "start": self.span.start, "end": self.span.end, "ready": self.online,
                "state": self.state, "desired": False, "outside": True}


def named_like_ours(server_id: str, swarm: str, pools: Iterable[str]) -> bool:
    """Whether `server_id` is the name the operator gives a server of the Swarm in one of `pools`
    (:func:`~llmswarm_operator.manifests.server_name`)."""
    for pool in pools:
        match = re.fullmatch(rf".+-{pool_key(swarm, pool)}-(\d+)-(\d+)-(\d+)", server_id)
        if match is None:
            continue
        start, end, ordinal = (int(part) for part in match.groups())
        if start < end and server_name(swarm, pool, Span(start, end), ordinal) == server_id:
            return True
    return False


def outside_servers(routes: RouteMap, model: ModelInfo, swarm: str, pools: Iterable[str],
                    own: Collection[str]) -> list[OutsideServer]:
    """The servers of `routes` that are not the operator's (`own`: ids it knows as its servers), sorted by span.

    A map of another model (or of none yet) has no servers of this Swarm: nothing is outside."""
    if routes.model != model:
        return []
    pools = tuple(pools)
    found = [
        OutsideServer(s.id, s.url, Span(s.start, s.end), s.state, s.throughput)
        for s in routes.servers
        if s.id not in own and not named_like_ours(s.id, swarm, pools)
    ]
    return sorted(found, key=lambda s: (s.span.start, s.span.end, s.id))


def coverage_of(num_blocks: int, servers: Sequence[OutsideServer]) -> list[int]:
    """Online outside servers per block: what they hold for placement and for the Swarm's coverage."""
    return coverage(num_blocks, [s.span for s in servers if s.online])

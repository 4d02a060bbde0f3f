"""Choosing a chain of servers that covers every block: pure, no I/O.

The chain is a shortest path over block boundaries 0..num_blocks: from boundary ``a``,
a server whose span contains block ``a`` can carry the hidden states to any boundary
``b`` inside its span. The cost of that hop is the client's round-trip time to the
server plus a fixed per-hop overhead, plus the compute time of ``b - a`` blocks from the
server's published throughput. Costs compare as (seconds, hops), so among equally fast
chains the one with fewer hops wins.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llmswarm_core.routemap import ServerRecord

DEFAULT_RTT = 0.005  # seconds, for a server the client has not measured yet
HOP_OVERHEAD = 0.002  # seconds of serialization and scheduling per hop


@dataclass(frozen=True)
class Hop:
    server: ServerRecord
    start: int
    end: int


class NoRoute(RuntimeError):
    """No chain of usable servers covers every block."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(f"no online server can serve blocks [{start}, {end})")
        self.start, self.end = start, end


def block_seconds(server: ServerRecord) -> float:
    """Expected compute time of one block on `server` for one token."""
    if server.throughput <= 0:
        return 1.0
    return 1.0 / (server.throughput * (server.end - server.start))


def choose_chain(
    servers: Iterable[ServerRecord],
    start: int,
    end: int,
    rtt: Mapping[str, float] | None = None,
    exclude: Iterable[str] = (),
) -> list[Hop]:
    """The cheapest chain of online servers covering blocks [start, end)."""
    rtt = rtt or {}
    banned = set(exclude)
    usable = sorted(
        (s for s in servers if s.state == "online" and s.id not in banned and s.start < end and s.end > start),
        key=lambda s: s.id,
    )
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    previous: dict[int, Hop] = {}
    queue: list[tuple[float, int, int]] = [(0.0, 0, start)]
    while queue:
        cost, hops, at = heapq.heappop(queue)
        if at == end:
            break
        if (cost, hops) > best.get(at, (float("inf"), 0)):
            continue
        for server in usable:
            if not server.start <= at < server.end:
                continue
            hop_cost = cost + rtt.get(server.id, DEFAULT_RTT) + HOP_OVERHEAD
            per_block = block_seconds(server)
            for stop in range(at + 1, min(server.end, end) + 1):
                candidate = (hop_cost + (stop - at) * per_block, hops + 1)
                if candidate < best.get(stop, (float("inf"), 0)):
                    best[stop] = candidate
                    previous[stop] = Hop(server, at, stop)
                    heapq.heappush(queue, (candidate[0], candidate[1], stop))
    if end not in previous and start != end:
        reached = max(best)
        resumes = [s.start for s in usable if s.start > reached]
        raise NoRoute(reached, min([*resumes, end]))
    chain: list[Hop] = []
    at = end
    while at != start:
        hop = previous[at]
        chain.append(hop)
        at = hop.start
    return chain[::-1]

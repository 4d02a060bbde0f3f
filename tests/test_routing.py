"""Chain selection over the route map (pure)."""

from __future__ import annotations

import itertools

import pytest

from llmswarm.routing import NoRoute, choose_chain
from llmswarm_core.routemap import ServerRecord


def server(sid: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> ServerRecord:
    return ServerRecord(id=sid, url=f"http://127.0.0.1/{sid}", start=start, end=end, state=state, throughput=throughput)


def spans(chain):
    return [(hop.server.id, hop.start, hop.end) for hop in chain]


def test_tiles_three_servers():
    servers = [server("c", 20, 30), server("a", 0, 10), server("b", 10, 20)]
    assert spans(choose_chain(servers, 0, 30)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_prefers_fewer_hops_when_one_server_holds_everything():
    servers = [server("a", 0, 10), server("b", 10, 20), server("c", 20, 30), server("full", 0, 30, throughput=40)]
    assert spans(choose_chain(servers, 0, 30)) == [("full", 0, 30)]


def test_overlapping_spans_are_cut():
    servers = [server("a", 0, 8), server("b", 8, 16), server("c", 16, 24), server("d", 22, 30)]
    chain = choose_chain(servers, 0, 30)
    assert len(chain) == 4
    assert chain[0].start == 0 and chain[-1].end == 30
    assert all(a.end == b.start for a, b in itertools.pairwise(chain))


def test_prefers_fast_and_near_servers():
    servers = [server("slow", 0, 30, throughput=1.0), server("fast", 0, 30, throughput=100.0)]
    assert spans(choose_chain(servers, 0, 30)) == [("fast", 0, 30)]
    rtt = {"fast": 5.0, "slow": 0.001}
    assert spans(choose_chain(servers, 0, 30, rtt=rtt)) == [("slow", 0, 30)]


def test_skips_excluded_and_not_online_servers():
    servers = [server("a", 0, 30), server("b", 0, 30, state="joining"), server("c", 0, 30)]
    assert spans(choose_chain(servers, 0, 30, exclude={"a"})) == [("c", 0, 30)]
    assert spans(choose_chain(servers, 10, 20, exclude={"a"})) == [("c", 10, 20)]


def test_no_route_names_the_missing_span():
    servers = [server("a", 0, 10), server("c", 20, 30)]
    with pytest.raises(NoRoute, match=r"\[10, 20\)") as caught:
        choose_chain(servers, 0, 30)
    assert (caught.value.start, caught.value.end) == (10, 20)
    with pytest.raises(NoRoute):
        choose_chain([], 0, 30)


def test_deterministic():
    servers = [server(f"s{i}", 0, 30) for i in range(5)]
    assert len({spans(choose_chain(servers, 0, 30))[0] for _ in range(5)}) == 1

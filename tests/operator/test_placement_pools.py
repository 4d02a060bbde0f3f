"""Placement over heterogeneous pools: invariants as properties (hypothesis), and the equal-server wrapper."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmswarm_control.placement import (
    GIB,
    BlockCost,
    Placement,
    PlacementError,
    Pool,
    Span,
    best_window,
    estimate_block_bytes,
    kv_cache_bytes_per_token,
    llama_block_params,
    place,
    place_spans,
    pool_capacity,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Pool], int, BlockCost]:
    num_blocks = draw(st.integers(1, 40))
    cost = BlockCost(draw(st.integers(0, 4)) * 100, draw(st.integers(0, 2)) * 50)
    pools = []
    for index in range(draw(st.integers(1, 3))):
        low = draw(st.integers(0, 4))
        high = draw(st.one_of(st.none(), st.integers(low, low + 4)))
        pools.append(Pool(
            name=f"p{index}",
            memory_bytes=draw(st.one_of(st.none(), st.integers(0, 45).map(lambda n: n * 50))),
            speed=draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 7.0])),
            min_servers=low,
            max_servers=high,
            blocks_per_server=draw(st.one_of(st.none(), st.integers(1, num_blocks))),
        ))
    return num_blocks, pools, draw(st.integers(1, 3)), cost


def _coverage(placement: Placement) -> list[int]:
    counts = [0] * placement.num_blocks
    for server in placement.servers:
        for block in range(server.span.start, server.span.end):
            counts[block] += 1
    return counts


@FAST
@given(scenarios())
def test_spans_fit_memory_and_pool_limits(scenario: tuple[int, list[Pool], int, BlockCost]) -> None:
    num_blocks, pools, redundancy, cost = scenario
    placement = place(num_blocks, pools, redundancy, cost)
    by_name = {p.name: p for p in pools}
    for server in placement.servers:
        pool = by_name[server.pool]
        assert 0 <= server.span.start < server.span.end <= num_blocks
        if pool.memory_bytes is not None:
            assert len(server.span) * cost.total <= pool.memory_bytes
        if pool.blocks_per_server is not None:
            assert len(server.span) == min(pool.blocks_per_server, placement.capacity[pool.name])
    for pool in pools:
        assert placement.count(pool.name) <= pool.limit
        if placement.capacity[pool.name] > 0:
            assert placement.count(pool.name) >= pool.min_servers
        else:
            assert placement.count(pool.name) == 0


@FAST
@given(scenarios())
def test_the_report_tells_the_truth(scenario: tuple[int, list[Pool], int, BlockCost]) -> None:
    num_blocks, pools, redundancy, cost = scenario
    placement = place(num_blocks, pools, redundancy, cost)
    coverage = _coverage(placement)
    assert list(placement.coverage) == coverage
    short = [b for b, c in enumerate(coverage) if c < redundancy]
    assert placement.short_blocks == short
    assert placement.feasible == (not short)
    assert placement.missing_bytes == sum(max(0, redundancy - c) for c in coverage) * cost.total
    if short:
        assert placement.message and "have fewer than" in placement.message
    else:
        assert placement.message == ""


@FAST
@given(scenarios())
def test_deterministic(scenario: tuple[int, list[Pool], int, BlockCost]) -> None:
    num_blocks, pools, redundancy, cost = scenario
    assert place(num_blocks, pools, redundancy, cost) == place(num_blocks, list(pools), redundancy, cost)


@FAST
@given(scenarios())
def test_enough_capacity_for_one_copy_always_covers(scenario: tuple[int, list[Pool], int, BlockCost]) -> None:
    """With redundancy 1, the pools cover the model whenever their servers can hold it in total."""
    num_blocks, pools, _, cost = scenario
    placement = place(num_blocks, pools, 1, cost)
    total = sum(pool.limit * pool_capacity(pool, num_blocks, cost) for pool in pools)
    assert placement.feasible == (total >= num_blocks)


@FAST
@given(st.integers(1, 40), st.integers(1, 30), st.integers(1, 4), st.integers(1, 40))
def test_equal_servers_reach_any_redundancy_with_enough_servers(num_blocks: int, cap: int, redundancy: int, extra: int) -> None:
    cap = min(cap, num_blocks)
    needed = redundancy * math.ceil(num_blocks / cap)
    pool = Pool("gpu", memory_bytes=cap * 10, min_servers=1, max_servers=needed + extra % 3)
    placement = place(num_blocks, [pool], redundancy, BlockCost(10))
    assert placement.feasible
    assert min(placement.coverage) >= redundancy


@FAST
@given(scenarios())
def test_faster_servers_take_proportionally_longer_spans(scenario: tuple[int, list[Pool], int, BlockCost]) -> None:
    """Among servers whose span is neither fixed nor cut by memory, length / speed is the same up to rounding."""
    num_blocks, pools, redundancy, cost = scenario
    placement = place(num_blocks, pools, redundancy, cost)
    by_name = {p.name: p for p in pools}
    free = [
        (len(s.span), by_name[s.pool].speed) for s in placement.servers
        if by_name[s.pool].blocks_per_server is None and len(s.span) < placement.capacity[s.pool]
    ]
    for length_a, speed_a in free:
        for length_b, speed_b in free:
            if speed_a > speed_b:
                assert length_a >= length_b
            assert abs(length_a / speed_a - length_b / speed_b) < max(1 / speed_a, 1 / speed_b) + 1e-9


def test_heterogeneous_pools_balance_time_per_step() -> None:
    """A100s three times as fast as T4s get spans three times as long."""
    cost = BlockCost(weight_bytes=GIB, cache_bytes=0)
    a100 = Pool("a100", memory_bytes=80 * GIB, speed=3, min_servers=2)
    t4 = Pool("t4", memory_bytes=16 * GIB, speed=1, min_servers=4)
    placement = place(80, [a100, t4], 1, cost)
    assert placement.feasible
    lengths = {(s.pool, len(s.span)) for s in placement.servers}
    assert lengths == {("a100", 24), ("t4", 8)}


def test_servers_are_added_up_to_max_to_reach_redundancy() -> None:
    pool = Pool("gpu", memory_bytes=10 * GIB, min_servers=1, max_servers=10)
    placement = place(30, [pool], 2, BlockCost(GIB))
    assert placement.feasible and placement.count("gpu") == 6
    assert all(len(s.span) == 10 for s in placement.servers)


def test_too_small_pools_say_which_blocks_and_how_much_memory() -> None:
    cost = BlockCost(weight_bytes=GIB, cache_bytes=GIB // 4)
    pools = [Pool("big", memory_bytes=40 * GIB, min_servers=1), Pool("tiny", memory_bytes=GIB, min_servers=2, max_servers=3)]
    placement = place(80, pools, 1, cost)
    assert not placement.feasible
    assert placement.count("tiny") == 0  # cannot hold one block: not placed
    assert placement.short_blocks == list(range(32, 80))
    assert placement.missing_bytes == 48 * cost.total
    assert "blocks [32, 80) have fewer than 1 servers" in placement.message
    assert "60.0 GiB of server memory" in placement.message
    assert "pool tiny: one server (1.0 GiB usable) cannot hold a single block" in placement.message


def test_invalid_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        place(10, [Pool("a"), Pool("a")])
    with pytest.raises(ValueError):
        place(0, [Pool("a")])
    with pytest.raises(ValueError, match="max_servers"):
        Pool("a", min_servers=3, max_servers=2)
    with pytest.raises(ValueError, match="speed"):
        Pool("a", speed=0)


# ---- place_spans: the local substrate's equal servers, same behaviour as before pools existed ----------------------


def legacy_place_spans(num_blocks: int, servers: int | None, redundancy: int, blocks_per_server: int | None) -> list[Span]:
    """The equal-server placement as it was before pools (the reference for the wrapper)."""
    if blocks_per_server is None:
        assert servers is not None
        blocks_per_server = min(num_blocks, math.ceil(redundancy * num_blocks / servers))
    if servers is None:
        servers = redundancy * math.ceil(num_blocks / blocks_per_server)
    coverage = [0] * num_blocks
    spans = []
    for _ in range(servers):
        start = best_window(coverage, blocks_per_server)
        for block in range(start, start + blocks_per_server):
            coverage[block] += 1
        spans.append(Span(start, start + blocks_per_server))
    if any(c < redundancy for c in coverage):
        raise PlacementError("short", [b for b, c in enumerate(coverage) if c < redundancy])
    return spans


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 32), st.one_of(st.none(), st.integers(1, 10)), st.integers(1, 3), st.one_of(st.none(), st.integers(1, 32)))
def test_place_spans_matches_the_equal_server_reference(num_blocks: int, servers: int | None, redundancy: int,
                                                        blocks_per_server: int | None) -> None:
    if servers is None and blocks_per_server is None:
        servers = 3
    if blocks_per_server is not None and blocks_per_server > num_blocks:
        with pytest.raises(ValueError, match="blocks_per_server"):
            place_spans(num_blocks, servers, redundancy, blocks_per_server)
        return
    try:
        expected = legacy_place_spans(num_blocks, servers, redundancy, blocks_per_server)
    except PlacementError as error:
        with pytest.raises(PlacementError) as raised:
            place_spans(num_blocks, servers, redundancy, blocks_per_server)
        assert raised.value.uncovered == error.uncovered
        return
    assert place_spans(num_blocks, servers, redundancy, blocks_per_server) == expected


def test_place_spans_examples_and_messages() -> None:
    assert [str(s) for s in place_spans(30, 3)] == ["0:10", "10:20", "20:30"]
    assert [str(s) for s in place_spans(30, blocks_per_server=15, redundancy=2)] == ["0:15", "15:30", "0:15", "15:30"]
    with pytest.raises(PlacementError, match=r"1 servers of 30 blocks cannot hold 30 blocks 2 times: blocks \[0, 30\)") as raised:
        place_spans(30, 1, redundancy=2)
    assert raised.value.uncovered == list(range(30))
    with pytest.raises(ValueError, match="give servers"):
        place_spans(30)


# ---- estimates ---------------------------------------------------------------------------------------------------


def test_block_size_estimates() -> None:
    params = llama_block_params(8192, 28672, 64, 8)  # Llama 2/3 70B
    assert params == 855_654_400
    fp16 = estimate_block_bytes(params, 8192, "float16")
    int8 = estimate_block_bytes(params, 8192, "bfloat16", "int8")
    nf4 = estimate_block_bytes(params, 8192, "bfloat16", "nf4")
    assert fp16 == 2 * params
    assert 1.0 <= int8 / params < 1.01  # ~1 byte per parameter
    assert 0.5 < nf4 / params < 0.57  # ~half a byte plus block-wise scales
    assert estimate_block_bytes(params, 8192, "float32") == 4 * params
    assert kv_cache_bytes_per_token(8, 128, "bfloat16") == 4096
    smollm2 = llama_block_params(576, 1536, 9, 3)
    assert smollm2 * 30 == 106_202_880  # 135M minus embeddings (49152 x 576) and the final norm
    with pytest.raises(ValueError, match="quantization"):
        estimate_block_bytes(params, 8192, "float16", "int4")

"""The scheduler's policy (batch_policy.py) with named fakes: which pending work shares the next pass."""

from __future__ import annotations

from dataclasses import dataclass

from llmswarm_node.batch_policy import (
    DECODE_TOKENS,
    BatchOptions,
    companion_deadline,
    companions_here,
    decode_group,
    forward_group,
    next_pass,
    runs_inline,
    threads_for,
)

OPTIONS = BatchOptions(max_batch_rows=8, max_batch_tokens=64, batch_wait=0.01, prefill_chunk=16)


@dataclass
class FakeStep:
    name: str
    rows: int = 1
    new_tokens: int = 1
    blocks: tuple[int, int] = (0, 10)
    adapter: str | None = None
    batchable: bool = True
    enqueued: float = 0.0

    @property
    def key(self) -> tuple[int, int, int, str | None]:
        return (*self.blocks, self.new_tokens, self.adapter)


@dataclass
class FakeForward:
    name: str
    rows: int = 1
    new_tokens: int = 8
    key: tuple[object, ...] = ("forward", 0, 10)


def names(items) -> list[str]:
    return [item.name for item in items]


def test_decode_steps_with_the_oldest_ones_key_share_a_pass():
    steps = [FakeStep("a"), FakeStep("b", new_tokens=2), FakeStep("c"), FakeStep("d", blocks=(0, 5)),
             FakeStep("e", adapter="lora"), FakeStep("f", rows=3)]
    assert names(decode_group(steps, OPTIONS)) == ["a", "c", "f"]
    assert names(decode_group(steps[1:], OPTIONS)) == ["b"]  # the oldest step's key decides
    assert decode_group([], OPTIONS) == []


def test_a_decode_group_stays_within_the_row_and_token_limits():
    steps = [FakeStep("a", rows=5), FakeStep("b", rows=4), FakeStep("c", rows=3)]
    assert names(decode_group(steps, OPTIONS)) == ["a", "c"]  # b would make 9 rows, c fits after a
    wide = BatchOptions(max_batch_rows=100, max_batch_tokens=40, prefill_chunk=16)
    steps = [FakeStep(n, rows=2, new_tokens=8) for n in "abcd"]
    assert names(decode_group(steps, wide)) == ["a", "b"]  # 16 tokens each: a third would make 48 > 40
    alone = [FakeStep("big", rows=20)]
    assert names(decode_group(alone, OPTIONS)) == ["big"]  # the oldest step always runs, even over the limits


def test_a_step_that_cannot_share_runs_alone():
    first_alone = [FakeStep("p", batchable=False), FakeStep("a"), FakeStep("b")]
    assert names(decode_group(first_alone, OPTIONS)) == ["p"]
    later = [FakeStep("a"), FakeStep("p", batchable=False), FakeStep("b")]
    assert names(decode_group(later, OPTIONS)) == ["a", "b"]  # it waits for a pass of its own


def test_long_steps_advance_by_chunks_and_bulk_work_waits_for_inference():
    long = FakeStep("long", new_tokens=100)
    forwards = [FakeForward("f1")]
    plan = next_pass([long, FakeStep("a")], forwards, OPTIONS)
    assert names(plan.decode) == ["a"] and plan.chunk is long and plan.forwards == []
    plan = next_pass([long], forwards, OPTIONS)
    assert plan.decode == [] and plan.chunk is long and plan.forwards == []
    plan = next_pass([FakeStep("a")], forwards, OPTIONS)
    assert names(plan.decode) == ["a"] and plan.chunk is None and plan.forwards == []
    plan = next_pass([], forwards, OPTIONS)
    assert plan.decode == [] and plan.chunk is None and names(plan.forwards) == ["f1"]
    assert next_pass([FakeStep("edge", new_tokens=16)], [], OPTIONS).chunk is None  # prefill_chunk tokens: one pass


def test_forwards_of_one_key_are_stacked_within_the_token_limit():
    forwards = [FakeForward("a", rows=2), FakeForward("b", key=("other",)), FakeForward("c", rows=4),
                FakeForward("d", rows=2), FakeForward("e", rows=1)]
    assert names(forward_group(forwards, OPTIONS)) == ["a", "c", "d"]  # 16 + 32 + 16 tokens; e would pass 64
    assert names(forward_group([FakeForward("huge", rows=100)], OPTIONS)) == ["huge"]
    assert forward_group([], OPTIONS) == []


def test_a_step_waits_for_companions_only_while_they_are_due():
    steps = [FakeStep("a", enqueued=5.0), FakeStep("long", new_tokens=100, enqueued=1.0)]
    assert companion_deadline(steps, OPTIONS) == 5.0 + OPTIONS.batch_wait
    assert companion_deadline([FakeStep("long", new_tokens=100)], OPTIONS) is None
    assert not companions_here(steps, OPTIONS, due=2)  # one small step here, two sessions due
    assert companions_here(steps, OPTIONS, due=1)
    assert companions_here([FakeStep("a"), FakeStep("b")], OPTIONS, due=2)
    assert companions_here([FakeStep("a", rows=8)], OPTIONS, due=5)  # a full pass of rows goes at once


def test_only_a_tiny_step_with_nobody_due_runs_inline():
    asked: list[int] = []

    def due(sessions: int):
        def count() -> int:
            asked.append(sessions)
            return sessions
        return count

    assert runs_inline(FakeStep("a"), idle=True, due=due(1))
    assert not runs_inline(FakeStep("a"), idle=True, due=due(2))
    assert not runs_inline(FakeStep("a"), idle=False, due=due(0))
    assert not runs_inline(FakeStep("a", rows=DECODE_TOKENS + 1), idle=True, due=due(0))
    assert not runs_inline(FakeStep("a", new_tokens=DECODE_TOKENS + 1), idle=True, due=due(0))
    assert asked == [1, 2]  # sessions are counted only when the rest allows running inline


def test_decode_passes_get_the_decode_threads():
    options = BatchOptions(decode_threads=1)
    assert threads_for(DECODE_TOKENS, options, bulk_threads=8) == 1
    assert threads_for(DECODE_TOKENS + 1, options, bulk_threads=8) == 8
    assert threads_for(1, BatchOptions(decode_threads=0), bulk_threads=8) == 8

"""Coalescer: the work of threads that call at once runs in one call, and groups may overlap."""

from __future__ import annotations

import threading
import time

import pytest

from llmswarm.coalesce import Coalescer


def doubled(works: list[int]) -> list[int | BaseException]:
    return [ValueError(f"bad {w}") if w < 0 else 2 * w for w in works]


def in_threads(coalescer: Coalescer, works: list[int], companions: int) -> dict[int, object]:
    results: dict[int, object] = {}
    start = threading.Barrier(len(works))

    def call(work: int) -> None:
        start.wait()
        try:
            results[work] = coalescer(work, companions)
        except ValueError as error:
            results[work] = error

    threads = [threading.Thread(target=call, args=(w,)) for w in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_lone_threads_error_is_raised_not_returned():
    coalescer = Coalescer(doubled, key=lambda w: 0)
    with pytest.raises(ValueError, match="bad -1"):
        coalescer(-1, companions=1)


def test_a_lone_thread_runs_at_once():
    coalescer = Coalescer(doubled, key=lambda w: 0, max_wait=10.0)
    began = time.monotonic()
    assert coalescer(4, companions=1) == 8
    assert time.monotonic() - began < 5.0  # did not wait max_wait
    assert coalescer.calls == 1


def test_threads_that_call_together_share_one_call_and_get_their_own_results():
    coalescer = Coalescer(doubled, key=lambda w: 0, max_wait=10.0)
    results = in_threads(coalescer, list(range(1, 9)), companions=8)
    assert results == {w: 2 * w for w in range(1, 9)}
    assert coalescer.calls == 1 and coalescer.works == 8


def test_an_error_for_one_work_reaches_only_its_thread():
    coalescer = Coalescer(doubled, key=lambda w: 0, max_wait=10.0)
    results = in_threads(coalescer, [1, -2, 3], companions=3)
    assert results[1] == 2 and results[3] == 6
    assert isinstance(results[-2], ValueError)


def test_works_of_different_keys_run_in_separate_calls():
    calls: list[list[int]] = []

    def run_many(works: list[int]) -> list[int]:
        calls.append(sorted(works))
        return works

    coalescer = Coalescer(run_many, key=lambda w: w % 2, max_wait=10.0)
    in_threads(coalescer, [1, 2, 3, 4], companions=4)
    assert sorted(calls) == [[1, 3], [2, 4]]


@pytest.mark.parametrize("max_wait", [10.0])
def test_a_new_group_forms_while_one_runs_and_does_not_wait_for_it(max_wait):
    """Threads in a running call cannot join: the next group waits only for the others."""
    release = threading.Event()
    calls: list[list[int]] = []

    def run_many(works: list[int]) -> list[int]:
        calls.append(sorted(works))
        if 1 in works:
            assert release.wait(30)
        return works

    coalescer = Coalescer(run_many, key=lambda w: 0, max_wait=max_wait)
    first = threading.Thread(target=coalescer, args=(1, 2))  # 2 companions: waits up to max_wait for one more
    second = threading.Thread(target=coalescer, args=(2, 2))
    first.start()
    second.start()
    deadline = time.monotonic() + 20
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [[1, 2]]  # both arrived: one call
    began = time.monotonic()
    assert coalescer(3, companions=3) == 3  # 2 of 3 companions are in the running call: no wait
    assert time.monotonic() - began < max_wait / 2
    release.set()
    first.join()
    second.join()
    assert calls == [[1, 2], [3]]


def test_a_stalled_companion_costs_one_long_wait_per_retry_period():
    """A thread counted as a companion that never comes: the others wait max_wait once, then briefly for a while."""
    coalescer = Coalescer(doubled, key=lambda w: 0, max_wait=0.2, short_wait=0.001, retry_after=16)
    for work in range(40):
        assert coalescer(work, companions=2) == 2 * work  # the second companion is stalled
    assert coalescer.long_waits_unfilled == 3  # calls 1, 18 and 35; the 16 calls after each wait briefly
    assert coalescer.calls == 40


def test_a_full_group_restores_the_long_wait():
    # Windows of seconds: two threads started together meet within them even on a loaded machine.
    coalescer = Coalescer(doubled, key=lambda w: 0, max_wait=2.0, short_wait=1.5, retry_after=16)
    assert coalescer(1, companions=2) == 2  # alone: the long wait runs out
    assert coalescer.long_waits_unfilled == 1
    assert in_threads(coalescer, [2, 3], companions=2) == {2: 4, 3: 6}  # both come within the short wait
    assert coalescer.calls == 2
    assert coalescer(4, companions=2) == 8  # back to the long wait, which runs out again
    assert coalescer.long_waits_unfilled == 2

"""The scheduler's policy: which pending work goes through the span next, as pure functions.

Each round the compute thread (scheduler.py) asks :func:`next_pass` what to run:

1. Decode: the oldest pending small step (at most ``prefill_chunk`` new tokens) and every
   pending step with the same blocks and token count go through the span in one pass
   (batching.py), up to ``max_batch_rows`` rows and ``max_batch_tokens`` tokens. A step
   waits at most ``batch_wait`` seconds for companions (:func:`companion_deadline`), and
   only for sessions that are in the middle of a generation and due (their steps keep
   coming at a measured pace, :func:`companions_here`): a lone client, or one beside idle
   sessions, never waits. Sessions that generate together thus fall into step and share
   every pass, instead of splitting into small staggered groups.
2. Prefill: one chunk of ``prefill_chunk`` tokens of the oldest long step, so a long prompt
   advances every round without stalling the decode steps of others.
3. Bulk: only when no inference work is pending, stateless forwards of the same shape and
   blocks are stacked along the batch and run together (a backward always runs alone).

A lone decode step (nothing pending, nothing running, no other session due) runs at once
on the event loop's thread instead (:func:`runs_inline`): no companion could join it, and
the two thread hand-offs it saves (to the compute thread and back) are a measurable part
of a hop.

Nothing here touches a thread, a clock or the span: the work items are anything with the
few properties the policy reads (:class:`PendingStep`, :class:`PendingForward`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

DECODE_TOKENS = 4  # a pass this small is bound by reading weights: more threads only add wake-up latency


@dataclass(frozen=True)
class BatchOptions:
    max_batch_rows: int = 32  # rows (sessions x their batch) in one decode pass
    max_batch_tokens: int = 4096  # tokens in one pass
    # Seconds a step may wait for companions that are due. The steps of 32 sessions reach a server over 32
    # connections, pushed one after another by the server before it: with 8 ms, 32 sessions' decode passes held
    # 20 rows on average (151 passes for 33 rounds of 3 hops); with 25 ms, 27.7 (111 passes), and 32 sessions
    # ran at 120.7 tok/s instead of 85.3 (bench/concurrency.py's setting, the client's decode loop).
    batch_wait: float = 0.025
    prefill_chunk: int = 256  # tokens of a long step per round
    threads: int = 0  # torch threads for prefill and bulk work (0: torch's default)
    decode_threads: int = 1  # torch threads for passes of at most DECODE_TOKENS tokens (0: same as threads)


class PendingStep(Protocol):
    """A session's step waiting for the span."""

    @property
    def enqueued(self) -> float: ...  # when it was queued (time.monotonic)

    @property
    def rows(self) -> int: ...

    @property
    def new_tokens(self) -> int: ...  # all of the step's new tokens (a long one runs in chunks)

    @property
    def key(self) -> Hashable: ...  # steps with equal keys may share a pass

    @property
    def batchable(self) -> bool: ...  # may share a pass at all (False: deep prompts, or a cache that cannot be stacked)


class PendingForward(Protocol):
    """Stateless work (a forward or a backward) waiting for the span."""

    @property
    def rows(self) -> int: ...

    @property
    def new_tokens(self) -> int: ...

    @property
    def key(self) -> Hashable: ...  # forwards with equal keys may be stacked along the batch


StepT = TypeVar("StepT", bound=PendingStep)
ForwardT = TypeVar("ForwardT", bound=PendingForward)


@dataclass(frozen=True)
class Pass(Generic[StepT, ForwardT]):
    """What one round runs: a decode group, a chunk of one long step, or a stacked group of forwards."""

    decode: list[StepT] = field(default_factory=list)
    chunk: StepT | None = None  # advances by one prefill chunk; stays pending until its last chunk ran
    forwards: list[ForwardT] = field(default_factory=list)


def is_small(step: PendingStep, options: BatchOptions) -> bool:
    """A step that runs in one pass (a long one runs one prefill chunk per round)."""
    return step.new_tokens <= options.prefill_chunk


def next_pass(steps: Sequence[StepT], forwards: Sequence[ForwardT], options: BatchOptions,
              step_fits: Callable[[Sequence[StepT]], bool] | None = None,
              forward_fits: Callable[[Sequence[ForwardT]], bool] | None = None) -> Pass[StepT, ForwardT]:
    """The next round's work, oldest first: inference (decode, then a prefill chunk) before bulk forwards.

    `step_fits` and `forward_fits` say whether a group's pass fits the compute memory budget: a
    companion that would take a pass past it waits for a pass of its own (the oldest item always runs;
    the scheduler splits what does not fit alone).
    """
    decode = decode_group(steps, options, step_fits)
    chunk = next((s for s in steps if not is_small(s, options)), None)
    bulk = forward_group(forwards, options, forward_fits) if not decode and chunk is None else []
    return Pass(decode, chunk, bulk)


def decode_group(steps: Sequence[StepT], options: BatchOptions,
                 fits: Callable[[Sequence[StepT]], bool] | None = None) -> list[StepT]:
    """The oldest small step and the small steps that can share its pass, within the row, token and memory limits."""
    small = [s for s in steps if is_small(s, options)]
    if not small:
        return []
    key = small[0].key
    group: list[StepT] = []
    rows = tokens = 0
    for step in small:
        if step.key != key:
            continue
        b, t = step.rows, step.new_tokens
        if group and (rows + b > options.max_batch_rows or tokens + b * t > options.max_batch_tokens
                      or not step.batchable or (fits is not None and not fits([*group, step]))):
            continue
        group.append(step)
        rows, tokens = rows + b, tokens + b * t
        if not step.batchable:
            break
    return group


def forward_group(forwards: Sequence[ForwardT], options: BatchOptions,
                  fits: Callable[[Sequence[ForwardT]], bool] | None = None) -> list[ForwardT]:
    """The oldest forward and the forwards that can be stacked with it, within the token and memory limits."""
    if not forwards:
        return []
    key = forwards[0].key
    group: list[ForwardT] = []
    tokens = 0
    for work in forwards:
        size = work.rows * work.new_tokens
        if work.key == key and (not group or (tokens + size <= options.max_batch_tokens
                                              and (fits is None or fits([*group, work])))):
            group.append(work)
            tokens += size
    return group


def companion_deadline(steps: Sequence[PendingStep], options: BatchOptions) -> float | None:
    """Until when the oldest small step may wait for companions (None: no small step is pending)."""
    small = [s for s in steps if is_small(s, options)]
    return small[0].enqueued + options.batch_wait if small else None


def companions_here(steps: Sequence[PendingStep], options: BatchOptions, due: int) -> bool:
    """Whether waiting is over: as many small steps as sessions due are pending, or a full pass of rows."""
    small = [s for s in steps if is_small(s, options)]
    return len(small) >= due or sum(s.rows for s in small) >= options.max_batch_rows


def runs_inline(step: PendingStep, idle: bool, due: Callable[[], int]) -> bool:
    """May this step run at once on the caller's thread: a tiny pass, nothing pending or running (`idle`),
    and no other session due (`due()`: sessions generating with a step due now, this one included)?"""
    if not idle or step.rows * step.new_tokens > DECODE_TOKENS:
        return False
    return due() <= 1


def threads_for(tokens: int, options: BatchOptions, bulk_threads: int) -> int:
    """Torch threads for a pass of `tokens` tokens: few for a decode pass, the bulk count otherwise."""
    decode = options.decode_threads
    return decode if decode and tokens <= DECODE_TOKENS else bulk_threads

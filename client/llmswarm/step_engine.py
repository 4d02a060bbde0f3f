"""The one engine that runs inference steps: of one session or many, pushed or not, with failover.

A step is a session's new hidden states going through blocks [start, end) of its chain
(the whole chain for a step, a replaced span's blocks for a replay). Steps run in rounds:
every step that needs its input sent to its next server is sent, then each reads one output.
So the steps of many sessions reach each server together and share a pass there.

With push, a step is sent to its first server with the rest of its chain: each server hands
its output to the next and still answers the client, which reads every hop's output in turn
(and records it for replay). A server that could not push says so, and the client sends that
input on itself, with the request id it reserved there. A group pushes only when every step in
it can, so that no server gets some steps by push and the rest later from the client.

When a server fails (connection lost, or a retryable error), its step leaves the group and goes
on alone once the group is done: the server is avoided for a while, its blocks are routed again,
the new servers are given every input the old one had (replayed through this same engine) so
they rebuild its cache, and the step goes on from there. Hops after it that may have been pushed
this step are started over the same way, so no cache ever holds a step twice; the output does
not change. The client's ``stats`` count each failover and replay (sequence_manager.SwarmClient).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from llmswarm.errors import SERVER_FAILURES, SwarmError
from llmswarm.span_chain import Recorded, SpanChain
from llmswarm.span_session import SpanSession
from llmswarm_core.wire import ProtocolError

log = logging.getLogger("llmswarm.client")


@dataclass
class Step:
    """One session's step `number` (its index among the session's steps) through blocks [start, end)."""

    chain: SpanChain
    number: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    start: int = 0
    end: int | None = None


class _Run:
    """A step on its way: the hop it is at, and what is in flight there."""

    def __init__(self, step: Step) -> None:
        self.chain, self.number = step.chain, step.number
        self.hidden, self.attention_mask, self.position_ids = step.hidden, step.attention_mask, step.position_ids
        self.at = step.start  # the block where the current hop begins
        self.end = step.chain.num_blocks if step.end is None else step.end
        self.error: Exception | None = None  # what the current hop failed with
        self._reset()

    def _reset(self) -> None:
        self.request_id: int | None = None  # the current hop's request, once its input is on its way there
        self.pushed_at: float | None = None  # when the input that the previous server pushed here was at hand
        self.pushed_to = self.at  # a step sent with a push chain may have reached every hop up to this block
        self.reserved: dict[SpanSession, int] = {}  # request ids of the hops a push chain names

    @property
    def done(self) -> bool:
        return self.at >= self.end

    @property
    def waiting(self) -> bool:
        """Whether the current hop's input is on its way (sent, or pushed by the previous server)."""
        return self.request_id is not None

    def _later(self, span: SpanSession) -> list[SpanSession]:
        return self.chain.spans_in(span.end, self.end)

    def can_push(self) -> bool:
        span = self.chain.span_at(self.at)
        return self.chain.can_push(self._later(span)) and self.chain.prompts_for(span, self.number) is None

    def send(self, push: bool) -> None:
        """Send the current hop its input; with `push`, the rest of the range goes with it where it can."""
        span = self.chain.span_at(self.at)
        target = None
        if push and self.can_push():
            for later in reversed(self._later(span)):
                if later not in self.reserved:
                    self.reserved[later] = later.reserve_request()
                target = later.push_target(self.reserved[later], target)
            self.pushed_to = self.end
        self.request_id = span.send_step(self.hidden, self.attention_mask, self.position_ids, target,
                                         self.reserved.pop(span, None), self.chain.prompts_for(span, self.number))
        self.pushed_at = None

    def receive(self) -> None:
        """Read the current hop's output, record its input, and move to the next hop."""
        span = self.chain.span_at(self.at)
        assert self.request_id is not None
        output, pushed = span.receive_output(self.request_id, self.hidden, self.pushed_at)
        self.chain.record(span, self.hidden, self.position_ids)
        self.hidden, self.at = output, span.end
        # Pushed on: the next hop's input is on its way, under the request id reserved there.
        self.request_id = self.reserved.pop(self.chain.span_at(self.at), None) if pushed and not self.done else None
        self.pushed_at = time.perf_counter() if self.request_id is not None else None

    def recover(self) -> None:
        """The current hop failed with `error`: start over the hops after it that the step may have been pushed to,
        then route its blocks again and replay their inputs there (a non-retryable error is raised instead)."""
        error, self.error = self.error, None
        assert error is not None
        failed = self.chain.span_at(self.at)
        for later in reversed(self.chain.spans_in(failed.end, self.pushed_to)):
            _replace(self.chain, later, ban=False)
        if isinstance(error, ProtocolError) and not error.retryable:
            raise error
        log.warning("server %s failed on blocks [%d, %d): %s; failing over", failed.server_id, failed.start,
                    failed.end, error)
        _replace(self.chain, failed, ban=True)
        self._reset()


def run_steps(steps: list[Step]) -> list[torch.Tensor | Exception]:
    """Each step's output (hidden states after its blocks), or the error it ended with.

    A step whose server failed finishes alone after the others (failover and replay); an error that
    is not an Exception (KeyboardInterrupt, SystemExit) is raised, never handed out as a result."""
    runs = [_Run(step) for step in steps]
    _drive(runs, push=len(runs) == 1 or all(run.can_push() for run in runs))
    results: list[torch.Tensor | Exception] = []
    for run in runs:
        try:
            while run.error is not None:
                run.recover()
                _drive([run], push=True)
        except Exception as error:  # noqa: BLE001 - this step's own result, handed to its caller
            results.append(error)
            continue
        results.append(run.hidden)
    return results


def _drive(runs: list[_Run], push: bool) -> None:
    """Run the steps in rounds until each is done or failed (its `error` set)."""
    active = [run for run in runs if not run.done]
    while active:
        for run in active:
            if not run.waiting:
                _attempt(run, partial(run.send, push))
        for run in active:
            if run.error is None:
                _attempt(run, run.receive)
        active = [run for run in active if run.error is None and not run.done]


def _attempt(run: _Run, action: Callable[[], None]) -> None:
    try:
        action()
    except SERVER_FAILURES as error:
        run.error = error


def _replace(chain: SpanChain, failed: SpanSession, ban: bool) -> None:
    """Open new sessions for `failed`'s blocks and replay its inputs there (`ban=False`: its server did not fail
    itself and may serve them again, in a new session)."""
    client = chain.client
    if ban:
        client.ban(failed.server_id)
    failed.abort()
    history = chain.inputs_of(failed)
    current = [failed]
    for attempt in range(client.config.max_retries + 1):
        spans = chain.open_spans(failed.start, failed.end, exclude=(failed.server_id,) if ban else ())
        chain.splice(current, spans)
        current = spans
        try:
            _replay(chain, failed.start, failed.end, history)
        except SERVER_FAILURES as error:
            for span in spans:
                span.close()
            if attempt == client.config.max_retries:
                raise SwarmError(f"failover of blocks [{failed.start}, {failed.end}) failed: {error}") from error
            client.backoff(attempt)
        else:
            tokens = sum(recorded.hidden.shape[0] * recorded.hidden.shape[1] for recorded in history)
            client.count(failovers=int(ban), replays=int(bool(history)), replayed_tokens=tokens)
            return


def _replay(chain: SpanChain, start: int, end: int, history: list[Recorded]) -> None:
    """Give the spans over [start, end) every input the span they replace had, step by step."""
    for number, recorded in enumerate(history):
        run = _Run(Step(chain, number, recorded.hidden, chain.masks[number], recorded.position_ids, start, end))
        _drive([run], push=True)
        if run.error is not None:
            raise run.error

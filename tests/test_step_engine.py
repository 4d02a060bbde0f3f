"""The step engine against fake servers that speak the wire protocol in process (no model, no sockets).

Each fake server's span adds to every token a multiple of the running sum of the inputs its
session has cached, so a lost, doubled or misplaced cached step changes every later output.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import torch

import llmswarm.span_session
from llmswarm.config import ClientConfig
from llmswarm.errors import SwarmError
from llmswarm.inference import InferenceSession, SessionStep, step_together
from llmswarm.sequence_manager import ClientStats, SwarmClient
from llmswarm.transport import ConnectionClosed
from llmswarm_core import wire
from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord

BLOCKS, HIDDEN = 30, 4


class FakeSession:
    def __init__(self, server: FakeServer, connection: FakeConnection, start: int, end: int) -> None:
        self.server, self.connection, self.start, self.end = server, connection, start, end
        self.total: torch.Tensor | None = None  # sum of every cached token's input
        self.position = 0

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        sums = hidden.cumsum(1) + (0 if self.total is None else self.total.unsqueeze(1))
        self.total = sums[:, -1]
        self.position += hidden.shape[1]
        return hidden + 0.01 * (self.end - self.start) * sums


def reference(inputs: list[torch.Tensor], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """What a chain over `spans` that never failed returns for each step."""
    sessions = [FakeSession(None, None, start, end) for start, end in spans]  # type: ignore[arg-type]
    outputs = []
    for hidden in inputs:
        for session in sessions:
            hidden = session.run(hidden)
        outputs.append(hidden)
    return outputs


class FakeServer:
    def __init__(self, swarm: FakeSwarm, server_id: str, start: int, end: int) -> None:
        self.swarm, self.id, self.start, self.end = swarm, server_id, start, end
        self.url = f"http://{server_id}.test:1"
        self.alive = True
        self.sessions: dict[int, FakeSession] = {}
        self.steps = 0  # steps run (sent by a client or pushed)
        self.pushed_in = 0  # steps pushed here by another server
        self.die_at_step: int | None = None  # dies when its steps reach this count, the step lost
        self.die_after_pushing_at: int | None = None  # runs and pushes on that step, then dies before replying

    def kill(self) -> None:
        self.alive = False
        for session in self.sessions.values():
            session.connection.replies.clear()

    def handle(self, connection: FakeConnection, data: bytes) -> None:
        frame = wire.decode(data)
        request = wire.parse_request(frame, ("open", "step", "close"))
        if isinstance(request, wire.OpenRequest):
            session_id = len(self.sessions) + 1
            self.sessions[session_id] = FakeSession(self, connection, request.start, request.end)
            connection.reply(wire.OpenedReply(session=session_id, push_key=f"key-of-{self.id}-{session_id:08d}",
                                              request_id=request.request_id))
        elif isinstance(request, wire.StepRequest):
            self.step(self.sessions[request.session], request.request_id, frame.tensors["hidden"], request.push)
        else:
            connection.reply(wire.ClosedReply(session=request.session, request_id=request.request_id))

    def step(self, session: FakeSession, request_id: int | None, hidden: torch.Tensor,
             push: wire.PushTarget | None) -> None:
        self.steps += 1
        if self.steps == self.die_at_step:
            self.kill()
            return
        output = session.run(hidden.float())
        pushed = push is not None and self.swarm.push(push, output)
        if self.steps == self.die_after_pushing_at:
            self.kill()
            return
        session.connection.reply(wire.OutputReply(session=1, request_id=request_id, pushed=pushed), {"hidden": output})


class FakeConnection:
    """Stands in for transport.Connection: requests go to the fake server at once, replies queue up."""

    def __init__(self, swarm: FakeSwarm, url: str, **options: object) -> None:
        self.server = swarm.servers[urlsplit(url).hostname.removesuffix(".test")]  # type: ignore[union-attr]
        if not self.server.alive:
            raise ConnectionRefusedError(f"{self.server.id} is down")
        self.replies: list[bytes] = []
        self.closed = False

    def reply(self, reply: wire.Reply | wire.ErrorReply, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.replies.append(wire.reply_frame(reply, tensors))

    def send(self, message: bytes) -> None:
        if self.closed or not self.server.alive:
            raise ConnectionClosed("the server closed the connection")
        self.server.handle(self, message)

    def recv(self, timeout: float) -> bytes:
        if self.replies and not self.closed:
            return self.replies.pop(0)
        if self.closed or not self.server.alive:
            raise ConnectionClosed("the server closed the connection")
        raise TimeoutError("no reply from the server in time")

    def close(self) -> None:
        self.closed = True


class FakeSwarm:
    def __init__(self, spans: dict[str, tuple[int, int]]) -> None:
        self.servers = {server_id: FakeServer(self, server_id, start, end) for server_id, (start, end) in spans.items()}

    def routes(self) -> RouteMap:
        return RouteMap(model=ModelInfo(name="fake", num_blocks=BLOCKS, hidden_size=HIDDEN), version=1, servers=[
            ServerRecord(id=s.id, url=s.url, start=s.start, end=s.end, state="online", throughput=1.0)
            for s in self.servers.values()])

    def push(self, target: wire.PushTarget, hidden: torch.Tensor) -> bool:
        server = next(s for s in self.servers.values() if s.url == target.url)
        if not server.alive:
            return False
        session = server.sessions[target.session]
        assert target.key == f"key-of-{server.id}-{target.session:08d}" and target.position == session.position
        server.pushed_in += 1
        server.step(session, target.request_id, hidden, target.push)
        return True


class FakeClient(SwarmClient):
    def __init__(self, swarm: FakeSwarm, config: ClientConfig) -> None:
        super().__init__("http://route-map.test:1", config)
        self.swarm = swarm
        self.interrupt_on_chain = False

    def routes(self, refresh: bool = False) -> RouteMap:
        return self.swarm.routes()

    def rtt(self, server_id: str, url: str) -> float:
        return {"a": 0.001, "b": 0.001, "c": 0.001}.get(server_id, 0.002)  # a, b, c first while they serve

    def chain(self, start: int, end: int, exclude: object = ()) -> list:  # type: ignore[override]
        if self.interrupt_on_chain:
            raise KeyboardInterrupt
        return super().chain(start, end, exclude)  # type: ignore[arg-type]


@pytest.fixture
def swarm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSwarm]:
    """Servers a, b, c over [0, 10), [10, 20), [20, 30), and spares a2, b2, c2 for the same spans."""
    fake = FakeSwarm({"a": (0, 10), "b": (10, 20), "c": (20, 30), "a2": (0, 10), "b2": (10, 20), "c2": (20, 30)})
    monkeypatch.setattr(llmswarm.span_session, "Connection", lambda url, **options: FakeConnection(fake, url, **options))
    yield fake


SPANS = [(0, 10), (10, 20), (20, 30)]


def client_of(swarm: FakeSwarm, **config: object) -> FakeClient:
    return FakeClient(swarm, ClientConfig(**{"backoff_base": 0.001, "max_retries": 2, **config}))  # type: ignore[arg-type]


def inputs(seed: int, prompt: int = 5, steps: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, prompt if i == 0 else 1, HIDDEN, generator=generator) for i in range(steps)]


def assert_steps(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("push", [True, False])
def test_a_session_alone_and_sessions_together_get_the_outputs_of_an_unbroken_chain(swarm, push):
    client = client_of(swarm, push=push)
    steps = [inputs(1), inputs(2), inputs(3)]
    alone = InferenceSession(client, BLOCKS, max_length=32)
    assert [hop[0] for hop in alone.chain] == ["a", "b", "c"]
    assert_steps([alone.step(h) for h in steps[0]], reference(steps[0], SPANS))
    together = [InferenceSession(client, BLOCKS, max_length=32) for _ in steps]
    outputs: list[list[torch.Tensor]] = [[] for _ in steps]
    for n in range(len(steps[0])):
        for out, result in zip(outputs, step_together([SessionStep(s, h[n]) for s, h in zip(together, steps, strict=True)]),
                               strict=True):
            assert isinstance(result, torch.Tensor)
            out.append(result)
    for out, h in zip(outputs, steps, strict=True):
        assert_steps(out, reference(h, SPANS))
    assert all(s.position == 5 + 5 for s in together)
    # with push, the client sends only to the first server: b and c get every step by push
    assert swarm.servers["b"].pushed_in == (4 * 6 if push else 0) and swarm.servers["c"].pushed_in == (4 * 6 if push else 0)


@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("failure", ["die_at_step", "die_after_pushing_at"])
def test_a_failed_server_is_replaced_and_its_inputs_replayed_without_changing_the_output(swarm, push, failure):
    client = client_of(swarm, push=push)
    steps = [inputs(4), inputs(5)]
    sessions = [InferenceSession(client, BLOCKS, max_length=32) for _ in steps]
    setattr(swarm.servers["b"], failure, 2 * 3 + 1)  # b fails on the first session's fourth step
    outputs: list[list[torch.Tensor]] = [[] for _ in steps]
    for n in range(len(steps[0])):
        results = step_together([SessionStep(s, h[n]) for s, h in zip(sessions, steps, strict=True)])
        for out, result in zip(outputs, results, strict=True):
            assert isinstance(result, torch.Tensor), result
            out.append(result)
    for out, h in zip(outputs, steps, strict=True):
        assert_steps(out, reference(h, SPANS))
    assert not swarm.servers["b"].alive and "b" in client.banned()
    assert all([hop[0] for hop in s.chain][:2] == ["a", "b2"] for s in sessions)
    assert swarm.servers["b2"].steps >= 2 * 3  # every step b had seen was given to b2 again
    # Both sessions lost b after 3 steps (7 tokens each); with push, each restarted c too (b may have pushed to it).
    replays = 2 * 2 if push else 2
    assert client.stats == ClientStats(failovers=2, replays=replays, replayed_tokens=7 * replays, bans=1)


def test_a_lone_session_fails_over_with_push(swarm):
    client = client_of(swarm)
    steps = inputs(6, steps=8)
    session = InferenceSession(client, BLOCKS, max_length=32)
    swarm.servers["b"].die_after_pushing_at = 5  # c already holds that step when b dies: c must start over too
    assert_steps([session.step(h) for h in steps], reference(steps, SPANS))
    assert [hop[0] for hop in session.chain][:2] == ["a", "b2"]


def test_the_client_counts_failovers_replays_and_bans(swarm):
    client = client_of(swarm)
    assert client.stats == ClientStats()
    steps = inputs(13, steps=8)
    session = InferenceSession(client, BLOCKS, max_length=32)
    swarm.servers["c"].die_at_step = 6  # the last hop dies on the sixth step: steps 0-4 (5 + 4 tokens) are replayed
    assert_steps([session.step(h) for h in steps], reference(steps, SPANS))
    assert client.stats == ClientStats(failovers=1, replays=1, replayed_tokens=9, bans=1)
    client.ban("b2", 5.0)  # busy, not failed: not a ban for failing
    client.ban("c")  # still banned: not counted again
    assert client.stats.bans == 1
    swarm.servers["a"].die_at_step = swarm.servers["a"].steps + 1  # the first hop dies on a new session's first step:
    # nothing to replay there, but the hops after it that the step may have been pushed to start over (empty too)
    fresh = InferenceSession(client, BLOCKS, max_length=32)
    assert_steps([fresh.step(h) for h in steps[:2]], reference(steps[:2], SPANS))
    assert client.stats == ClientStats(failovers=2, replays=1, replayed_tokens=9, bans=2)


def test_an_error_that_is_not_retried_is_that_sessions_result_and_the_others_go_on(swarm):
    client = client_of(swarm)
    steps = [inputs(7), inputs(8)]
    sessions = [InferenceSession(client, BLOCKS, max_length=32) for _ in steps]
    sessions[1].close()
    results = step_together([SessionStep(s, h[0]) for s, h in zip(sessions, steps, strict=True)])
    assert isinstance(results[1], SwarmError) and "closed" in str(results[1])
    assert_steps([results[0]], reference(steps[0][:1], SPANS))  # type: ignore[list-item]


def test_no_server_left_for_a_span_is_that_sessions_swarm_error(swarm):
    client = client_of(swarm, max_retries=0)
    steps = [inputs(9), inputs(10)]
    sessions = [InferenceSession(client, BLOCKS, max_length=32) for _ in steps]
    swarm.servers["b2"].kill()
    swarm.servers["b"].kill()  # no server has blocks [10, 20) left
    results = step_together([SessionStep(s, h[0]) for s, h in zip(sessions, steps, strict=True)])
    assert isinstance(results[0], SwarmError) and isinstance(results[1], SwarmError)
    assert "blocks [10, 20)" in str(results[1])


@pytest.mark.parametrize("push", [True, False])
def test_ctrl_c_during_one_sessions_failover_is_raised_not_handed_out_as_its_result(swarm, push):
    """A KeyboardInterrupt while a session fails over must stop the caller, not become that session's result."""
    client = client_of(swarm, push=push)
    steps = [inputs(11), inputs(12)]
    sessions = [InferenceSession(client, BLOCKS, max_length=32) for _ in steps]
    step_together([SessionStep(s, h[0]) for s, h in zip(sessions, steps, strict=True)])
    sessions[1].spans[1].abort()  # its connection to b breaks: it fails over, and routing is interrupted
    client.interrupt_on_chain = True
    with pytest.raises(KeyboardInterrupt):
        step_together([SessionStep(s, h[1]) for s, h in zip(sessions, steps, strict=True)])

"""Servers die mid-decode; clients fail over, replay the lost hop's inputs, and their outputs do not change.

Every kill is made by a generate() streamer (`KillMidDecode`), whose `put` transformers calls in the generating
thread with each new token before the next step runs: once the prefill's token and those of at least two decode
steps are out, it SIGKILLs the server of the chosen hop of the generation's own session and waits until the process
is gone (or has another thread kill it while the generation goes on, and waits for that two tokens later).
A generation that ends with fewer than its `min_new_tokens` tokens, or a kill that was not made, fails the test:
no kill lands before the decode starts or after it ended. The client's `stats` and the servers' `/metrics`
then show that a failover and a replay happened.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
import torch
from transformers.generation.streamers import BaseStreamer

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm.errors import SwarmError
from llmswarm.inference import InferenceSession
from llmswarm.sequence_manager import ClientStats, SwarmClient
from llmswarm_core.threads import torch_threads
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids
from tests.helpers import metric_total

pytestmark = pytest.mark.integration

MAX_NEW = 24  # tokens each generation decodes (min_new_tokens too: no early stop)
SPANS = [(0, 10), (0, 10), (10, 20), (10, 20), (20, 30), (20, 30)]  # two servers for each hop: one spare
RESTART_TIMEOUT = 240.0  # seconds a restarted server may take to be listed again (2 shared cores)
KILL_TIMEOUT = 30.0  # seconds a SIGKILLed process may take to be reaped
IN_FLIGHT_WINDOW = 2  # tokens within which a kill made from another thread must have landed


@dataclass
class Kill:
    """SIGKILL the server of `hop` (an index into the session's chain at that moment) once `after` new tokens are out
    (the first comes from the prefill: `after` >= 3 means at least two decode steps ran).

    With `in_flight`, another thread kills it while the generation goes on (during a step, or between two): the
    streamer waits for that kill at token `after + IN_FLIGHT_WINDOW`, so it still lands mid-decode."""

    after: int
    hop: int
    in_flight: bool = False
    server_id: str = ""  # filled in by the kill
    span: tuple[int, int] = (0, 0)
    landed: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)
    error: BaseException | None = field(default=None, repr=False)


class KillMidDecode(BaseStreamer):
    """A generate() streamer that makes its kills at their tokens, and records the session's chain at the end."""

    def __init__(self, swarm: LocalSwarm, model: DistributedModelForCausalLM, kills: list[Kill]) -> None:
        assert all(3 <= kill.after and kill.after + IN_FLIGHT_WINDOW < MAX_NEW for kill in kills), "not mid-decode"
        self.swarm, self.model, self.kills = swarm, model, kills
        self.prompt_seen = False
        self.tokens = 0  # new tokens so far
        self.first_chain: list[tuple[str, int, int]] = []
        self.final_chain: list[tuple[str, int, int]] = []

    def put(self, value: torch.Tensor) -> None:
        session = self.model.active_session  # the one generate() opened, in this (the generating) thread
        assert session is not None, "generate() runs without an inference session"
        if not self.prompt_seen:  # transformers hands the prompt over first
            self.prompt_seen = True
            self.first_chain = session.chain
            return
        assert value.numel() == 1, "one sequence at a time"
        self.tokens += 1
        for kill in self.kills:
            if self.tokens == kill.after:
                kill.server_id, start, end = session.chain[kill.hop]
                kill.span = (start, end)
                if kill.in_flight:
                    kill.thread = threading.Thread(target=self._kill_in_thread, args=(kill,), name=f"kill-{kill.server_id}")
                    kill.thread.start()
                else:
                    self._kill(kill)
            if kill.thread is not None and self.tokens == kill.after + IN_FLIGHT_WINDOW:
                kill.thread.join(KILL_TIMEOUT)
                assert kill.landed, f"the kill of {kill.server_id} did not land within {IN_FLIGHT_WINDOW} tokens: {kill.error!r}"

    def end(self) -> None:
        session = self.model.active_session
        assert session is not None
        self.final_chain = session.chain

    def _kill(self, kill: Kill) -> None:
        index = self.swarm.index_of(kill.server_id)
        process = self.swarm.processes[index]
        assert process.poll() is None, f"server {kill.server_id} was already gone before token {kill.after}"
        self.swarm.kill(index, signal.SIGKILL)
        process.wait(KILL_TIMEOUT)
        kill.landed = True

    def _kill_in_thread(self, kill: Kill) -> None:
        try:
            self._kill(kill)
        except BaseException as error:  # noqa: BLE001 - reported by put() in the generating thread
            kill.error = error


# ---- the swarm ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm6() -> Iterator[LocalSwarm]:
    options = LocalSwarmOptions(model="smollm2", servers=6, redundancy=2, port=0, progress=False, log_dir=OUTPUT / "swarm6-logs")
    with LocalSwarm(options) as swarm:
        assert sorted((s.start, s.end) for s in swarm.routes().servers) == SPANS
        yield swarm


@pytest.fixture
def swarm(swarm6: LocalSwarm) -> LocalSwarm:
    """The module's swarm with every server up: those an earlier test killed are started again under their ids."""
    restore(swarm6)
    return swarm6


def restore(swarm: LocalSwarm) -> None:
    """Start again each server whose newest process exited, and wait until the route map lists it at its new address
    (a killed server's old record stays listed until its heartbeats are missed)."""
    assert swarm.log_dir is not None
    restarted: dict[str, str | None] = {}
    for server_id in dict.fromkeys(swarm.server_ids):
        index = swarm.index_of(server_id)
        if swarm.processes[index].poll() is None:
            continue
        restarted[server_id] = next((s.url for s in swarm.routes().servers if s.id == server_id), None)
        log_file = swarm.log_dir / f"server-{len(swarm.processes)}-{server_id}-restarted.log"
        swarm.start_server(swarm.spans[index], log_file, server_id)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while restarted:
        listed = {s.id: s for s in swarm.routes().servers if s.state == "online"}
        for server_id, old_url in list(restarted.items()):
            if server_id in listed and listed[server_id].url != old_url:
                del restarted[server_id]
            elif swarm.processes[swarm.index_of(server_id)].poll() is not None:
                raise AssertionError(f"restarted server {server_id} exited; see {swarm.log_files[swarm.index_of(server_id)]}")
        assert time.monotonic() < deadline, f"servers {sorted(restarted)} were not listed again after {RESTART_TIMEOUT:.0f} s"
        time.sleep(0.2)


def server_metrics(swarm: LocalSwarm) -> dict[str, str]:
    """Each listed, running server's /metrics text, by server id."""
    texts = {}
    for server in swarm.routes().servers:
        if swarm.processes[swarm.index_of(server.id)].poll() is None:
            texts[server.id] = requests.get(f"{server.url}/metrics", timeout=30).text
    return texts


def model_of(swarm: LocalSwarm) -> DistributedModelForCausalLM:
    """A fresh client, so that its stats count this test's failovers only."""
    return DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False,
                                                      client_config=ClientConfig(ban_seconds=30.0))


def local_generate(local: torch.nn.Module, ids: torch.Tensor, **sampling: object) -> list[list[int]]:
    """The reference: transformers on the same weights (on one thread: with the swarm's servers on the same cores,
    OpenMP threads waiting for each other make it 50 times slower)."""
    sampling = sampling or {"do_sample": False}
    with torch.no_grad(), torch_threads(1):
        return local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,  # type: ignore[attr-defined]
                              min_new_tokens=MAX_NEW, pad_token_id=0, **sampling).tolist()


def generate(model: DistributedModelForCausalLM, ids: torch.Tensor, streamer: BaseStreamer | None = None,
             **sampling: object) -> list[list[int]]:
    sampling = sampling or {"do_sample": False}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                          pad_token_id=0, streamer=streamer, **sampling).tolist()


def assert_failed_over(swarm: LocalSwarm, model: DistributedModelForCausalLM, streamer: KillMidDecode, prompt: int,
                       before: dict[str, str]) -> None:
    """Each kill was made mid-decode, its server is out of the chain and its blocks went to the spare, which was given
    the whole session again; the client counted exactly these failovers."""
    kills = streamer.kills
    assert streamer.tokens == MAX_NEW, f"{streamer.tokens} tokens streamed, not {MAX_NEW}"
    assert all(kill.landed for kill in kills), f"not every kill was made mid-decode: {kills}"
    assert len({kill.span for kill in kills}) == len(kills), "each kill is meant for a different hop"
    after = server_metrics(swarm)
    final = {(start, end): server_id for server_id, start, end in streamer.final_chain}
    for kill in kills:
        replacement = final[kill.span]
        assert replacement != kill.server_id, f"blocks {kill.span} are still on the killed server {kill.server_id}"
        assert swarm.processes[swarm.index_of(kill.server_id)].poll() is not None

        def delta(name: str, replacement: str = replacement, **labels: str) -> float:
            return metric_total(after[replacement], name, **labels) - metric_total(before[replacement], name, **labels)

        assert delta("llmswarm_requests_total", kind="open", status="ok") >= 1, f"no session opened on {replacement}"
        # Replayed: the prompt and each decoded token but the last went through the spare, not only the steps after the kill.
        tokens = delta("llmswarm_tokens_processed_total", kind="inference")
        assert tokens >= prompt + MAX_NEW - 1, f"{replacement} ran {tokens} tokens of a {prompt} + {MAX_NEW} token generation"
    stats = model.client.stats
    assert stats.failovers == len(kills) and stats.bans == len(kills), stats
    assert stats.replays >= len(kills), stats
    assert stats.replayed_tokens >= sum(prompt + kill.after - 1 for kill in kills), stats


# ---- the cases ---------------------------------------------------------------------------------------------


def test_no_server_for_a_span_is_a_clear_error(swarm):
    client = SwarmClient(swarm.url, ClientConfig(max_retries=1, backoff_base=0.05))
    for server in swarm.routes().servers:
        if server.start == 20:
            client.ban(server.id)  # as after a failure: avoided for ban_seconds
    with pytest.raises(SwarmError, match=r"blocks \[20, 30\)"):
        InferenceSession(client, 30, max_length=16)


@pytest.mark.parametrize("hop", [0, -1], ids=["first_hop", "last_hop"])
def test_a_hop_dies_mid_decode_and_the_greedy_output_does_not_change(swarm, local_smollm2, hop):
    model = model_of(swarm)
    ids = chat_ids(model.tokenizer, "Write a short poem about autumn." if hop == 0 else "Explain photosynthesis simply.")
    expected = local_generate(local_smollm2, ids)
    before = server_metrics(swarm)
    streamer = KillMidDecode(swarm, model, [Kill(after=3, hop=hop)])
    assert generate(model, ids, streamer) == expected
    assert len(streamer.first_chain) == 3 and streamer.kills[0].span == streamer.first_chain[hop][1:]
    assert_failed_over(swarm, model, streamer, ids.shape[1], before)


def test_two_hops_die_one_after_the_other_in_one_generation(swarm, local_smollm2):
    """The middle hop dies between two steps; later the last hop dies while the generation goes on."""
    model = model_of(swarm)
    ids = chat_ids(model.tokenizer, "Give three tips for learning to cook.")
    expected = local_generate(local_smollm2, ids)
    before = server_metrics(swarm)
    streamer = KillMidDecode(swarm, model, [Kill(after=3, hop=1), Kill(after=10, hop=-1, in_flight=True)])
    assert generate(model, ids, streamer) == expected
    assert_failed_over(swarm, model, streamer, ids.shape[1], before)


def test_a_seeded_sampling_run_that_fails_over_samples_the_same_tokens(swarm, local_smollm2):
    model = model_of(swarm)
    ids = chat_ids(model.tokenizer, "Describe the ocean at night.")
    sampling: dict[str, object] = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    torch.manual_seed(1234)
    undisturbed = generate(model, ids, **sampling)
    assert model.client.stats == ClientStats()
    assert undisturbed != local_generate(local_smollm2, ids), "the seed samples the greedy tokens: sampling is not tested"
    torch.manual_seed(1234)
    assert undisturbed == local_generate(local_smollm2, ids, **sampling)  # the RNG is used as by transformers alone

    before = server_metrics(swarm)
    streamer = KillMidDecode(swarm, model, [Kill(after=4, hop=1)])
    torch.manual_seed(1234)
    assert generate(model, ids, streamer, **sampling) == undisturbed
    assert_failed_over(swarm, model, streamer, ids.shape[1], before)


class Meet(KillMidDecode):
    """Waits at `barrier` once `after` new tokens are out (the barrier's action makes the kill), noting its chain then."""

    def __init__(self, swarm: LocalSwarm, model: DistributedModelForCausalLM, barrier: threading.Barrier, after: int) -> None:
        super().__init__(swarm, model, [])
        self.barrier, self.after = barrier, after
        self.chain_at_meeting: list[tuple[str, int, int]] = []

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        if self.tokens == self.after and not self.chain_at_meeting:
            session = self.model.active_session
            assert session is not None
            self.chain_at_meeting = session.chain
            self.barrier.wait(KILL_TIMEOUT * 4)


def test_two_generations_at_once_lose_their_middle_hop_at_the_same_token(swarm, local_smollm2):
    """Steps of two threads' sessions go through the swarm together; both have decoded 3 tokens when the middle hop
    they share dies (both wait for it at a barrier), and both fail over, each its own session, without changing
    their tokens."""
    model = model_of(swarm)
    inputs = [chat_ids(model.tokenizer, text) for text in ("Describe a mountain lake in spring.", "Name three kinds of clouds.")]
    expected = [local_generate(local_smollm2, ids) for ids in inputs]
    before = server_metrics(swarm)
    kill = Kill(after=3, hop=1)

    def kill_the_shared_middle_hop() -> None:
        middles = {streamer.chain_at_meeting[1] for streamer in streamers}
        assert len(middles) == 1, f"the two sessions do not share their middle hop: {middles}"
        kill.server_id, start, end = middles.pop()
        kill.span = (start, end)
        streamers[0]._kill(kill)

    barrier = threading.Barrier(2, action=kill_the_shared_middle_hop)
    streamers = [Meet(swarm, model, barrier, kill.after) for _ in inputs]
    results: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = generate(model, inputs[i], streamers[i])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RESTART_TIMEOUT)
        assert not thread.is_alive(), f"a generation did not end within {RESTART_TIMEOUT:.0f} s"
    assert not errors, errors
    assert kill.landed and [results[i] for i in range(len(inputs))] == expected
    assert all(streamer.tokens == MAX_NEW for streamer in streamers)
    replacements = {streamer.final_chain[1][0] for streamer in streamers}
    assert len(replacements) == 1 and kill.server_id not in replacements, replacements
    replacement = replacements.pop()
    after = server_metrics(swarm)

    def delta(name: str, **labels: str) -> float:
        return metric_total(after[replacement], name, **labels) - metric_total(before[replacement], name, **labels)

    assert delta("llmswarm_requests_total", kind="open", status="ok") >= 2
    assert delta("llmswarm_tokens_processed_total", kind="inference") >= sum(ids.shape[1] + MAX_NEW - 1 for ids in inputs)
    stats = model.client.stats
    assert stats.failovers == 2 and stats.bans == 1 and stats.replays >= 2, stats  # one failover per session
    assert stats.replayed_tokens >= sum(ids.shape[1] + kill.after - 1 for ids in inputs), stats


def test_a_hop_dies_under_the_decode_loops_generations(swarm, local_smollm2):
    """Three threads' plain generate() calls run in the client's decode loop (decode_loop.py), a round per token for
    all three. A server holding some of their sessions is killed mid-decode: each of its sessions fails over on its
    own, and every output still equals local transformers."""
    model = model_of(swarm)
    inputs = [chat_ids(model.tokenizer, text) for text in
              ("Describe a mountain lake in spring.", "Name three kinds of clouds.", "Why do leaves change color?")]
    expected = [local_generate(local_smollm2, ids) for ids in inputs]
    loop = model.decode_loop
    rounds = loop.rounds
    results: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = generate(model, inputs[i])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RESTART_TIMEOUT
    while loop.rounds - rounds < 4:
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), f"the generations did not get going: {errors}"
        time.sleep(0.005)
    busy = {server_id: metric_total(text, "llmswarm_active_sessions") for server_id, text in server_metrics(swarm).items()}
    victim = max(busy, key=lambda server_id: busy[server_id])
    assert busy[victim] >= 1, busy
    swarm.kill(swarm.index_of(victim), signal.SIGKILL)
    decoded_at_kill = loop.rounds - rounds
    assert decoded_at_kill < MAX_NEW and all(t.is_alive() for t in threads), "the kill did not land mid-decode"
    for thread in threads:
        thread.join(RESTART_TIMEOUT)
        assert not thread.is_alive(), f"a generation did not end within {RESTART_TIMEOUT:.0f} s"
    assert not errors, errors
    assert [results[i] for i in range(len(inputs))] == expected
    assert model.client.stats.failovers >= 1, model.client.stats
    assert loop.rows == len(inputs) * MAX_NEW and loop.rounds - rounds < len(inputs) * MAX_NEW  # rounds were shared

"""Servers die mid-generation; clients fail over and their outputs do not change."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import requests
import torch

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm_core.spans import Span
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids

pytestmark = pytest.mark.integration


def local_greedy(local, ids, max_new_tokens):
    with torch.no_grad():
        return local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0).tolist()


@pytest.fixture(scope="module")
def swarm6():
    options = LocalSwarmOptions(model="smollm2", servers=6, redundancy=2, port=0, progress=False,
                                log_dir=OUTPUT / "swarm6-logs")
    with LocalSwarm(options) as swarm:
        yield swarm


def test_sigkill_during_four_generations(swarm6, local_smollm2):
    assert sorted((s.start, s.end) for s in swarm6.routes().servers) == [(0, 10), (0, 10), (10, 20), (10, 20), (20, 30), (20, 30)]
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2", swarm=swarm6.url, progress=False, client_config=ClientConfig(ban_seconds=2.0)
    )
    prompts = ["Write a short poem about autumn.", "Explain photosynthesis simply.",
               "Give three tips for learning to cook.", "Describe the ocean at night."]
    inputs = [chat_ids(model.tokenizer, p) for p in prompts]
    expected = [local_greedy(local_smollm2, ids, 40) for ids in inputs]
    victim = model.client.chain(0, 30)[1].server  # the middle hop every client uses
    index = int(victim.id.removeprefix("local-"))
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            ids = inputs[i]
            results[i] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                                        do_sample=False, pad_token_id=0).tolist()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    tokens_seen = 0.0
    deadline = time.monotonic() + 60
    while tokens_seen < 40 and time.monotonic() < deadline:  # kill it mid-generation, once tokens flow through it
        text = requests.get(f"{victim.url}/metrics", timeout=10).text
        tokens_seen = sum(float(v) for v in re.findall(r'llmswarm_tokens_processed_total\{kind="inference"\} (\S+)', text))
        time.sleep(0.05)
    swarm6.kill(index, signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [results[i] for i in range(4)] == expected

    # The killed server comes back under the same id, re-enters the map and is used again.
    swarm6.processes[index].wait()
    swarm6.start_server(Span(victim.start, victim.end), OUTPUT / "swarm6-logs" / "restarted.log", victim.id)
    deadline = time.monotonic() + 120
    while not any(s.id == victim.id and s.state == "online" for s in swarm6.routes().servers):
        assert time.monotonic() < deadline, "the restarted server did not come back into the route map"
        time.sleep(0.2)
    time.sleep(2.5)  # the client's ban (2 s) runs out
    for other in swarm6.routes().servers:  # leave the restarted server as the only one for its span
        if other.start == victim.start and other.id != victim.id:
            model.client.ban(other.id, 60)
    assert victim.id in [hop.server.id for hop in model.client.chain(0, 30)]
    ids = inputs[0]
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          pad_token_id=0).tolist() == expected[0]


def test_no_server_for_a_span_is_a_clear_error(swarm6):
    from llmswarm.errors import SwarmError
    from llmswarm.inference import InferenceSession
    from llmswarm.sequence_manager import SwarmClient

    client = SwarmClient(swarm6.url, ClientConfig(max_retries=1, backoff_base=0.05))
    for server in swarm6.routes().servers:
        if server.start == 20:
            client.ban(server.id)  # as after a failure: avoided for ban_seconds
    with pytest.raises(SwarmError, match=r"blocks \[20, 30\)"):
        InferenceSession(client, 30, max_length=16)


def test_sigkill_during_a_pushed_generation(swarm6, local_smollm2):
    """A client alone: each server pushes the step to the next. The middle server dies mid-generation; the
    client fails over (the hop after it starts a new session, replayed) and its output does not change."""
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2", swarm=swarm6.url, progress=False, client_config=ClientConfig(ban_seconds=2.0)
    )
    ids = chat_ids(model.tokenizer, "Describe a mountain lake in spring.")
    expected = local_greedy(local_smollm2, ids, 40)
    victim = model.client.chain(0, 30)[1].server
    result: list = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            result.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                                         do_sample=False, pad_token_id=0).tolist())
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=client)
    thread.start()
    pushed_to_victim = 0.0
    deadline = time.monotonic() + 60
    while pushed_to_victim < 10 and time.monotonic() < deadline:  # its steps arrive by push
        text = requests.get(f"{victim.url}/metrics", timeout=10).text
        pushed_to_victim = sum(float(v) for v in re.findall(r'llmswarm_pushes_received_total\{status="ok"\} (\S+)', text))
        time.sleep(0.05)
    assert pushed_to_victim >= 10
    swarm6.kill(swarm6.index_of(victim.id), signal.SIGKILL)
    thread.join()
    assert not errors, errors
    assert result == [expected]

"""Backpressure (refusals a client rides out) and graceful drain on SIGTERM, on real servers."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import requests
import torch

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_full_servers():
    """Two servers holding every block, each taking at most two sessions."""
    options = LocalSwarmOptions(model="smollm2", servers=2, blocks_per_server=30, port=0, progress=False,
                                server_args=["--max-sessions", "2", "--drain-timeout", "20"],
                                log_dir=OUTPUT / "limits-logs")
    with LocalSwarm(options) as swarm:
        yield swarm


def counter(url: str, kind: str, status: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf'llmswarm_requests_total\{{kind="{kind}",status="{status}"\}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_refused_client_succeeds_after_others_close(two_full_servers, local_smollm2):
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2", swarm=two_full_servers.url, progress=False, client_config=ClientConfig(max_retries=8)
    )
    ids = chat_ids(model.tokenizer, "What is the capital of France?")
    with torch.no_grad():
        expected = local_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False).tolist()
    urls = [s.url for s in two_full_servers.routes().servers]
    refused_before = sum(counter(u, "open", "overloaded") for u in urls)
    holders = [model.inference_session(max_length=64) for _ in range(4)]  # 2 servers x 2 sessions: all full
    for holder in holders:
        holder.__enter__()
    result = {}
    waiting = threading.Thread(target=lambda: result.update(out=model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False).tolist()))
    waiting.start()
    time.sleep(2.0)
    assert waiting.is_alive(), "the fifth session should be waiting for room"
    assert sum(counter(u, "open", "overloaded") for u in urls) > refused_before
    for holder in holders:
        holder.__exit__(None, None, None)
    waiting.join(60)
    assert result["out"] == expected


def test_overloaded_reply_carries_retry_after(two_full_servers):
    from llmswarm_core import wire

    server = two_full_servers.routes().servers[0]
    body = wire.encode({"kind": "forward", "start": 0, "end": 30}, {"hidden": torch.zeros(1, 1, 576)})
    assert requests.post(f"{server.url}/v1/forward", data=body, timeout=30).status_code == 200
    from websockets.sync.client import connect

    sockets = [connect(server.url.replace("http://", "ws://") + "/v1/session", compression=None) for _ in range(3)]
    try:
        replies = []
        for socket in sockets:
            socket.send(wire.encode({"kind": "open", "start": 0, "end": 30, "max_length": 8}))
            replies.append(wire.decode(socket.recv(timeout=30)))
        assert [r.kind for r in replies] == ["opened", "opened", "error"]
        assert replies[2].header["code"] == "overloaded" and replies[2].header["retryable"]
        assert replies[2].header["retry_after"] > 0
    finally:
        for socket in sockets:
            socket.close()


def local_greedy(local, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        return local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0).tolist()


def test_sigterm_drains(two_full_servers, local_smollm2):
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=two_full_servers.url, progress=False)
    ids = chat_ids(model.tokenizer, "Count from one to ten.")
    with model.inference_session(max_length=ids.shape[1] + 20) as session:
        first = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert first.tolist() == local_greedy(local_smollm2, ids, 4)
        server_id = session.chain[0][0]
        index = int(server_id.removeprefix("local-"))
        two_full_servers.kill(index, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while next(s.state for s in two_full_servers.routes().servers if s.id == server_id) != "draining":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The open session keeps working on the draining server...
        more = model.generate(first, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert more.shape[1] > first.shape[1]
        assert more.tolist() == local_greedy(local_smollm2, first, 8)  # the session's cache went on intact
        assert session.chain[0][0] == server_id
        # ...while new sessions go elsewhere (once the client's copy of the map is refreshed).
        model.client.routes(refresh=True)
        assert [hop.server.id for hop in model.client.chain(0, 30)] != [server_id]
        assert two_full_servers.processes[index].poll() is None
    assert two_full_servers.processes[index].wait(30) == 0
    assert all(s.id != server_id for s in two_full_servers.routes().servers)

"""Server-to-server push: each server hands a step's output straight to the next server of the chain."""

from __future__ import annotations

import socket
import time

import pytest
import requests
import torch
from websockets.sync.client import connect

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm.span_session import SpanSession
from llmswarm_core import wire
from tests.conftest import chat_ids
from tests.helpers import metric_total
from tests.reference import LocalSpan

pytestmark = pytest.mark.integration


def push_counts(swarm) -> dict[str, tuple[float, float]]:
    """server id -> (pushes made, pushes received and run), from each server's /metrics."""
    counts = {}
    for server in swarm.routes().servers:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        counts[server.id] = (metric_total(text, "llmswarm_pushes_total", status="ok"),
                             metric_total(text, "llmswarm_pushes_received_total", status="ok"))
    return counts


def greedy(model, ids, new_tokens=24):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def wait_until_pushing(swarm, model, ids, chain, timeout: float = 60.0) -> None:
    """Generate a few tokens until every hop but the last pushed each of their steps.

    A server reads the route map for its peers in the background (llmswarm_node.push.PeerDirectory, every few
    seconds): in a swarm's first seconds a server may not know the next one yet, and its first steps are then
    sent on by the client instead (same output). The counts the tests assert are taken after this.
    """
    deadline = time.monotonic() + timeout
    while True:
        before = push_counts(swarm)
        greedy(model, ids, 3)
        after = push_counts(swarm)
        if all(after[hop][0] - before[hop][0] >= 3 for hop in chain[:-1]) or time.monotonic() > deadline:
            return


def session_socket(url: str):
    return connect(url.replace("http://", "ws://") + "/v1/session", compression=None, max_size=2**26)


def call(sock, header, tensors=None) -> wire.Frame:
    sock.send(wire.encode(header, tensors))
    return wire.decode(sock.recv(timeout=60))


def test_pushed_steps_equal_client_driven_steps(swarm3, model3, local_smollm2):
    ids = chat_ids(model3.tokenizer, "Name three rivers in Europe.")
    chain = [hop.server.id for hop in model3.client.chain(0, 30)]
    assert len(chain) == 3
    wait_until_pushing(swarm3, model3, ids, chain)
    before = push_counts(swarm3)
    pushed = greedy(model3, ids)
    after = push_counts(swarm3)
    # every step after the prefill went server to server: the first two hops pushed, the last two received
    assert after[chain[0]][0] - before[chain[0]][0] >= 24 and after[chain[1]][0] - before[chain[1]][0] >= 24
    assert after[chain[1]][1] - before[chain[1]][1] >= 24 and after[chain[2]][1] - before[chain[2]][1] >= 24

    unpushed_model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, progress=False,
                                                                 client_config=ClientConfig(push=False))
    before = push_counts(swarm3)
    unpushed = greedy(unpushed_model, ids)
    assert push_counts(swarm3) == before
    assert torch.equal(pushed, unpushed)
    assert torch.equal(pushed, greedy(local_smollm2, ids))


def test_client_sends_on_where_a_server_could_not_push(swarm3, model3, local_smollm2, monkeypatch):
    """A push target the route map does not list is refused by the server (pushed: false); the client sends
    that hop's input itself, with the request id it reserved, and the output does not change."""
    real_target = SpanSession.push_target

    def unlisted(self, request_id, then):
        target = real_target(self, request_id, then)
        if self.start == 10:
            target = target.model_copy(update={"url": "http://127.0.0.1:9"})  # not a server of this swarm
        return target

    monkeypatch.setattr(SpanSession, "push_target", unlisted)
    ids = chat_ids(model3.tokenizer, "What is the capital of Italy?")
    chain = [hop.server.id for hop in model3.client.chain(0, 30)]
    before = push_counts(swarm3)
    assert torch.equal(greedy(model3, ids, 16), greedy(local_smollm2, ids, 16))
    after = push_counts(swarm3)
    assert after[chain[0]][0] == before[chain[0]][0]  # hop 0 was never let push to the unlisted URL
    assert after[chain[1]][0] - before[chain[1]][0] >= 16  # hop 1, sent its input by the client, pushed on


# A remote span against the same blocks run here by transformers (tests/reference.py): the same float32 ops on the
# same weights. Measured: bit-identical (max abs difference 0.0, on outputs up to about 1350 in size). The
# tolerance leaves room for a different summation order only (1e-5 relative); a wrong cache, position or mask
# changes these outputs by whole units.
SPAN_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def test_servers_push_only_to_servers_the_route_map_lists(swarm3, local_smollm2):
    bait = socket.socket()
    bait.bind(("127.0.0.1", 0))
    bait.listen()
    bait.setblocking(False)
    first = next(s for s in swarm3.routes().servers if s.start == 0)
    hidden = torch.randn(1, 3, 576)
    with session_socket(first.url) as sock:
        session = call(sock, {"kind": "open", "start": 0, "end": 10, "max_length": 8}).header
        target = {"url": f"http://127.0.0.1:{bait.getsockname()[1]}", "session": 1, "key": "k" * 32, "request_id": 1,
                  "position": 0}
        reply = call(sock, {"kind": "step", "session": session["session"], "request_id": 7, "push": target},
                     {"hidden": hidden})
        assert reply.kind == "output" and reply.header["pushed"] is False and reply.header["request_id"] == 7
        torch.testing.assert_close(reply.tensors["hidden"], LocalSpan(local_smollm2, 0, 10).step(hidden), **SPAN_TOLERANCE)
    time.sleep(0.5)
    with pytest.raises(BlockingIOError):
        bait.accept()  # nobody connected
    bait.close()


def test_bad_pushes_are_refused_and_the_server_keeps_serving(swarm3, local_smollm2):
    """Refused pushes leave the session as it was: the good push and the step after it give what blocks [10, 20)
    give locally for the same inputs from position 0, not only the right shapes."""
    second = next(s for s in swarm3.routes().servers if s.start == 10)
    hidden = torch.randn(1, 2, 576)
    following = torch.randn(1, 1, 576)
    reference = LocalSpan(local_smollm2, 10, 20)
    with session_socket(second.url) as owner, connect(second.url.replace("http://", "ws://") + "/v1/push",
                                                      compression=None) as pusher:
        opened = call(owner, {"kind": "open", "start": 10, "end": 20, "max_length": 8}).header
        session, key = opened["session"], opened["push_key"]
        assert isinstance(key, str) and len(key) >= 16

        pusher.send(b"not a frame")
        assert wire.decode(pusher.recv(timeout=30)).header["code"] == "bad_request"
        wrong_key = {"kind": "push", "session": session, "key": "x" * len(key), "request_id": 1, "position": 0}
        pusher.send(wire.encode(wrong_key, {"hidden": hidden}))
        refusal = wire.decode(pusher.recv(timeout=30)).header
        assert refusal["code"] == "not_found" and "push key" in refusal["message"]

        # the right key but a stale position: the client is told, on its own connection, for its request id
        stale = {"kind": "push", "session": session, "key": key, "request_id": 5, "position": 3}
        pusher.send(wire.encode(stale, {"hidden": hidden}))
        error = wire.decode(owner.recv(timeout=30)).header
        assert error["kind"] == "error" and error["request_id"] == 5 and "position 3" in error["message"]
        bad_shape = {"kind": "push", "session": session, "key": key, "request_id": 6, "position": 0}
        pusher.send(wire.encode(bad_shape, {"hidden": torch.randn(1, 2, 5)}))
        assert wire.decode(owner.recv(timeout=30)).header["code"] == "bad_request"

        good = {"kind": "push", "session": session, "key": key, "request_id": 8, "position": 0}
        pusher.send(wire.encode(good, {"hidden": hidden}))
        output = wire.decode(owner.recv(timeout=60))
        assert output.kind == "output" and output.header["request_id"] == 8
        assert output.tensors["hidden"].shape == (1, 2, 576)
        torch.testing.assert_close(output.tensors["hidden"], reference.step(hidden), **SPAN_TOLERANCE)
        # the session goes on from the pushed step (position 2), by the client's own steps too
        step = call(owner, {"kind": "step", "session": session, "request_id": 9}, {"hidden": following})
        assert step.kind == "output" and step.header["request_id"] == 9
        torch.testing.assert_close(step.tensors["hidden"], reference.step(following), **SPAN_TOLERANCE)
    assert requests.get(f"{second.url}/healthz", timeout=10).status_code == 200


def test_pushed_steps_of_separate_clients_share_passes(swarm3, local_smollm2):
    """Four clients that do not group their steps (separate models): all their steps reach the middle server by
    push over one connection from the first server, and must still be free to share its passes."""
    import threading

    models = [DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, progress=False) for _ in range(4)]
    ids = chat_ids(models[0].tokenizer, "Why is the sky blue?")
    middle = next(s for s in swarm3.routes().servers if s.start == 10)

    def passes() -> tuple[float, float]:
        text = requests.get(f"{middle.url}/metrics", timeout=10).text
        return (metric_total(text, "llmswarm_batch_size_sum", kind="inference"),
                metric_total(text, "llmswarm_batch_size_count", kind="inference"))

    outputs: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: outputs.__setitem__(i, greedy(models[i], ids, 32))) for i in range(4)]
    rows_before, passes_before = passes()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows, count = passes()
    expected = greedy(local_smollm2, ids, 32)
    assert all(torch.equal(outputs[i], expected) for i in range(4))
    assert (rows - rows_before) / (count - passes_before) > 1.2  # one pass per step would be exactly 1

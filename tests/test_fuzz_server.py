"""Hypothesis against a live block server: it never crashes, its memory stays bounded, every input gets its
reply (an error frame for a malformed one) on a connection that stays open, and a healthy session running
alongside finishes with the right output."""

from __future__ import annotations

import json
import struct
import threading
from collections import Counter

import psutil
import pytest
import requests
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from llmswarm_core import wire
from tests.conftest import chat_ids

pytestmark = pytest.mark.integration

DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "float64", "complex", ""]
KINDS = ["open", "step", "close", "forward", "launch", "", "opened", "error"]

ints = st.one_of(st.integers(-3, 40), st.integers(-(2**63), 2**63), st.sampled_from([2**31, 2**31 - 1, 0]))
shapes = st.lists(st.one_of(st.integers(0, 8), st.sampled_from([576, 575, 2**20, 2**31, -1])), max_size=6)
specs = st.fixed_dictionaries({"name": st.sampled_from(["hidden", "attention_mask", "position_ids", "x", ""]),
                               "dtype": st.sampled_from(DTYPES), "shape": shapes})
headers = st.fixed_dictionaries(
    {"kind": st.sampled_from(KINDS)},
    optional={"start": ints, "end": ints, "max_length": ints, "batch_size": ints, "session": ints,
              "wire_dtype": st.sampled_from(["float32", "int8", "bfloat16"]), "request_id": ints,
              "extra": st.text(max_size=5), "tensors": st.lists(specs, max_size=4)},
)


def raw_frame(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", b"LSW1", len(head)) + head + payload


frames = st.one_of(
    st.binary(max_size=300),
    st.builds(raw_frame, headers, st.binary(max_size=2048)),
    st.builds(lambda h, n: raw_frame(h, bytes(n)), headers, st.integers(0, 2**16)),
)


class Connection:
    """One session connection; an input that gets no reply (the connection dropped, or nothing came in time) is
    counted with the input, and the next one goes on a new connection, so that the test reports every such input."""

    def __init__(self, url: str, path: str = "/v1/session") -> None:
        self.url = url.replace("http://", "ws://") + path
        self.socket = connect(self.url, compression=None, max_size=None)
        self.outcomes: Counter[str] = Counter()
        self.unanswered: list[tuple[str, bytes | str]] = []

    def exchange(self, data: bytes | str) -> wire.Frame | None:
        try:
            self.socket.send(data)
            reply = self.socket.recv(timeout=60)
        except TimeoutError:
            return self._unanswered("timeout", data)
        except ConnectionClosed:
            return self._unanswered("dropped", data)
        frame = wire.decode(reply)
        self.outcomes[frame.kind if frame.kind != "error" else f"error:{frame.header['code']}"] += 1
        return frame

    def _unanswered(self, what: str, data: bytes | str) -> None:
        self.outcomes[what] += 1
        self.unanswered.append((what, data[:200]))
        self.socket.close()
        self.socket = connect(self.url, compression=None, max_size=None)
        return None


def test_fuzzing_a_live_server(swarm3, model3, local_smollm2):
    server = next(s for s in swarm3.routes().servers if s.start == 0)
    process = psutil.Process(swarm3.processes[[s.start for s in swarm3.spans].index(0)].pid)
    hidden_size = swarm3.routes().model.hidden_size
    ids = chat_ids(model3.tokenizer, "Write a haiku about the sea.")
    with torch.no_grad():
        expected = local_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)

    connection = Connection(server.url)
    # A session the fuzzer may also hit with steps (valid id, wrong contents).
    opened = connection.exchange(wire.encode({"kind": "open", "start": 0, "end": 10, "max_length": 64}))
    assert opened is not None and opened.kind == "opened"
    own_session = opened.header["session"]
    rss_before = process.memory_info().rss
    result: dict[str, torch.Tensor] = {}
    healthy = threading.Thread(target=lambda: result.update(out=model3.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)))
    healthy.start()
    examples = [0]
    answered_before = sum(connection.outcomes.values())  # the open above

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        frames,
        st.builds(lambda s, h: wire.encode({"kind": "step", "session": s}, {"hidden": h}),
                  st.sampled_from([own_session, own_session + 1, 0, 999_999]),
                  st.builds(torch.zeros, st.integers(0, 3), st.integers(0, 70), st.sampled_from([hidden_size, 3]))),
        st.builds(lambda a, b, n: wire.encode({"kind": "open", "start": a, "end": b, "max_length": n}),
                  st.integers(-1, 32), st.integers(-1, 32), st.integers(-1, 10**6)),
        st.text(max_size=50),
    ))
    # Valid opens are rare among random ones (about 1 in 70 drawn here): these always run.
    @example(wire.encode({"kind": "open", "start": 0, "end": 10, "max_length": 8}))
    @example(wire.encode({"kind": "open", "start": 3, "end": 6, "max_length": 282}))
    def fuzz(data):
        examples[0] += 1
        reply = connection.exchange(data)
        if reply is not None:
            assert reply.kind in ("opened", "output", "closed", "error")
            if reply.kind == "error":
                assert reply.header["code"] in ("bad_request", "not_found", "too_large", "overloaded")
                assert reply.header["message"]

    try:
        fuzz()
        healthy.join()
        growth_mib = (process.memory_info().rss - rss_before) / 2**20
    finally:
        healthy.join()
        connection.socket.close()  # frees the sessions the fuzzer opened, whatever happened
    assert result["out"].tolist() == expected.tolist()
    outcomes = connection.outcomes
    assert not connection.unanswered, f"inputs without a reply (outcomes {dict(outcomes)}): {connection.unanswered}"
    assert sum(outcomes.values()) - answered_before == examples[0], outcomes  # every input, its reply
    assert outcomes["opened"] and outcomes["error:bad_request"], outcomes
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    assert growth_mib < 300, f"server memory grew by {growth_mib:.0f} MiB"


def test_fuzzing_the_push_socket(swarm3):
    """Whatever arrives on /v1/push from someone who holds no push key gets a refusal frame on the same connection."""
    server = next(s for s in swarm3.routes().servers if s.start == 10)
    connection = Connection(server.url, "/v1/push")
    examples = [0]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(frames, st.text(max_size=50), st.builds(
        lambda s, k, p: wire.encode({"kind": "push", "session": s, "key": k, "request_id": 1, "position": p},
                                    {"hidden": torch.zeros(1, 1, 576)}),
        st.integers(0, 50), st.text(min_size=16, max_size=64), st.integers(0, 5))))
    def fuzz(data):
        examples[0] += 1
        reply = connection.exchange(data)
        if reply is not None:
            assert reply.kind == "error" and reply.header["code"] in ("bad_request", "not_found", "too_large", "overloaded")

    try:
        fuzz()
    finally:
        connection.socket.close()
    assert not connection.unanswered, f"inputs without a reply: {connection.unanswered}"
    assert sum(connection.outcomes.values()) == examples[0], connection.outcomes
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200

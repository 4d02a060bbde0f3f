"""The wire format: round trips, and every defect refused with ProtocolError before allocation."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError, WireLimits


def frame_with(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", b"LSW1", len(head)) + head + payload


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_round_trip(dtype):
    tensor = (torch.randn(2, 3, 4) * 10).to(dtype)
    frame = wire.decode(wire.encode({"kind": "step", "session": 3}, {"hidden": tensor, "empty": torch.zeros(0, 5)}))
    assert frame.kind == "step" and frame.header["session"] == 3
    assert frame.tensors["hidden"].dtype == dtype
    assert torch.equal(frame.tensors["hidden"], tensor)
    assert frame.tensors["empty"].shape == (0, 5)


def test_bad_magic_and_short_frames():
    with pytest.raises(ProtocolError, match="shorter"):
        wire.decode(b"LS")
    with pytest.raises(ProtocolError, match="magic"):
        wire.decode(b"XXXX" + bytes(4))


def test_truncated_header_and_tensor():
    data = wire.encode({"kind": "step", "session": 1}, {"hidden": torch.ones(1, 2, 8)})
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(data[:12])
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(data[:-4])
    with pytest.raises(ProtocolError, match="after the last"):
        wire.decode(data + b"\0")


def test_declared_size_is_checked_before_allocation():
    header = {"kind": "step", "session": 1, "tensors": [{"name": "hidden", "dtype": "float32", "shape": [2**20, 2**20]}]}
    with pytest.raises(ProtocolError, match="declares") as caught:
        wire.decode(frame_with(header), WireLimits(max_tensor_bytes=1024))
    assert caught.value.code == "too_large"


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"name": "h", "dtype": "float64", "shape": [1]}], "dtype"),
        ([{"name": "h", "dtype": "float32", "shape": [-1]}], "shape"),
        ([{"name": "h", "dtype": "float32", "shape": [1], "extra": 1}], "extra"),
        ([{"name": "h", "dtype": "float32", "shape": [1, 1, 1, 1, 1]}], "dims"),
        ("not a list", "list"),
    ],
)
def test_bad_tensor_descriptions(specs, message):
    with pytest.raises(ProtocolError, match=message):
        wire.decode(frame_with({"kind": "step", "tensors": specs}, b"\0" * 4))


def test_header_must_be_an_object_with_kind():
    with pytest.raises(ProtocolError, match="kind"):
        wire.decode(frame_with([1, 2]))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="JSON"):
        wire.decode(struct.pack("<4sI", b"LSW1", 3) + b"{no")


def test_requests_are_strict():
    frame = wire.decode(wire.encode({"kind": "open", "start": 0, "end": 3, "max_length": 10}))
    assert wire.parse_request(frame, ("open",)).batch_size == 1
    for header, allowed in [
        ({"kind": "open", "start": 0, "end": 3, "max_length": 10, "bogus": 1}, ("open",)),
        ({"kind": "open", "start": "0", "end": 3, "max_length": 10}, ("open",)),
        ({"kind": "open", "start": 0, "end": 3, "max_length": 0}, ("open",)),
        ({"kind": "step", "session": 1}, ("open",)),
        ({"kind": "forward", "start": 0, "end": 1, "wire_dtype": "int8"}, ("forward",)),
    ]:
        with pytest.raises(ProtocolError):
            wire.parse_request(wire.decode(wire.encode(header)), allowed)


def test_error_reply_round_trip():
    reply = wire.decode(wire.encode(ProtocolError("overloaded", "busy").to_header()))
    with pytest.raises(ProtocolError) as caught:
        wire.raise_if_error(reply)
    assert caught.value.code == "overloaded" and caught.value.retryable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_errors(data):
    try:
        wire.decode(b"LSW1" + data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_mutated_frames_only_raise_protocol_errors(position, garbage):
    data = bytearray(wire.encode({"kind": "step", "session": 1}, {"hidden": torch.ones(1, 2, 4)}))
    position = min(position, len(data) - 1)
    data[position:position + len(garbage)] = garbage
    try:
        wire.decode(bytes(data))
    except ProtocolError:
        pass


def test_a_huge_header_integer_is_a_protocol_error() -> None:
    """More than 4,300 digits makes json.loads raise ValueError (Python's int-string limit): a bad request, not a crash."""
    head = ('{"kind":"open","start":' + "7" * 5000 + "}").encode()
    with pytest.raises(ProtocolError, match="cannot be read") as caught:
        wire.decode(struct.pack("<4sI", b"LSW1", len(head)) + head)
    assert caught.value.code == "bad_request"


def test_typed_replies_round_trip_and_malformed_replies_are_internal_errors() -> None:
    frame = wire.decode(wire.reply_frame(wire.OpenedReply(session=3, push_key="k" * 32, request_id=1)))
    assert wire.parse_reply(frame, wire.OpenedReply) == wire.OpenedReply(session=3, push_key="k" * 32, request_id=1)
    output = wire.decode(wire.reply_frame(wire.OutputReply(session=3, request_id=2, pushed=True), {"hidden": torch.ones(1, 1, 4)}))
    assert wire.parse_reply(output, wire.OutputReply).pushed is True and output.tensors["hidden"].shape == (1, 1, 4)
    with pytest.raises(ProtocolError, match="unexpected reply 'output'") as caught:
        wire.parse_reply(output, wire.OpenedReply)
    assert caught.value.code == "internal"
    with pytest.raises(ProtocolError, match="malformed opened reply"):
        wire.parse_reply(wire.decode(wire.encode({"kind": "opened", "session": "three"})), wire.OpenedReply)
    error = wire.decode(wire.reply_frame(wire.ErrorReply(code="overloaded", message="busy", retryable=True, retry_after=2.0)))
    with pytest.raises(ProtocolError) as raised:
        wire.parse_reply(error, wire.OutputReply)
    assert (raised.value.code, raised.value.retryable, raised.value.retry_after) == ("overloaded", True, 2.0)
    request = wire.decode(wire.request_frame(wire.CloseRequest(kind="close", session=4, request_id=9)))
    assert wire.parse_request(request, ("close",)) == wire.CloseRequest(kind="close", session=4, request_id=9)

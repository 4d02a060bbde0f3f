"""The one way a failure becomes a reply frame (replies.py), as the client reads it."""

from __future__ import annotations

import logging

import pytest

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError
from llmswarm_node.replies import MESSAGE_CHARS, error_reply, request_id_of


def read_back(frame: bytes) -> tuple[dict, ProtocolError]:
    decoded = wire.decode(frame)
    with pytest.raises(ProtocolError) as caught:
        wire.raise_if_error(decoded)
    return decoded.header, caught.value


def test_a_protocol_error_keeps_its_code_message_and_retry_hint():
    frame, error = error_reply(ProtocolError("overloaded", "128 sessions open", retry_after=1.0), 7, "open")
    header, raised = read_back(frame)
    assert error.code == "overloaded" and error.http_status == 503
    assert header == {"kind": "error", "code": "overloaded", "message": "128 sessions open", "retryable": True,
                      "retry_after": 1.0, "request_id": 7}
    assert (raised.code, raised.message, raised.retryable, raised.retry_after) == ("overloaded", "128 sessions open", True, 1.0)
    header, _ = read_back(error_reply(ProtocolError("bad_request", "no"), None, "forward")[0])
    assert "request_id" not in header and "retry_after" not in header


def test_any_other_failure_is_logged_and_answered_as_internal(caplog):
    with caplog.at_level(logging.ERROR, logger="llmswarm.node"):
        frame, error = error_reply(ValueError("boom"), 3, "step")
    assert error.code == "internal" and error.http_status == 500
    _, raised = read_back(frame)
    assert raised.code == "internal" and raised.message == "ValueError: boom" and raised.retryable
    assert "step failed" in caplog.text and "ValueError: boom" in caplog.text


def test_a_huge_message_still_makes_a_reply_that_clients_decode():
    for text in ("x" * 200_000, "\x01" * 200_000):  # a control character takes six bytes in the JSON header
        frame, _ = error_reply(RuntimeError(text), None, "forward")
        _, raised = read_back(frame)
        assert raised.code == "internal" and raised.message == f"RuntimeError: {text}"[:MESSAGE_CHARS]


def test_the_request_id_of_a_failed_frame():
    assert request_id_of(wire.encode({"kind": "step", "request_id": 12})) == 12
    assert request_id_of(b"garbage") is None
    for bad in (-1, 2**40, True, "12", None):
        assert request_id_of(wire.encode({"kind": "step", "request_id": bad})) is None

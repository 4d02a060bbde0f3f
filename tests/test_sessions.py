"""Session bookkeeping (pure) and freeing caches when clients vanish (real server)."""

from __future__ import annotations

import time

import pytest
import requests
from websockets.sync.client import connect

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError
from llmswarm_node.sessions import ServerLimits, SessionTable


def table(**limits) -> SessionTable:
    return SessionTable(ServerLimits(**limits), kv_bytes_per_token_block=10)


def test_session_limit_is_a_retryable_refusal():
    sessions = table(max_sessions=2)
    first = sessions.open(1, 0, 1, 1, 8, "float32", None)
    sessions.open(1, 0, 1, 1, 8, "float32", None)
    with pytest.raises(ProtocolError) as caught:
        sessions.open(2, 0, 1, 1, 8, "float32", None)
    assert caught.value.code == "overloaded" and caught.value.retryable
    sessions.close(1, first.id)
    sessions.open(2, 0, 1, 1, 8, "float32", None)


def test_cache_budget_is_reserved_at_open():
    sessions = table(kv_cache_bytes=1000)
    sessions.open(1, 0, 2, 1, 30, "float32", None)  # 2 blocks x 30 tokens x 10 bytes = 600
    assert sessions.reserved_bytes == 600
    with pytest.raises(ProtocolError, match="400 are free") as caught:
        sessions.open(1, 0, 2, 1, 30, "float32", None)
    assert caught.value.code == "overloaded"
    with pytest.raises(ProtocolError, match="whole budget") as caught:
        sessions.open(1, 0, 2, 2, 60, "float32", None)
    assert caught.value.code == "too_large" and not caught.value.retryable
    assert sessions.tokens_left(2) == 20


def test_sessions_belong_to_their_connection_and_expire():
    sessions = table(session_idle_timeout=10)
    session = sessions.open(1, 0, 1, 1, 8, "float32", None)
    with pytest.raises(ProtocolError, match="no session"):
        sessions.get(2, session.id)
    assert sessions.expire(now=time.monotonic() + 5) == []
    assert sessions.expire(now=time.monotonic() + 11) == [session.id]
    other = sessions.open(3, 0, 1, 1, 8, "float32", None)
    assert sessions.close_owner(3) == 1 and len(sessions) == 0
    with pytest.raises(ProtocolError):
        sessions.close(3, other.id)


@pytest.mark.integration
def test_vanished_client_frees_its_sessions(swarm3):
    server = next(s for s in swarm3.routes().servers if s.start == 0)
    before = requests.get(f"{server.url}/info", timeout=10).json()["sessions"]  # other tests' clients may hold some
    socket = connect(server.url.replace("http://", "ws://") + "/v1/session", compression=None)
    for _ in range(3):
        socket.send(wire.encode({"kind": "open", "start": 0, "end": 10, "max_length": 64}))
        assert wire.decode(socket.recv(timeout=30)).kind == "opened"
    info = requests.get(f"{server.url}/info", timeout=10).json()
    assert info["sessions"] >= before + 3 and info["cache_bytes_used"] > 0
    socket.socket.close()  # vanish: no close frame, no close messages
    deadline = time.monotonic() + 30
    while requests.get(f"{server.url}/info", timeout=10).json()["sessions"] != before:
        assert time.monotonic() < deadline, "the server kept the vanished client's sessions"
        time.sleep(0.2)
    if before == 0:
        assert requests.get(f"{server.url}/info", timeout=10).json()["cache_bytes_used"] == 0


def test_one_client_holds_only_so_many_sessions_per_connection_and_per_address():
    sessions = table(max_sessions_per_connection=2, max_sessions_per_address=3)
    first = sessions.open(1, 0, 1, 1, 8, "float32", None, address="10.0.0.1")
    sessions.open(1, 0, 1, 1, 8, "float32", None, address="10.0.0.1")
    with pytest.raises(ProtocolError, match="per connection") as caught:
        sessions.open(1, 0, 1, 1, 8, "float32", None, address="10.0.0.1")
    assert caught.value.code == "overloaded" and caught.value.retry_after
    sessions.open(2, 0, 1, 1, 8, "float32", None, address="10.0.0.1")
    with pytest.raises(ProtocolError, match="per address") as caught:
        sessions.open(3, 0, 1, 1, 8, "float32", None, address="10.0.0.1")
    assert caught.value.code == "overloaded"
    sessions.open(3, 0, 1, 1, 8, "float32", None, address="10.0.0.2")  # another client
    assert sessions.held_by(1) == 2
    sessions.close(1, first.id)
    sessions.open(3, 0, 1, 1, 8, "float32", None, address="10.0.0.1")  # room again for that address

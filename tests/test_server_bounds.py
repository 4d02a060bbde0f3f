"""What a block server takes from its clients is bounded (issue #19): connections, the time to send a header or a
body or anything at all, sessions per client, stateless requests in flight, weights digests; and every malformed
frame gets an error frame (the connection kept) or a 4xx status, never a 500. Against a server in this process."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
import requests
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from llmswarm_core import wire
from llmswarm_node.span import SpanModel
from tests.bounds_harness import closed_by_peer, eventually, running
from tests.reference import LocalSpan

HIDDEN = 576
EXACT = dict(rtol=1e-5, atol=1e-5)  # the same float32 ops on the same weights (tests/test_push.py measured 0.0)


@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 2, progress=False)


@pytest.fixture(scope="module")
def reference(local_smollm2):
    return LocalSpan(local_smollm2, 0, 2)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def ws(url: str, path: str = "/v1/session"):
    return connect(url.replace("http://", "ws://") + path, compression=None, max_size=None, open_timeout=30)


def call(sock, header: dict | None = None, tensors=None, raw: bytes | str | None = None) -> wire.Frame:
    sock.send(raw if raw is not None else wire.encode(header, tensors))
    return wire.decode(sock.recv(timeout=60))


def frame_with_header(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<4sI", b"LSW1", len(header)) + header + payload


def open_session(sock, max_length: int = 64) -> int:
    reply = call(sock, {"kind": "open", "start": 0, "end": 2, "max_length": max_length})
    assert reply.kind == "opened", reply.header
    return reply.header["session"]


def expect_error(reply: wire.Frame, code: str, text: str = "") -> dict:
    assert reply.kind == "error", reply.header
    assert reply.header["code"] == code, reply.header
    assert text in reply.header["message"], reply.header
    return reply.header


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP response on a raw socket (Content-Length bodies only)."""
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


# ---- item 1: connections, header and idle timeouts, sessions per client -----------------------------------------
def test_connections_past_the_cap_are_answered_503_with_retry_after(span):
    with running(span, max_connections=4, header_timeout=120) as (url, _):
        held = [socket.create_connection(address(url)) for _ in range(4)]
        try:
            response = requests.get(f"{url}/healthz", timeout=30)
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            refusal = wire.decode(response.content).header
            assert refusal["code"] == "overloaded" and refusal["retryable"] and refusal["retry_after"] > 0
            with pytest.raises(InvalidStatus) as caught:
                ws(url)
            assert caught.value.response.status_code == 503
        finally:
            for sock in held:
                sock.close()
        eventually(lambda: requests.get(f"{url}/healthz", timeout=30).status_code == 200, what="room again")


def test_half_headers_and_silent_session_sockets_are_closed_a_socket_with_a_session_is_kept(span, reference):
    """The issue's case: 20 connections sending half a header and 20 idle session WebSockets, all open after 20 s."""
    with running(span, header_timeout=2, idle_connection_timeout=2) as (url, _):
        half = []
        for _ in range(20):
            sock = socket.create_connection(address(url))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            half.append(sock)
        silent = [ws(url) for _ in range(20)]
        with ws(url) as holder:
            session = open_session(holder)
            try:
                assert all(closed_by_peer(sock, 30) for sock in half), "a half-sent header kept its connection"
                for sock in silent:
                    with pytest.raises(ConnectionClosed):
                        sock.recv(timeout=30)
            finally:
                for sock in half:
                    sock.close()
                for sock in silent:
                    sock.close()
            # The socket holding a session stayed open through all of that, and its session works.
            hidden = torch.randn(1, 3, HIDDEN)
            reply = call(holder, {"kind": "step", "session": session}, {"hidden": hidden})
            torch.testing.assert_close(reply.tensors["hidden"], reference.forward(hidden), **EXACT)


def test_sessions_per_connection_and_per_address_are_capped(span):
    with running(span, max_sessions_per_connection=2, max_sessions_per_address=3) as (url, _):
        with ws(url) as first, ws(url) as second:
            sessions = [open_session(first), open_session(first)]
            refusal = expect_error(call(first, {"kind": "open", "start": 0, "end": 2, "max_length": 8}), "overloaded",
                                   "per connection")
            assert refusal["retryable"] and refusal["retry_after"] > 0
            open_session(second)
            expect_error(call(second, {"kind": "open", "start": 0, "end": 2, "max_length": 8}), "overloaded",
                         "per address")
            assert call(first, {"kind": "close", "session": sessions[0]}).kind == "closed"
            open_session(second)  # room again for this address


# ---- item 2: stateless requests in flight ---------------------------------------------------------------------
def forward_body(tokens: int, seed: int = 0) -> tuple[bytes, torch.Tensor]:
    hidden = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return wire.encode({"kind": "forward", "start": 0, "end": 2}, {"hidden": hidden}), hidden


def test_forwards_in_flight_are_bounded_in_count(span, reference):
    body, hidden = forward_body(3)
    with running(span, max_queued_requests=1) as (url, _):
        slow = socket.create_connection(address(url))
        slow.sendall(post_head("/v1/forward", len(body)) + body[:10])  # admitted, its body still coming
        refused = []

        def refused_now() -> bool:
            response = requests.post(f"{url}/v1/forward", data=body, timeout=60)
            refused.append(response)
            return response.status_code == 503

        eventually(refused_now, what="a second forward refused")
        assert refused[-1].headers["Retry-After"] == "1"
        assert wire.decode(refused[-1].content).header["code"] == "overloaded"
        slow.sendall(body[10:])
        status, reply = read_response(slow)
        slow.close()
        assert status == 200
        torch.testing.assert_close(wire.decode(reply).tensors["hidden"], reference.forward(hidden), **EXACT)
        assert requests.post(f"{url}/v1/forward", data=body, timeout=60).status_code == 200


def test_forwards_in_flight_are_bounded_in_bytes(span):
    big, _ = forward_body(1000)  # 2.3 MB
    small, _ = forward_body(400)  # 0.9 MB
    with running(span, max_queued_bytes=3 * 1024**2) as (url, _):
        slow = socket.create_connection(address(url))
        slow.sendall(post_head("/v1/forward", len(big)) + big[:10])
        eventually(lambda: requests.post(f"{url}/v1/forward", data=small, timeout=60).status_code == 503,
                   what="a forward past the byte bound refused")
        huge, _ = forward_body(1500)  # 3.5 MB: more than the whole bound, never fits
        response = requests.post(f"{url}/v1/forward", data=huge, timeout=60)
        assert response.status_code == 413 and wire.decode(response.content).header["code"] == "too_large"
        slow.close()
        eventually(lambda: requests.post(f"{url}/v1/forward", data=small, timeout=60).status_code == 200,
                   what="room again once the slow request left")


def test_a_body_that_does_not_arrive_in_time_is_answered_400(span):
    body, _ = forward_body(3)
    with running(span, body_timeout=2) as (url, _):
        slow = socket.create_connection(address(url))
        slow.sendall(post_head("/v1/forward", len(body)) + body[:10])
        status, reply = read_response(slow)
        slow.close()
        assert status == 400 and "did not arrive" in wire.decode(reply).header["message"]


# ---- item 6: malformed frames and over-limit bodies -------------------------------------------------------------
HUGE_INTEGER = b"9" * 5000  # Python refuses to parse more than 4300 digits: it must be a bad_request all the same


def malformed_frames(kind: str, fields: str) -> list[bytes | str]:
    return [
        frame_with_header(b'{"kind": "%s", %s, "request_id": %s}' % (kind.encode(), fields.encode(), HUGE_INTEGER)),
        frame_with_header(b'{"kind": "%s", %s, "session": %s}' % (kind.encode(), fields.encode(), HUGE_INTEGER)),
        b"garbage",
        frame_with_header(b"[1, 2]"),
        frame_with_header(b'{"kind": "%s", "tensors": [{"name": "hidden", "dtype": "float32", "shape": [%s]}]}'
                          % (kind.encode(), HUGE_INTEGER)),
        "a text frame",
    ]


def test_every_malformed_frame_gets_an_error_frame_and_the_connection_stays(span):
    with running(span) as (url, _):
        with ws(url) as session_socket:
            for data in malformed_frames("open", '"start": 0, "end": 2, "max_length": 8'):
                expect_error(call(session_socket, raw=data), "bad_request")
            open_session(session_socket)  # still the same connection
        with ws(url, "/v1/push") as push_socket:
            for data in malformed_frames("push", '"key": "kkkkkkkkkkkkkkkkkkkk", "position": 0'):
                expect_error(call(push_socket, raw=data), "bad_request")
            unknown = {"kind": "push", "session": 424242, "key": "k" * 32, "request_id": 1, "position": 0}
            expect_error(call(push_socket, unknown, {"hidden": torch.zeros(1, 1, HIDDEN)}), "not_found")


@pytest.mark.parametrize("path", ["/v1/forward", "/v1/backward"])
def test_malformed_http_bodies_are_400_and_oversized_ones_413_never_500(span, path):
    with running(span, max_message_bytes=1024**2) as (url, _):
        kind = path.removeprefix("/v1/")
        for data in [*malformed_frames(kind, '"start": 0, "end": 2')[:-1], b""]:
            response = requests.post(f"{url}{path}", data=data, timeout=60)
            assert response.status_code == 400, (data[:80], response.status_code)
            assert wire.decode(response.content).header["code"] == "bad_request"
        oversized = wire.encode({"kind": kind, "start": 0, "end": 2}, {"hidden": torch.zeros(1, 600, HIDDEN)})
        response = requests.post(f"{url}{path}", data=oversized, timeout=60)  # 1.4 MB, declared
        assert response.status_code == 413 and wire.decode(response.content).header["code"] == "too_large"
        response = requests.post(f"{url}{path}", data=iter([oversized[:2**19], oversized[2**19:]]), timeout=60)  # chunked
        assert response.status_code == 413 and wire.decode(response.content).header["code"] == "too_large"
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


# ---- item 4: the weights digest ---------------------------------------------------------------------------------
def test_the_weights_digest_is_computed_once_per_weights_version(span):
    with running(span) as (url, _):
        before = span.digests_computed
        digests: list[str] = []

        def ask() -> None:
            digests.append(requests.get(f"{url}/v1/weights-digest", timeout=120).json()["sha256"])

        askers = [threading.Thread(target=ask) for _ in range(6)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        assert len(digests) == 6 and len(set(digests)) == 1
        assert span.digests_computed - before <= 1  # one computation at a time, then the cached one
        weight = next(p for name, p in span.base.named_parameters() if name.endswith("q_proj.weight"))
        with torch.no_grad():
            weight.neg_()  # written in place: a new weights version
        try:
            changed = requests.get(f"{url}/v1/weights-digest", timeout=120).json()["sha256"]
        finally:
            with torch.no_grad():
                weight.neg_()
        assert changed != digests[0]
        assert requests.get(f"{url}/v1/weights-digest", timeout=120).json()["sha256"] == digests[0]
        assert span.digests_computed - before == 3


def test_a_digest_of_the_same_weights_is_the_same_bytes_hashed(span):
    """The digest is SHA-256 over names and raw bytes, copied off the device chunk by chunk (any device)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted([*span.base.named_parameters(), *span.base.named_buffers()], key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert span.weights_digest() == digest.hexdigest()


def test_info_lists_the_new_limits(span):
    with running(span, max_connections=17) as (url, _):
        limits = requests.get(f"{url}/info", timeout=30).json()["limits"]
        assert limits["max_connections"] == 17 and limits["compute_memory_bytes"] > 0
        assert json.dumps(limits)


def test_admission_of_stateless_requests_is_a_pure_decision():
    from llmswarm_node.admission import InFlight, refusal

    assert refusal(0, 0, 100, max_requests=2, max_bytes=1000) is None
    assert refusal(2, 0, 100, max_requests=2, max_bytes=1000).code == "overloaded"
    assert refusal(1, 950, 100, max_requests=2, max_bytes=1000).code == "overloaded"
    never = refusal(0, 0, 1001, max_requests=2, max_bytes=1000)
    assert never.code == "too_large" and not never.retryable
    in_flight = InFlight(max_requests=1, max_bytes=1000)
    with in_flight.holding(600):
        assert (in_flight.requests, in_flight.bytes) == (1, 600)
        with pytest.raises(Exception, match="in flight"):
            with in_flight.holding(10):
                pass
    assert (in_flight.requests, in_flight.bytes) == (0, 0)

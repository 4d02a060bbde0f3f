"""A blocking WebSocket connection driven from the calling thread.

The client talks to a server's session endpoint in strict request/reply turns, so it has
no use for a background reader: ``recv`` reads the socket itself. websockets' own
blocking client runs a reader thread per connection, and every reply then costs two
thread wake-ups (reader, then caller) instead of one; on a 2-core machine running the
servers too, that is a measurable part of each hop. The WebSocket protocol itself (framing,
masking, handshake, ping replies, closing) is websockets' sans-I/O ``ClientProtocol``.

Pings from the server are answered whenever the connection is read; the servers do not
ping session connections (an idle client would otherwise be cut off between turns).
"""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

READ_BYTES = 1 << 20


class ConnectionClosed(ConnectionError):
    """The server closed the connection (or it broke)."""


class Connection:
    """``Connection(url, ...)`` opens the connection (handshake included); then ``send``, ``recv``, ``close``."""

    def __init__(self, url: str, *, open_timeout: float, max_size: int, headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        self._protocol = ClientProtocol(parse_uri(url), max_size=max_size)
        self._events: list[Frame | Response] = []
        sock = socket.create_connection((host, port), timeout=open_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure:
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
            self._sock = sock
            request = self._protocol.connect()
            for name, value in (headers or {}).items():
                request.headers[name] = value
            self._protocol.send_request(request)
            self._flush()
            self._handshake(time.monotonic() + open_timeout)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, deadline: float) -> None:
        while True:
            for index, event in enumerate(self._events):
                if isinstance(event, Response):
                    del self._events[: index + 1]
                    if self._protocol.handshake_exc is not None:
                        raise self._protocol.handshake_exc
                    return
            self._read(deadline)

    def _flush(self) -> None:
        data = self._protocol.data_to_send()
        if data:
            self._sock.sendall(b"".join(data))

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from the server in time")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(READ_BYTES)
        except TimeoutError:
            raise TimeoutError("no reply from the server in time") from None
        if data:
            self._protocol.receive_data(data)
        else:
            self._protocol.receive_eof()
        self._flush()  # pong replies, the closing handshake
        events = self._protocol.events_received()
        if not data and not events:
            raise ConnectionClosed("the server closed the connection")
        self._events.extend(events)  # type: ignore[arg-type]

    def send(self, message: bytes) -> None:
        self._protocol.send_binary(message)
        self._flush()

    def recv(self, timeout: float) -> bytes | str:
        """The next message (bytes, or str for a text message)."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        opcode: Opcode | None = None
        while True:
            while self._events:
                frame = self._events.pop(0)
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode in (Opcode.BINARY, Opcode.TEXT):
                    opcode, parts = frame.opcode, [frame.data]
                elif frame.opcode is Opcode.CONT and opcode is not None:
                    parts.append(frame.data)
                elif frame.opcode is Opcode.CLOSE:
                    # The closing handshake may not be over yet (the peer waits for our close frame): what it sent.
                    raise ConnectionClosed(f"the server closed the connection: {self._protocol.close_rcvd}")
                else:
                    continue  # ping (answered by the protocol) or pong
                if frame.fin:
                    data = b"".join(parts)
                    return data.decode() if opcode is Opcode.TEXT else data
            self._read(deadline)

    def close(self) -> None:
        try:
            self._protocol.send_close()
            self._flush()
        except Exception:  # noqa: BLE001 - closing a broken connection: nothing more to do
            pass
        finally:
            self._sock.close()

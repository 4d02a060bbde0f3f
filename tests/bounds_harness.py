"""A block server in this process (on its own event loop thread), and misbehaving peers for it: what the tests of
the server's bounds (connections, timeouts, queues, compute memory, push) run against."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord
from llmswarm_node.server import BlockServer, ServerOptions, serve
from llmswarm_node.sessions import ServerLimits
from llmswarm_node.span import SpanRunner

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextmanager
def running(span: SpanRunner, swarm: str | None = None, push_timeout: float | None = None,
            server_id: str | None = None, identity_file: str | None = None, token: str | None = None,
            authority_key: str | None = None, **limits: Any) -> Iterator[tuple[str, BlockServer]]:
    """A BlockServer over `span` with these ServerLimits, serving on 127.0.0.1 until the block ends."""
    if push_timeout is not None:
        limits["push_timeout"] = push_timeout
    options = ServerOptions(model_name="smollm2", limits=ServerLimits(**limits), swarm=swarm, drain_timeout=0.5,
                            server_id=server_id, identity_file=identity_file, token=token, authority_key=authority_key)
    server = BlockServer(span, options)
    server.set_throughput(1.0)
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        started["loop"], started["stop"] = asyncio.get_running_loop(), stop
        task = asyncio.create_task(serve(server, "127.0.0.1", 0, stop))
        while server.node.state != "online" and not task.done():
            await asyncio.sleep(0.05)
        ready.set()
        await task

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="block-server", daemon=True)
    thread.start()
    assert ready.wait(120), "the server did not start"
    try:
        yield server.node.url, server
    finally:
        started["loop"].call_soon_threadsafe(started["stop"].set)
        thread.join(60)


def eventually(condition: Callable[[], bool], seconds: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {seconds:.0f} s"
        time.sleep(0.1)


def closed_by_peer(sock: socket.socket, seconds: float) -> bool:
    """Whether the other end closes `sock` within `seconds` (whatever it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


class DeafPeer:
    """A TCP server that completes a WebSocket handshake (or, with `answer=False`, never answers it) and then never
    reads again: a peer that stopped reading."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room: a send fills it soon
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.answer:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                           if line.lower().startswith(b"sec-websocket-key:"))
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


class FakeRouteMap:
    """A route map listing `urls` (announcements accepted and dropped); with `hang`, /v1/routes never answers."""

    def __init__(self, urls: list[str], hang: bool = False) -> None:
        self.urls = urls
        self.hang = hang
        self.released = threading.Event()
        self.reads = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.reads += 1
                if outer.hang:
                    outer.released.wait(600)
                    return
                servers = [ServerRecord(id=f"peer-{i}", url=url, start=0, end=2, state="online")
                           for i, url in enumerate(outer.urls)]
                routes = RouteMap(model=ModelInfo(name="smollm2", num_blocks=30, hidden_size=576), version=1,
                                  servers=servers)
                self._reply(routes.model_dump_json().encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(json.dumps({"ok": True}).encode())

            def do_DELETE(self) -> None:
                self._reply(b"{}")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.http.shutdown()
        self.http.server_close()

"""A server behind NAT serves through its route map's relay (llmswarm_core/relay.py): the server's side.

The agent keeps one control WebSocket open to the route map (``/v1/relay/attach``, signed with the
server's key) and learns the address the server is listed at. For each relayed connection the route
map sends a one-use token; the agent dials a tunnel with it (``/v1/relay/accept``) and carries what
comes through to the server's own listening socket on this host, so every limit and check of the
server (credentials, connection and session caps, message sizes) applies to relayed traffic as to any
other. A lost control socket is dialled again with back-off; the server's address does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from llmswarm_core import relay
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.relay import RelayAttached, RelayOpen, RelayReply, RelayRequest
from llmswarm_core.routemap_client import auth_headers
from llmswarm_core.security import client_ssl_context

log = logging.getLogger("llmswarm.node")

RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off between attempts to attach
ENVELOPE_TIMEOUT = 30.0  # seconds the route map has to send a tunnel's request once it is dialled


class RelayAgent:
    """Serves the server listening at `local_url` through the relay of the route map at `swarm`."""

    def __init__(self, swarm: str, server_id: str, identity: ServerIdentity, token: str | None, tls_ca: str | None,
                 local_url: str, max_message_bytes: int = relay.MAX_MESSAGE_BYTES) -> None:
        self.swarm = swarm.rstrip("/")
        self.server_id = server_id
        self.identity = identity
        self.local_url = local_url
        self.max_message_bytes = max_message_bytes
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(tls_ca)) if tls_ca else None
        self._remote = aiohttp.ClientSession(connector=connector, headers=auth_headers(token) or None,
                                             timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0))
        # The server itself, on this host: its own certificate need not name the loopback address.
        self._local = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False), auto_decompress=False,
                                            timeout=aiohttp.ClientTimeout(total=None, connect=10.0))
        self._control: asyncio.Task[None] | None = None
        self._tunnels: set[asyncio.Task[None]] = set()
        self.url: str | None = None

    async def start(self) -> str:
        """Attach (retrying until it succeeds), keep the control socket open in the background, and return the
        address the server is listed at."""
        attached: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._control = asyncio.create_task(self._keep_attached(attached))
        self.url = await attached
        return self.url

    async def _keep_attached(self, attached: asyncio.Future[str]) -> None:
        failures = 0
        while True:
            try:
                headers = {relay.ATTACH_HEADER: relay.attach_header(self.identity, self.server_id, time.time())}
                async with self._remote.ws_connect(self.swarm + relay.ATTACH_PATH, headers=headers, heartbeat=20.0,
                                                   max_msg_size=4096) as control:
                    hello = await relay.receive_envelope(control, RelayAttached, 10.0)
                    assert isinstance(hello, RelayAttached)
                    if not attached.done():
                        attached.set_result(hello.url)
                    elif hello.url != self.url:
                        log.warning("the relay now lists this server at %s, not %s", hello.url, self.url)
                    log.info("attached to the relay at %s: listed at %s", self.swarm, hello.url)
                    failures = 0
                    async for message in control:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        opened = RelayOpen.model_validate_json(message.data)
                        task = asyncio.create_task(self._tunnel(opened.token))
                        self._tunnels.add(task)
                        task.add_done_callback(self._tunnels.discard)
                log.warning("the relay at %s closed this server's control socket; attaching again", self.swarm)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
                log.warning("cannot attach to the relay at %s: %s", self.swarm, error or type(error).__name__)
            await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
            failures += 1

    async def _tunnel(self, token: str) -> None:
        """Dial one tunnel and carry its request (or WebSocket) to the server."""
        try:
            async with self._remote.ws_connect(f"{self.swarm}{relay.ACCEPT_PATH}?token={token}",
                                               max_msg_size=self.max_message_bytes, heartbeat=None) as tunnel:
                request = await relay.receive_envelope(tunnel, RelayRequest, ENVELOPE_TIMEOUT)
                assert isinstance(request, RelayRequest)
                if not request.websocket:
                    body = await relay.receive_body(tunnel, ENVELOPE_TIMEOUT)
                    reply, data = await relay.perform(self._local, self.local_url, request, body, self.max_message_bytes)
                    await tunnel.send_str(reply.model_dump_json())
                    await tunnel.send_bytes(data)
                    return
                upstream = await relay.open_websocket(self._local, self.local_url, request, self.max_message_bytes)
                if isinstance(upstream, tuple):
                    await tunnel.send_str(upstream[0].model_dump_json())
                    await tunnel.send_bytes(upstream[1])
                    return
                await tunnel.send_str(RelayReply(status=101).model_dump_json())
                await relay.pump(tunnel, upstream)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, ConnectionError) as error:
            log.info("a relayed connection ended: %s", error or type(error).__name__)

    async def close(self) -> None:
        for task in [self._control, *self._tunnels]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._control, *self._tunnels] if t is not None), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._remote.close()
            await self._local.close()

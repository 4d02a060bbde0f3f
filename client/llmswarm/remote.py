"""Talking to the swarm: route map, chains of servers, inference sessions, stateless forward.

The retry loop is explicit: when a server fails (connection lost, or a retryable
error), the client avoids it for a while, routes the failed span again from the route
map, opens sessions on the new servers, replays the inputs that span has seen so the
new servers rebuild their attention caches, and goes on. Spans that did not fail keep
their sessions and caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import requests
import torch
from websockets.exceptions import InvalidStatus, WebSocketException

from llmswarm.routing import Hop, NoRoute, choose_chain
from llmswarm.transport import Connection
from llmswarm_core import wire
from llmswarm_core.routemap import RouteMap
from llmswarm_core.security import client_ssl_context
from llmswarm_core.wire import DTYPES, ProtocolError

log = logging.getLogger("llmswarm.client")


class SwarmError(RuntimeError):
    """The swarm could not serve a request after every retry."""


@dataclass
class ClientConfig:
    request_timeout: float = 60.0
    connect_timeout: float = 10.0
    routes_max_age: float = 2.0  # seconds a fetched route map is trusted
    max_retries: int = 5
    ban_seconds: float = 15.0  # how long a failed server is avoided (doubles on repeated failure)
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    busy_timeout: float = 120.0  # how long to keep asking busy servers (Retry-After) for room before giving up
    wire_dtype: str = "float32"  # float16 / bfloat16 halve the bytes on the wire
    max_message_bytes: int = 64 * 1024 * 1024
    token: str | None = None  # the swarm token, sent as "Authorization: Bearer <token>" on every request
    tls_ca: str | None = None  # CA bundle (PEM) to verify https/wss servers (default: the system's)
    # torch threads for generate()'s local work (embedding, LM head, sampling over the vocabulary) in
    # the calling thread; 0 keeps torch's setting. A token's local work is bound by memory reads and op
    # dispatch: with more threads each op only adds OpenMP wake-ups (measured: 2 threads with
    # OMP_WAIT_POLICY=PASSIVE cost 8 ms more per token than 1 on a 2-core machine).
    decode_threads: int = 1
    # A session's step goes to its first server with the rest of the chain, and each server pushes its
    # output straight to the next (see llmswarm_node/push.py): one client round trip per step, not per hop.
    push: bool = True

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


_TRANSPORT_ERRORS = (OSError, WebSocketException, requests.RequestException, TimeoutError)


class SwarmClient:
    """Route map reader, round-trip-time meter and server ban list, shared by sessions."""

    def __init__(self, swarm: str, config: ClientConfig | None = None) -> None:
        self.url = swarm.rstrip("/")
        self.config = config or ClientConfig()
        self.http = requests.Session()
        self.http.headers.update(self.config.auth_headers())
        # Passed on every call: requests lets $REQUESTS_CA_BUNDLE override a session's own `verify`.
        self.verify: str | bool = self.config.tls_ca or True
        self.ssl_context = client_ssl_context(self.config.tls_ca)
        self._routes: RouteMap | None = None
        self._fetched = 0.0
        self._rtt: dict[str, float] = {}
        self._banned: dict[str, tuple[float, float]] = {}  # id -> (until, last failure ban length)
        self._busy: set[str] = set()  # ids avoided only because they said "busy, retry after"
        self._lock = threading.Lock()
        self._hops: dict[str, tuple[int, float]] = {}  # server id -> (inference steps, seconds from send to output)

    def routes(self, refresh: bool = False) -> RouteMap:
        with self._lock:
            fresh = time.monotonic() - self._fetched < self.config.routes_max_age
            if self._routes is not None and fresh and not refresh:
                return self._routes
        try:
            response = self.http.get(f"{self.url}/v1/routes", timeout=self.config.connect_timeout, verify=self.verify)
            if response.status_code == 401:
                raise SwarmError(f"the route map at {self.url} refused the swarm token")
            response.raise_for_status()
            routes = RouteMap.model_validate_json(response.content)
        except requests.RequestException as error:
            raise SwarmError(f"cannot read the route map at {self.url}: {error}") from error
        with self._lock:
            self._routes, self._fetched = routes, time.monotonic()
        return routes

    def rtt(self, server_id: str, url: str) -> float:
        """Round-trip time to a server's /healthz (best of two), measured once."""
        if server_id not in self._rtt:
            best = float("inf")
            for _ in range(2):
                began = time.perf_counter()
                try:
                    self.http.get(f"{url}/healthz", timeout=self.config.connect_timeout, verify=self.verify).raise_for_status()
                except requests.RequestException:
                    best = float("inf")
                    break
                best = min(best, time.perf_counter() - began)
            self._rtt[server_id] = best if best != float("inf") else 1.0
        return self._rtt[server_id]

    def note_hop(self, server_id: str, seconds: float) -> None:
        with self._lock:
            steps, total = self._hops.get(server_id, (0, 0.0))
            self._hops[server_id] = (steps + 1, total + seconds)

    def hop_latency(self) -> dict[str, tuple[int, float]]:
        """Per server: (inference steps, mean seconds from sending a step to its output) seen by this client."""
        with self._lock:
            return {server_id: (steps, total / steps) for server_id, (steps, total) in self._hops.items()}

    def ban(self, server_id: str, seconds: float | None = None) -> None:
        """Avoid a server: for `seconds` (a busy server's Retry-After), else for ban_seconds, doubling each time
        it fails again after a ban ran out (several sessions seeing the same failure ban it once)."""
        now = time.monotonic()
        with self._lock:
            until, last = self._banned.get(server_id, (0.0, self.config.ban_seconds / 2))
            if seconds is None and until > now:
                return
            length = seconds if seconds is not None else min(last * 2, 300.0)
            self._banned[server_id] = (now + length, last if seconds is not None else length)
            if seconds is not None:
                self._busy.add(server_id)
            else:
                self._busy.discard(server_id)
        log.warning("avoiding server %s for %.1f s", server_id, length)

    def next_unban(self) -> float | None:
        """Seconds until the first server avoided for being busy may be tried again, or None if none is."""
        now = time.monotonic()
        with self._lock:
            waits = [until - now for sid, (until, _) in self._banned.items() if until > now and sid in self._busy]
        return min(waits) if waits else None

    def banned(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {sid for sid, (until, _) in self._banned.items() if until > now}

    def chain(self, start: int, end: int, exclude: Iterable[str] = ()) -> list[Hop]:
        """The cheapest chain over [start, end), refreshing the map once if nothing fits."""
        avoid = self.banned() | set(exclude)
        for refresh in (False, True):
            routes = self.routes(refresh=refresh)
            candidates = [s for s in routes.servers if s.state == "online" and s.id not in avoid]
            rtt = {s.id: self.rtt(s.id, s.url) for s in candidates if s.start < end and s.end > start}
            try:
                return choose_chain(candidates, start, end, rtt)
            except NoRoute:
                if refresh:
                    raise
        raise AssertionError("unreachable")

    def backoff(self, attempt: int, at_least: float | None = None) -> None:
        time.sleep(max(at_least or 0.0, min(self.config.backoff_base * 2**attempt, self.config.backoff_max)))

    def close(self) -> None:
        self.http.close()


@dataclass
class _History:
    """Inputs a span has seen in this session, to replay on a replacement server."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor | None] = field(default_factory=list)


class SpanSession:
    """One server's inference session over blocks [start, end) of the chain."""

    def __init__(self, client: SwarmClient, hop: Hop, max_length: int, batch_size: int, adapter: str | None = None) -> None:
        self.client = client
        self.hop = hop
        self.server_id = hop.server.id
        self.start, self.end = hop.start, hop.end
        self._ids = iter(range(1, 2**31))
        self.position = 0  # tokens this server's session holds
        self._sent_at = 0.0
        ws_url = hop.server.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/session"
        config = client.config
        try:
            self.socket = Connection(
                ws_url, open_timeout=config.connect_timeout, max_size=config.max_message_bytes + 64 * 1024,
                headers=config.auth_headers(), ssl_context=client.ssl_context if ws_url.startswith("wss://") else None,
            )
        except InvalidStatus as error:
            if error.response.status_code == 401:
                raise SwarmError(f"server {hop.server.id} refused the swarm token") from None
            raise
        try:
            header: dict[str, object] = {
                "kind": "open", "start": self.start, "end": self.end, "max_length": max_length,
                "batch_size": batch_size, "wire_dtype": config.wire_dtype,
            }
            if adapter is not None:
                header["adapter"] = adapter
            reply = self._call(header)
        except BaseException:
            self.socket.close()
            raise
        self.session = int(reply.header["session"])
        key = reply.header.get("push_key")
        self.push_key = key if isinstance(key, str) and 16 <= len(key) <= 64 else None  # None: the server cannot take pushes

    def _call(self, header: dict[str, object], tensors: dict[str, torch.Tensor] | None = None) -> wire.Frame:
        return self._receive(self._send(header, tensors))

    def _send(self, header: dict[str, object], tensors: dict[str, torch.Tensor] | None = None,
              request_id: int | None = None) -> int:
        request_id = next(self._ids) if request_id is None else request_id
        self.socket.send(wire.encode({**header, "request_id": request_id}, tensors))
        return request_id

    def reserve_request(self) -> int:
        """A request id for a step that the previous server will push here (see push_target)."""
        return next(self._ids)

    def push_target(self, request_id: int, then: dict[str, object] | None) -> dict[str, object]:
        """Where the previous server hands this hop's input: this session, at its current position;
        `then` goes on from here."""
        assert self.push_key is not None
        target: dict[str, object] = {"url": self.hop.server.url, "session": self.session, "key": self.push_key,
                                     "request_id": request_id, "position": self.position}
        if then is not None:
            target["push"] = then
        return target

    def _receive(self, request_id: int) -> wire.Frame:
        data = self.socket.recv(timeout=self.client.config.request_timeout)
        if not isinstance(data, bytes):
            raise ProtocolError("bad_request", "server sent a text frame")
        frame = wire.raise_if_error(wire.decode(data, wire.WireLimits(max_tensor_bytes=self.client.config.max_message_bytes)))
        if frame.header.get("request_id") != request_id:
            raise ProtocolError("internal", f"reply to request {frame.header.get('request_id')}, expected {request_id}")
        return frame

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return self.receive_step(self.send_step(hidden, attention_mask, position_ids, prompts=prompts), hidden)

    def send_step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                  push: dict[str, object] | None = None, request_id: int | None = None,
                  prompts: torch.Tensor | None = None) -> int:
        """Send a step without waiting for its output (see receive_step); returns the request id.
        With `push` (a push_target), the server hands its output on to the next server too; `prompts`
        ([this span's blocks, batch, prefix, hidden]) are deep prompts, with a session's first step only.

        A mask of all ones and the default positions (past, past + 1, ...) are left out: the
        server assumes exactly those, and each costs work on both sides of every hop."""
        attention_mask = None if attention_mask is None else attention_mask.cpu()
        position_ids = None if position_ids is None else position_ids.cpu()
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is not None and _default_positions(position_ids, self.position):
            position_ids = None
        tensors = {"hidden": hidden.to(DTYPES[self.client.config.wire_dtype])}
        if attention_mask is not None:
            tensors["attention_mask"] = attention_mask.to(torch.int64)
        if position_ids is not None:
            tensors["position_ids"] = position_ids.to(torch.int64)
        if prompts is not None:
            tensors["prompts"] = prompts.detach().to(DTYPES[self.client.config.wire_dtype])
        self._sent_at = time.perf_counter()
        header: dict[str, object] = {"kind": "step", "session": self.session}
        if push is not None:
            header["push"] = push
        return self._send(header, tensors, request_id)

    def receive_step(self, request_id: int, hidden: torch.Tensor) -> torch.Tensor:
        """The output of the step sent as `request_id` with input `hidden`."""
        return self.receive_output(request_id, hidden)[0]

    def receive_output(self, request_id: int, hidden: torch.Tensor, pushed_since: float | None = None) -> tuple[torch.Tensor, bool]:
        """(output, whether the server pushed it on to the next server) of step `request_id` with input `hidden`;
        `pushed_since`: the step was pushed here, and its input was at hand then."""
        frame = self._receive(request_id)
        output = frame.tensors.get("hidden")
        if output is None or list(output.shape) != list(hidden.shape):
            raise ProtocolError("internal", f"server {self.server_id} returned a malformed output")
        self.position += hidden.shape[1]
        self.client.note_hop(self.server_id, time.perf_counter() - (self._sent_at if pushed_since is None else pushed_since))
        return output.to(hidden.device, hidden.dtype), frame.header.get("pushed") is True

    def close(self) -> None:
        try:
            self._call({"kind": "close", "session": self.session})
        except (*_TRANSPORT_ERRORS, ProtocolError):
            pass
        finally:
            self.socket.close()


def _default_positions(position_ids: torch.Tensor, past: int) -> bool:
    new = position_ids.shape[-1]
    return bool((position_ids == torch.arange(past, past + new)).all())


class InferenceSession:
    """A chain of server sessions covering every block, stepped one chunk of tokens at a time.

    ``step`` takes hidden states of the new tokens [batch, new, hidden], the attention
    mask of past and new tokens [batch, past + new] and the new tokens' position ids,
    and returns the hidden states after the last block.
    """

    def __init__(self, client: SwarmClient, num_blocks: int, max_length: int, batch_size: int = 1,
                 adapter: str | None = None) -> None:
        self.client = client
        self.adapter = adapter
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self._spans: list[SpanSession] = []
        self._history: list[_History] = []
        self._masks: list[torch.Tensor | None] = []
        self._prompts: torch.Tensor | None = None  # deep prompts [blocks, batch, prefix, hidden] of the first step
        self._closed = False
        self._spans, self._history = self._open_chain(0, num_blocks, exclude=())

    def _open_chain(self, start: int, end: int, exclude: Iterable[str]) -> tuple[list[SpanSession], list[_History]]:
        """Open sessions over [start, end): a busy server is avoided for its Retry-After while others are
        tried at once; when every server that could serve is busy, wait for the first to free up
        (at most ``busy_timeout`` in all); a failing server is avoided and retried with backoff."""
        failures, began = 0, time.monotonic()
        while True:
            opened: list[SpanSession] = []
            try:
                for hop in self.client.chain(start, end, exclude):
                    try:
                        opened.append(SpanSession(self.client, hop, self.max_length, self.batch_size, self.adapter))
                    except ProtocolError as error:
                        if not error.retryable:
                            raise SwarmError(f"server {hop.server.id} refused blocks [{hop.start}, {hop.end}): {error}") from error
                        self.client.ban(hop.server.id, error.retry_after)
                        raise
                    except _TRANSPORT_ERRORS:
                        self.client.ban(hop.server.id)
                        raise
                return opened, [_History() for _ in opened]
            except (*_TRANSPORT_ERRORS, ProtocolError, NoRoute) as error:
                for span in opened:
                    span.close()
                busy = isinstance(error, ProtocolError) and error.retry_after is not None
                waiting = isinstance(error, NoRoute) and self.client.next_unban() is not None
                if busy or waiting:
                    if time.monotonic() - began > self.client.config.busy_timeout:
                        raise SwarmError(f"every server for blocks [{start}, {end}) stayed busy for "
                                         f"{self.client.config.busy_timeout:.0f} s: {error}") from error
                    if waiting:
                        time.sleep(min(self.client.config.backoff_max, max(0.05, self.client.next_unban() or 0.0)))
                    continue
                failures += 1
                if failures > self.client.config.max_retries:
                    raise SwarmError(f"cannot open a session over blocks [{start}, {end}): {error}") from error
                self.client.backoff(failures)

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        """(server id, start, end) of each hop currently used."""
        return [(s.server_id, s.start, s.end) for s in self._spans]

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """`prompts`: deep prompts [every block, batch, prefix, hidden] (deep prompt tuning), with the first step
        only: each block adds its prompt to the first `prefix` positions, whose cached keys and values keep them."""
        self._check_step(hidden)
        if prompts is not None:
            if self.position != 0:
                raise SwarmError("deep prompts come with a session's first step only")
            if prompts.shape[0] != self.num_blocks:
                raise SwarmError(f"deep prompts are for {prompts.shape[0]} blocks, the model has {self.num_blocks}")
            self._prompts = prompts.detach().cpu()
        output = self._advance(0, hidden, attention_mask, position_ids)
        self._finish_step(hidden, attention_mask)
        return output

    def _span_prompts(self, span: SpanSession, step: int) -> torch.Tensor | None:
        """The deep prompts of `span`'s blocks for the session's step number `step` (the first step only)."""
        return self._prompts[span.start:span.end] if self._prompts is not None and step == 0 else None

    def _check_step(self, hidden: torch.Tensor) -> None:
        if self._closed:
            raise SwarmError("the inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(f"{self.position + hidden.shape[1]} tokens exceed the session's max_length {self.max_length}")

    def _advance(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, failure: Exception | None = None) -> torch.Tensor:
        """Run a step from hop `index` to the end of the chain, failing over where a server fails
        (`failure`: hop `index` has already failed with it)."""
        while index < len(self._spans):
            if failure is not None:
                if isinstance(failure, ProtocolError) and not failure.retryable:
                    raise failure
                self._replace(index, failure)
                failure = None
            step = len(self._masks)
            if self._can_push(index) and self._span_prompts(self._spans[index], step) is None:
                hidden, index, failure = self._pushed(index, hidden, attention_mask, position_ids)
                continue
            try:
                span = self._spans[index]
                output = span.step(hidden, attention_mask, position_ids, self._span_prompts(span, step))
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                failure = error
                continue
            hidden = self._record(index, hidden, output, position_ids)
            index += 1
        return hidden

    def _can_push(self, index: int) -> bool:
        rest = self._spans[index + 1:]
        return self.client.config.push and bool(rest) and all(span.push_key is not None for span in rest)

    def _pushed(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> tuple[torch.Tensor, int, Exception | None]:
        """Send a step to hop `index` with the rest of the chain (see _PushedStep). Returns (hidden states
        reached, the hop they are for, the error that hop failed with)."""
        run = _PushedStep(self, index, hidden, attention_mask, position_ids)
        try:
            run.send()
            while not run.done:
                run.receive()
        except (*_TRANSPORT_ERRORS, ProtocolError) as error:
            run.abandon()
            return run.hidden, run.index, error
        return run.hidden, run.index, None

    def _record(self, index: int, hidden: torch.Tensor, output: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        self._history[index].hidden.append(hidden)
        self._history[index].positions.append(position_ids)
        return output

    def _finish_step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self._masks.append(attention_mask)
        self.position += hidden.shape[1]

    def _replace(self, index: int, error: Exception, ban: bool = True) -> None:
        """Route blocks of the failed hop again and replay their inputs on the new servers
        (`ban=False`: the hop did not fail itself; its server may serve them again, in a new session)."""
        failed = self._spans[index]
        if ban:
            log.warning("server %s failed on blocks [%d, %d): %s; failing over", failed.server_id, failed.start,
                        failed.end, error)
            self.client.ban(failed.server_id)
        failed.socket.close()
        history = self._history[index]
        for attempt in range(self.client.config.max_retries + 1):
            spans, histories = self._open_chain(failed.start, failed.end, exclude=(failed.server_id,) if ban else ())
            try:
                inputs = history.hidden
                for span, own in zip(spans, histories, strict=True):
                    outputs = []
                    for step, (hidden, positions) in enumerate(zip(inputs, history.positions, strict=True)):
                        outputs.append(span.step(hidden, self._masks[step], positions, self._span_prompts(span, step)))
                        own.hidden.append(hidden)
                        own.positions.append(positions)
                    inputs = outputs
                break
            except (*_TRANSPORT_ERRORS, ProtocolError) as retry_error:
                for span in spans:
                    span.close()
                if attempt == self.client.config.max_retries:
                    raise SwarmError(f"failover of blocks [{failed.start}, {failed.end}) failed: {retry_error}") from retry_error
                self.client.backoff(attempt)
        self._spans[index:index + 1] = spans
        self._history[index:index + 1] = histories

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for span in self._spans:
                span.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PushedStep:
    """One session's step from hop `index` on: sent to that hop with the rest of the chain, each server
    pushes its output to the next and answers the client, which reads every hop's output in turn.

    A server that could not push says so; the client then sends that output on itself. When a hop
    fails, the hops after it may or may not have been handed this step: abandon() starts their
    sessions over (replayed on the same or other servers), so no cache ever holds a step twice."""

    def __init__(self, session: InferenceSession, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> None:
        self.session, self.index, self.hidden = session, index, hidden
        self.attention_mask, self.position_ids = attention_mask, position_ids
        spans = session._spans[index:]
        self._spans = spans
        self._request_ids = [0] + [span.reserve_request() for span in spans[1:]]
        self._targets: list[dict[str, object] | None] = [None] * (len(spans) + 1)
        for k in range(len(spans) - 1, 0, -1):
            self._targets[k] = spans[k].push_target(self._request_ids[k], self._targets[k + 1])
        self._k = 0  # the hop whose output comes next
        self.pushed = False  # the previous hop pushed its output to hop _k
        self._since = 0.0

    @property
    def done(self) -> bool:
        return self._k == len(self._spans)

    def send(self) -> None:
        """Send hop _k its input (the first hop, or one the previous server could not push to)."""
        k = self._k
        self._request_ids[k] = self._spans[k].send_step(self.hidden, self.attention_mask, self.position_ids,
                                                        self._targets[k + 1], self._request_ids[k] or None)

    def receive(self) -> None:
        """Read hop _k's output; send the next hop its input where this server did not push it."""
        k = self._k
        output, pushed = self._spans[k].receive_output(self._request_ids[k], self.hidden, self._since if self.pushed else None)
        self._since = time.perf_counter()
        self.hidden = self.session._record(self.index, self.hidden, output, self.position_ids)
        self.index, self._k, self.pushed = self.index + 1, k + 1, pushed
        if not self.done and not pushed:
            self.send()

    def abandon(self) -> None:
        """Hop `index` failed: restart the sessions after it (they may hold this step or not)."""
        spans = self.session._spans
        for later in reversed(range(self.index + 1, len(spans))):  # a replaced hop may become several
            self.session._replace(later, RuntimeError("an earlier hop failed during a pushed step"), ban=False)


@dataclass
class SessionStep:
    """One session's step, for step_together()."""

    session: InferenceSession
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def new_tokens(self) -> int:
        return int(self.hidden.shape[1])


def step_together(steps: list[SessionStep]) -> list[torch.Tensor | BaseException]:
    """Steps of many sessions, driven hop by hop together from this thread.

    At each hop every session's step is sent before any output is awaited, so steps that
    go to the same server arrive together and share one pass there (with push, the servers
    hand them on together; this thread sends only the first hop and reads the outputs). A
    session whose server fails leaves the group and finishes its step alone (failover and
    replay as in InferenceSession.step). Returns each step's output, or the error it ended with.
    """
    results: list[torch.Tensor | BaseException | None] = [None] * len(steps)
    hidden: list[torch.Tensor] = []
    for i, step in enumerate(steps):
        try:
            step.session._check_step(step.hidden)
        except SwarmError as error:
            results[i] = error
        hidden.append(step.hidden)
    index = [0] * len(steps)
    failed: dict[int, Exception] = {}  # session -> the error its hop ended with
    active = [i for i, r in enumerate(results) if r is None and index[i] < len(steps[i].session._spans)]
    if active and all(steps[i].session._can_push(0) for i in active):
        _push_together(steps, active, hidden, index, failed)
        active = []
    while active:
        sent: list[tuple[int, int]] = []
        for i in active:
            try:
                span = steps[i].session._spans[index[i]]
                sent.append((i, span.send_step(hidden[i], steps[i].attention_mask, steps[i].position_ids)))
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                failed[i] = error
        for i, request_id in sent:
            step = steps[i]
            try:
                output = step.session._spans[index[i]].receive_step(request_id, hidden[i])
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                failed[i] = error
                continue
            hidden[i] = step.session._record(index[i], hidden[i], output, step.position_ids)
            index[i] += 1
        active = [i for i, _ in sent if i not in failed and index[i] < len(steps[i].session._spans)]
    for i, error in failed.items():  # alone from the failed hop on, as InferenceSession.step would go
        step = steps[i]
        try:
            hidden[i] = step.session._advance(index[i], hidden[i], step.attention_mask, step.position_ids, error)
        except BaseException as final:  # noqa: BLE001 - handed to the step's own thread
            results[i] = final
    for i, step in enumerate(steps):
        if results[i] is None:
            step.session._finish_step(step.hidden, step.attention_mask)
            results[i] = hidden[i]
    return results  # type: ignore[return-value]


def _push_together(steps: list[SessionStep], active: list[int], hidden: list[torch.Tensor], index: list[int],
                   failed: dict[int, Exception]) -> None:
    """step_together() where every server can push: each session's step goes to its first server, the servers
    push it along (a server's pass serves every session whose step reached it), and this thread reads the
    outputs hop by hop. Fills `hidden` and `index` (how far each got) and `failed`."""
    runs: dict[int, _PushedStep] = {}
    for i in active:
        step = steps[i]
        run = _PushedStep(step.session, 0, hidden[i], step.attention_mask, step.position_ids)
        try:
            run.send()
        except (*_TRANSPORT_ERRORS, ProtocolError) as error:
            run.abandon()
            failed[i] = error
            continue
        runs[i] = run
    while runs:
        for i, run in list(runs.items()):
            try:
                run.receive()
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                run.abandon()
                failed[i] = error
            if run.done or i in failed:
                hidden[i], index[i] = run.hidden, run.index
                del runs[i]


@dataclass
class Trace:
    """What a stateless forward went through: each hop and the hidden states it received (for backward)."""

    hops: list[Hop] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)


class RemoteSequential:
    """Stateless forward and backward through blocks (no cache): for scoring and training.

    Both retry like inference sessions: a failing server is avoided and its blocks routed again.
    `prompts` are deep prompts [num_blocks, batch, prefix, hidden]; each hop gets its blocks' slice.
    """

    def __init__(self, client: SwarmClient, num_blocks: int, adapter: str | None = None) -> None:
        self.client = client
        self.num_blocks = num_blocks
        self.adapter = adapter

    def _call(self, kind: str, hop: Hop, tensors: dict[str, torch.Tensor | None]) -> wire.Frame:
        config = self.client.config
        wire_dtype = DTYPES[config.wire_dtype]
        payload = {}
        for name, tensor in tensors.items():
            if tensor is not None:
                payload[name] = tensor.to(wire_dtype) if tensor.is_floating_point() else tensor.to(torch.int64)
        header: dict[str, object] = {"kind": kind, "start": hop.start, "end": hop.end, "wire_dtype": config.wire_dtype}
        if self.adapter is not None:
            header["adapter"] = self.adapter
        response = self.client.http.post(
            f"{hop.server.url}/v1/{kind}", data=wire.encode(header, payload), timeout=config.request_timeout,
            headers={"Content-Type": "application/octet-stream"}, verify=self.client.verify,
        )
        if response.status_code == 401:
            raise SwarmError(f"server {hop.server.id} refused the swarm token")
        return wire.raise_if_error(wire.decode(response.content, wire.WireLimits(max_tensor_bytes=config.max_message_bytes)))

    def _forward_hop(self, hop: Hop, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, prompts: torch.Tensor | None) -> torch.Tensor:
        deep = None if prompts is None else prompts[hop.start:hop.end]
        frame = self._call("forward", hop, {"hidden": hidden, "attention_mask": attention_mask,
                                            "position_ids": position_ids, "prompts": deep})
        output = frame.tensors.get("hidden")
        if output is None or list(output.shape) != list(hidden.shape):
            raise ProtocolError("internal", f"server {hop.server.id} returned a malformed output")
        return output.to(hidden.dtype)

    def _backward_hop(self, hop: Hop, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        deep = None if prompts is None else prompts[hop.start:hop.end]
        frame = self._call("backward", hop, {"hidden": hidden, "grad_output": grad_output, "attention_mask": attention_mask,
                                             "position_ids": position_ids, "prompts": deep})
        grad_hidden = frame.tensors.get("grad_hidden")
        grad_prompts = frame.tensors.get("grad_prompts")
        if grad_hidden is None or grad_hidden.shape != hidden.shape or (deep is not None and (
                grad_prompts is None or grad_prompts.shape != deep.shape)):
            raise ProtocolError("internal", f"server {hop.server.id} returned malformed gradients")
        return grad_hidden.to(hidden.dtype), None if grad_prompts is None else grad_prompts.to(hidden.dtype)

    def _retry(self, error: Exception, hop: Hop, attempt: int, what: str) -> int:
        if isinstance(error, ProtocolError) and not error.retryable:
            raise error
        attempt += 1
        if attempt > self.client.config.max_retries:
            raise SwarmError(f"{what} over blocks [{hop.start}, {hop.end}) failed: {error}") from error
        retry_after = error.retry_after if isinstance(error, ProtocolError) else None
        self.client.ban(hop.server.id, retry_after)
        self.client.backoff(attempt, retry_after)
        return attempt

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                start: int = 0, end: int | None = None, trace: Trace | None = None) -> torch.Tensor:
        """Hidden states after blocks [start, end); `trace` records each hop's inputs for backward."""
        end = self.num_blocks if end is None else end
        at, attempt = start, 0
        while at < end:
            try:
                chain = self.client.chain(at, end)
            except NoRoute as error:
                raise SwarmError(str(error)) from error
            for hop in chain:
                try:
                    output = self._forward_hop(hop, hidden, attention_mask, position_ids, prompts)
                except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                    attempt = self._retry(error, hop, attempt, "forward")
                    break
                if trace is not None:
                    trace.hops.append(hop)
                    trace.inputs.append(hidden)
                hidden, at = output, hop.end
        return hidden

    def backward(self, trace: Trace, grad_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the first hop's inputs (and of the deep prompts), hop by hop in reverse."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        grad = grad_output
        for hop, hidden in zip(reversed(trace.hops), reversed(trace.inputs), strict=True):
            grad, grad_deep = self._backward_range(hop, hidden, grad, attention_mask, position_ids, prompts)
            if grad_prompts is not None and grad_deep is not None:
                grad_prompts[hop.start:hop.end] += grad_deep
        return grad, grad_prompts

    def _backward_range(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, prompts: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attempt = 0
        while True:
            try:
                return self._backward_hop(hop, hidden, grad, attention_mask, position_ids, prompts)
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                attempt = self._retry(error, hop, attempt, "backward")
            # The server is gone: recompute this hop's blocks on other servers, then go back through them.
            inner = Trace()
            try:
                self.forward(hidden, attention_mask, position_ids, prompts, hop.start, hop.end, inner)
                grad_prompts = None if prompts is None else torch.zeros_like(prompts[hop.start:hop.end])
                for sub, sub_hidden in zip(reversed(inner.hops), reversed(inner.inputs), strict=True):
                    grad, deep = self._backward_hop(sub, sub_hidden, grad, attention_mask, position_ids, prompts)
                    if grad_prompts is not None and deep is not None:
                        grad_prompts[sub.start - hop.start:sub.end - hop.start] += deep
                return grad, grad_prompts
            except (*_TRANSPORT_ERRORS, ProtocolError) as error:
                attempt = self._retry(error, hop, attempt, "backward")

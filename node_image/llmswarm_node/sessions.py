"""Inference sessions of one server: their attention caches, budget and expiry.

A session belongs to the connection that opened it: another connection naming its id
gets "not found", and closing the connection frees every session it opened. The one
exception is a push (session_handlers.py, /v1/push): the previous server of the client's chain
hands it a step's input, naming the session and the secret push key that the open
returned to the client alone. Each
session reserves its worst-case attention-cache size (batch x max_length tokens) at
open, so the budget is checked once, up front, and a step can never run out of room.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmswarm_core.wire import ProtocolError

if TYPE_CHECKING:
    from llmswarm_node.lora import ClientLora

RETRY_AFTER = 1.0  # seconds a refused client is told to wait


@dataclass(frozen=True)
class ServerLimits:
    """Every bound the server enforces; exceeding one is refused, never an out-of-memory crash."""

    max_sessions: int = 128
    max_length: int = 8192  # tokens per session (past + new)
    max_batch: int = 64
    max_tokens_per_request: int = 8192  # batch x new tokens in one step or forward
    max_message_bytes: int = 64 * 1024 * 1024
    kv_cache_bytes: int = 2 * 1024**3
    session_idle_timeout: float = 300.0  # seconds without a step before the cache is freed
    compute_memory_bytes: int = 2 * 1024**3  # what one pass may allocate beyond weights and caches (memory.py)
    max_sessions_per_connection: int = 32  # open sessions of one WebSocket connection
    max_sessions_per_address: int = 64  # open sessions of one client address, over all its connections
    max_connections: int = 256  # open TCP connections (HTTP and WebSocket); more are answered 503 and closed
    header_timeout: float = 10.0  # seconds to send a request's header (and between requests on a kept-alive one)
    body_timeout: float = 60.0  # seconds to send a forward's or backward's body
    idle_connection_timeout: float = 60.0  # seconds a session WebSocket holding no session may send nothing
    max_queued_requests: int = 32  # forward and backward requests in flight (being read, queued or running)
    max_queued_bytes: int = 512 * 1024**2  # their bytes
    push_timeout: float = 5.0  # seconds to hand a step to the next server before the client is told to send it


@dataclass
class Session:
    id: int
    owner: int
    start: int
    end: int
    max_length: int
    batch_size: int
    wire_dtype: str
    cache: Any
    reserved_bytes: int
    adapter: str | None = None
    address: str = ""  # the client's address (sessions per address are limited)
    lora: ClientLora | None = None  # the client's own LoRA weights, from the open (lora.py)
    position: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_step: float | None = None  # when its latest step arrived
    step_interval: float | None = None  # moving average of the time between its steps
    push_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    stepping: bool = False  # a step is running: another one for this session is refused until it ends

    def note_step(self, now: float) -> None:
        if self.last_step is not None:
            gap = now - self.last_step
            self.step_interval = gap if self.step_interval is None else 0.7 * self.step_interval + 0.3 * gap
        self.last_step = now

    def cycling(self, now: float, horizon: float) -> bool:
        """Is this session generating, its next step due within `horizon` seconds (or already here)?"""
        if self.last_step is None or self.step_interval is None:
            return False
        return now - self.last_step <= 1.5 * self.step_interval + horizon


class SessionTable:
    def __init__(self, limits: ServerLimits, kv_bytes_per_token_block: int) -> None:
        self.limits = limits
        self.kv_bytes_per_token_block = kv_bytes_per_token_block
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self._sessions.values())

    def reservation(self, start: int, end: int, batch_size: int, max_length: int) -> int:
        return batch_size * max_length * (end - start) * self.kv_bytes_per_token_block

    def tokens_left(self, num_blocks: int) -> int:
        """How many more cache tokens (for a full-span session of batch 1) fit in the budget."""
        free = self.limits.kv_cache_bytes - self.reserved_bytes
        return max(0, free // max(1, num_blocks * self.kv_bytes_per_token_block))

    def open(self, owner: int, start: int, end: int, batch_size: int, max_length: int, wire_dtype: str,
             cache: Any, adapter: str | None = None, address: str = "") -> Session:
        limits = self.limits
        self._check_client(owner, address)
        if max_length > limits.max_length:
            raise ProtocolError("too_large", f"max_length {max_length} exceeds this server's limit {limits.max_length}")
        if batch_size > limits.max_batch:
            raise ProtocolError("too_large", f"batch_size {batch_size} exceeds this server's limit {limits.max_batch}")
        if len(self._sessions) >= limits.max_sessions:
            raise ProtocolError("overloaded", f"{len(self._sessions)} sessions open, the limit is {limits.max_sessions}",
                                retry_after=RETRY_AFTER)
        need = self.reservation(start, end, batch_size, max_length)
        free = limits.kv_cache_bytes - self.reserved_bytes
        if need > limits.kv_cache_bytes:
            raise ProtocolError(
                "too_large", f"the session needs {need} cache bytes, more than this server's whole budget {limits.kv_cache_bytes}"
            )
        if need > free:
            raise ProtocolError("overloaded", f"the session needs {need} cache bytes, {free} are free", retry_after=RETRY_AFTER)
        session = Session(next(self._ids), owner, start, end, max_length, batch_size, wire_dtype, cache, need, adapter,
                          address)
        self._sessions[session.id] = session
        return session

    def _check_client(self, owner: int, address: str) -> None:
        """One client may hold only so many sessions: per connection, and per address over its connections."""
        limits = self.limits
        sessions = list(self._sessions.values())
        held = sum(1 for s in sessions if s.owner == owner)
        if held >= limits.max_sessions_per_connection:
            raise ProtocolError("overloaded", f"this connection holds {held} sessions, the limit per connection is "
                                              f"{limits.max_sessions_per_connection}", retry_after=RETRY_AFTER)
        held = sum(1 for s in sessions if s.address == address) if address else 0
        if held >= limits.max_sessions_per_address:
            raise ProtocolError("overloaded", f"{address} holds {held} sessions, the limit per address is "
                                              f"{limits.max_sessions_per_address}", retry_after=RETRY_AFTER)

    def held_by(self, owner: int) -> int:
        """How many sessions connection `owner` holds."""
        return sum(1 for s in list(self._sessions.values()) if s.owner == owner)

    def get(self, owner: int, session_id: int) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise ProtocolError("not_found", f"no session {session_id} on this connection")
        session.last_used = time.monotonic()
        return session

    def pushed(self, session_id: int, key: str) -> Session:
        """The session a push names, if `key` is its push key."""
        session = self._sessions.get(session_id)
        if session is None or not hmac.compare_digest(session.push_key.encode(), key.encode()):
            raise ProtocolError("not_found", f"no session {session_id} with that push key")
        session.last_used = time.monotonic()
        return session

    def close(self, owner: int, session_id: int) -> None:
        self.get(owner, session_id)
        del self._sessions[session_id]

    def close_owner(self, owner: int) -> int:
        doomed = [sid for sid, s in self._sessions.items() if s.owner == owner]
        for sid in doomed:
            del self._sessions[sid]
        return len(doomed)

    def cycling(self, now: float, horizon: float) -> int:
        """How many sessions are in the middle of a generation, with a step here or due within `horizon`."""
        return sum(1 for s in list(self._sessions.values()) if s.cycling(now, horizon))  # read from the compute thread

    def expire(self, now: float | None = None) -> list[int]:
        now = time.monotonic() if now is None else now
        doomed = [sid for sid, s in self._sessions.items() if now - s.last_used > self.limits.session_idle_timeout]
        for sid in doomed:
            del self._sessions[sid]
        return doomed

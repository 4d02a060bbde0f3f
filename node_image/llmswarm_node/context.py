"""What every layer of one block server shares: its options, span, sessions, scheduler, metrics and state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from llmswarm_core import wire
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import ModelInfo, ServerRecord, ServerState
from llmswarm_node.batch_policy import BatchOptions
from llmswarm_node.lora import LoraLimits, LoraStore
from llmswarm_node.metrics import ServerMetrics
from llmswarm_node.scheduler import Scheduler
from llmswarm_node.sessions import ServerLimits, SessionTable
from llmswarm_node.span import SpanRunner


@dataclass
class ServerOptions:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    swarm: str | None = None
    server_id: str | None = None  # default: the id of the server's key (identity.py)
    identity_file: str | None = None  # the server's Ed25519 key, created there on first start (None: a new key)
    limits: ServerLimits = field(default_factory=ServerLimits)
    batching: BatchOptions = field(default_factory=BatchOptions)
    lora: LoraLimits = field(default_factory=LoraLimits)  # clients' own LoRA weights
    token: str | None = None  # the swarm token, or this server's credential: required on RPCs, sent to the route map
    authority_key: str | None = None  # clients' credentials signed by this key are checked for the use role
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # CA bundle to verify an https route map
    drain_timeout: float = 30.0  # seconds open sessions may take to finish after SIGTERM
    push: bool = True  # hand step outputs straight to the next server of a client's chain (push.py)
    # Serve through the route map's relay (relay_agent.py): dial out, be listed at the route map's address, and
    # reach the other servers through it too (for a server that nobody can connect to, or that reaches no other).
    relay: bool = False


@dataclass
class Node:
    """One block server's shared state; the handlers read it, the server (server.py) builds it."""

    span: SpanRunner
    options: ServerOptions
    id: str
    metrics: ServerMetrics
    sessions: SessionTable
    scheduler: Scheduler
    wire_limits: wire.WireLimits
    identity: ServerIdentity = field(default_factory=ServerIdentity.generate)  # signs announcements and proofs
    url: str = ""
    state: ServerState = "joining"
    throughput: float = 0.0  # inference tokens/s through the whole span, measured at start
    lora_store: LoraStore = field(default_factory=LoraStore)  # LoRA layouts of the span; weights sessions hold

    @property
    def limits(self) -> ServerLimits:
        return self.options.limits

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.options.model_name, num_blocks=self.span.source.num_blocks, hidden_size=self.span.hidden_size
        )

    def record(self) -> ServerRecord:
        """This server as the route map lists it."""
        return ServerRecord(
            id=self.id,
            url=self.url,
            start=self.span.start,
            end=self.span.end,
            state=self.state,
            throughput=self.throughput,
            dtype=self.dtype_name,
            cache_tokens_left=self.sessions.tokens_left(self.span.num_blocks),
        )

    def count(self, kind: str, status: str, began: float) -> None:
        """A request's outcome and latency (since `began`, time.perf_counter)."""
        self.metrics.requests.labels(kind, status).inc()
        self.metrics.latency.labels(kind).observe(time.perf_counter() - began)

    def count_later(self, kind: str, status: str, began: float) -> None:
        """Metrics of a session message, updated once its reply is on its way (not on every hop's critical path)."""
        elapsed = time.perf_counter() - began
        asyncio.get_running_loop().call_soon(self._record_session_message, kind, status, elapsed)

    def _record_session_message(self, kind: str, status: str, elapsed: float) -> None:
        self.metrics.requests.labels(kind, status).inc()
        self.metrics.latency.labels(kind).observe(elapsed)
        self.update_session_gauges()

    def update_session_gauges(self) -> None:
        self.metrics.active_sessions.set(len(self.sessions))
        self.metrics.kv_cache_used.set(self.sessions.reserved_bytes)

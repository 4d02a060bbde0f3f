"""The client's settings: one typed object, shared by the route reader, sessions and stateless calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from llmswarm_core.routemap_client import auth_headers
from llmswarm_core.wire import WireDtype


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
    wire_dtype: WireDtype = "float32"  # float16 / bfloat16 halve the bytes on the wire
    max_message_bytes: int = 64 * 1024 * 1024
    token: str | None = None  # the swarm token, sent as "Authorization: Bearer <token>" on every request
    tls_ca: str | None = None  # CA bundle (PEM) to verify https/wss servers (default: the system's)
    # torch threads for generate()'s local work (embedding, LM head, sampling over the vocabulary) in
    # the calling thread; 0 keeps torch's setting. A token's local work is bound by memory reads and op
    # dispatch: with more threads each op only adds OpenMP wake-ups (measured: 2 threads with
    # OMP_WAIT_POLICY=PASSIVE cost 8 ms more per token than 1 on a 2-core machine).
    decode_threads: int = 1
    # torch threads for the LM-head product of the decode loop (decode_loop.py): one matrix product over the whole
    # vocabulary, which gains from every core unlike the token's other small ops (measured on 2 cores with
    # OMP_WAIT_POLICY=PASSIVE: 16 rows 21.9 ms on one thread, 8.8 on two; one row 7.9 and 3.8). 0: every core.
    head_threads: int = 0
    # A session's step goes to its first server with the rest of the chain, and each server pushes its
    # output straight to the next (see llmswarm_node/push.py): one client round trip per step, not per hop.
    push: bool = True
    # Reach every server through the route map's relay (<swarm>/relay/<id>, llmswarm_core/relay.py): for a client
    # outside the cluster, which reaches only the swarm's one public address. The route map must run with --relay.
    relay: bool = False

    def __post_init__(self) -> None:
        if self.wire_dtype not in get_args(WireDtype):
            raise ValueError(f"wire_dtype must be one of {', '.join(get_args(WireDtype))}, not {self.wire_dtype!r}")

    def auth_headers(self) -> dict[str, str]:
        return auth_headers(self.token)

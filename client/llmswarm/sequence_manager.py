"""Which servers a client uses: the route map, round-trip times, bans, the chain over a span of blocks, backoff.

Shared by every session and stateless call of one client (as Petals' ``RemoteSequenceManager``):
a server that failed is avoided for a while (longer each time it fails again), a busy one for
the Retry-After it asked for; the chain is the cheapest path over the servers still usable.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from llmswarm.config import ClientConfig
from llmswarm.errors import SwarmError
from llmswarm.routing import Hop, NoRoute, choose_chain
from llmswarm_core.relay import relay_url
from llmswarm_core.routemap import RouteMap, ServerRecord
from llmswarm_core.routemap_client import RouteMapError, fetch_routes
from llmswarm_core.security import PlainCredentialWarning, client_ssl_context, sends_credential_in_clear

log = logging.getLogger("llmswarm.client")


@dataclass(frozen=True)
class ClientStats:
    """What a client has met so far (a snapshot: ``SwarmClient.stats``); see SwarmClient for each count."""

    failovers: int = 0
    replays: int = 0
    replayed_tokens: int = 0
    bans: int = 0


class SwarmClient:
    """Route map reader, round-trip-time meter and server ban list, shared by sessions.

    ``stats`` counts, over the client's life and every session and thread that uses it:

    - ``failovers``: servers that failed during an inference step and whose blocks the step engine
      routed again to servers that were given the session's past inputs (a failover that found no
      working replacement is not counted: it ended in a SwarmError);
    - ``replays``: spans of a session's chain rebuilt on new server sessions by replaying every input
      the old one had (one per failover after the session's first step, plus one per later hop that a
      pushed step may have reached and that started over);
    - ``replayed_tokens``: the tokens (batch x length) of the inputs given again in those replays;
    - ``bans``: times a server was put on the ban list for failing (a busy server that asked to be
      retried later is not counted).
    """

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
        self._stats = ClientStats()
        self._warned: set[str] = set()  # hosts warned about a credential in the clear
        self._warn_if_in_clear(self.url)

    @property
    def stats(self) -> ClientStats:
        """Failovers, replays and bans so far (see the class docstring)."""
        with self._lock:
            return self._stats

    def count(self, failovers: int = 0, replays: int = 0, replayed_tokens: int = 0, bans: int = 0) -> None:
        """Add to ``stats`` (from any thread)."""
        with self._lock:
            s = self._stats
            self._stats = dataclasses.replace(s, failovers=s.failovers + failovers, replays=s.replays + replays,
                                              replayed_tokens=s.replayed_tokens + replayed_tokens, bans=s.bans + bans)

    def routes(self, refresh: bool = False) -> RouteMap:
        with self._lock:
            fresh = time.monotonic() - self._fetched < self.config.routes_max_age
            if self._routes is not None and fresh and not refresh:
                return self._routes
        try:
            routes = fetch_routes(self.http, self.url, self.config.connect_timeout, self.verify)
        except RouteMapError as error:
            raise SwarmError(str(error)) from error
        with self._lock:
            self._routes, self._fetched = routes, time.monotonic()
        for server in routes.servers:
            self._warn_if_in_clear(self.address(server))
        return routes

    def address(self, server: ServerRecord) -> str:
        """Where this client reaches `server`: its listed URL, or the route map's relay for it (config.relay)."""
        return relay_url(self.url, server.id) if self.config.relay else server.url

    def _warn_if_in_clear(self, url: str) -> None:
        """Warn once per host where the credential would go over plain http to an address that is not loopback."""
        host = urlsplit(url).netloc
        if host not in self._warned and sends_credential_in_clear(url, self.config.token):
            self._warned.add(host)
            warnings.warn(f"the swarm credential is sent over plain http to {host}: anyone on the path can read and "
                          "reuse it; serve the swarm over https (--tls-cert) where it leaves one host",
                          PlainCredentialWarning, stacklevel=3)

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
                self._stats = dataclasses.replace(self._stats, bans=self._stats.bans + 1)
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
            rtt = {s.id: self.rtt(s.id, self.address(s)) for s in candidates if s.start < end and s.end > start}
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

"""Load of block servers, from Prometheus (PromQL over its HTTP API) or by scraping their ``/metrics``.

Both sources answer the same question for a list of servers (:class:`Target`): what each
one measured (:class:`ServerLoad`). The queries are in :data:`PROMQL` and in
docs/metrics.md ("Rebalancing queries"); the model that uses them is in
docs/rebalancing.md.

- :class:`PrometheusSource` runs instant queries against ``/api/v1/query``; rates are over
  ``window`` seconds. Series are matched to servers through ``llmswarm_server_info``'s
  ``server_id`` label and the ``instance`` label Prometheus adds to every series.
- :class:`ScrapeSource` reads each server's ``/metrics`` (Prometheus text format, parsed with
  ``prometheus_client``) and keeps the previous sample of every server: rates are over the
  time since the previous call. A server seen for the first time (or whose counters went
  back, a restart) is scraped twice, ``baseline_seconds`` apart.

A server whose metrics cannot be read is listed in :attr:`Collected.missing`, with why in
:attr:`Collected.errors`; callers do not plan on partial data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("llmswarm.rebalance")

#: Request kinds that run the span (the others only open or close sessions).
COMPUTE_KINDS = ("step", "forward")

#: The PromQL the Prometheus source runs; ``{window}`` is the rate window (e.g. ``60s``).
PROMQL: dict[str, str] = {
    "server_id": "max by (instance, server_id) (llmswarm_server_info)",
    "throughput": "max by (instance) (llmswarm_throughput_tokens_per_second)",
    "span_start": "max by (instance) (llmswarm_span_start)",
    "span_end": "max by (instance) (llmswarm_span_end)",
    "busy": 'sum by (instance) (rate(llmswarm_request_duration_seconds_sum{kind=~"step|forward"}[{window}]))',
    "queue_depth": "max by (instance) (avg_over_time(llmswarm_queue_depth[{window}]))",
    "active_sessions": "max by (instance) (llmswarm_active_sessions)",
    "request_rate": 'sum by (instance) (rate(llmswarm_requests_total{kind=~"step|forward"}[{window}]))',
    "tokens_rate": "sum by (instance) (rate(llmswarm_tokens_processed_total[{window}]))",
}


class MetricsError(RuntimeError):
    """The metrics could not be read at all (Prometheus unreachable, or it refused a query)."""


@dataclass(frozen=True)
class Target:
    """A server to measure: its id (``server_id`` in its metrics) and, for direct scraping, its base URL."""

    id: str
    url: str = ""


@dataclass(frozen=True)
class ServerLoad:
    id: str
    throughput: float  # tokens/s through the whole span, measured at start
    busy: float = 0.0  # mean compute requests in flight (request seconds per second)
    queue_depth: float = 0.0  # compute tasks waiting (mean over the window; the last value when scraping)
    active_sessions: float = 0.0
    request_rate: float = 0.0  # compute requests/s
    tokens_rate: float = 0.0  # tokens/s processed
    start: int | None = None  # span as the server reports it
    end: int | None = None

    @property
    def utilisation(self) -> float:
        """Share of the server's capacity in use: mean requests in flight, or queue depth, capped at 1."""
        value = max(self.busy, self.queue_depth)
        return min(1.0, max(0.0, value)) if math.isfinite(value) else 1.0


@dataclass
class Collected:
    loads: dict[str, ServerLoad] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # server id -> what went wrong
    window: float = 0.0  # seconds the rates cover (the shortest, when they differ)

    def describe_missing(self) -> str:
        parts = [f"{sid} ({self.errors[sid]})" if sid in self.errors else sid for sid in self.missing]
        return ", ".join(parts)


class LoadSource(Protocol):
    kind: str

    async def collect(self, targets: Sequence[Target]) -> Collected: ...


# ---- Prometheus ------------------------------------------------------------------------------------------------------


def promql(window: float) -> dict[str, str]:
    """The queries with their rate window filled in (whole seconds, at least 1)."""
    text = f"{max(1, math.ceil(window))}s"
    return {name: query.replace("{window}", text) for name, query in PROMQL.items()}


class PrometheusSource:
    """Instant PromQL queries against a Prometheus server's HTTP API."""

    kind = "prometheus"

    def __init__(self, url: str, window: float = 60.0, timeout: float = 10.0, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the Prometheus URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.window = window
        self.timeout = timeout
        self.token = token
        self.ssl_context = ssl_context

    async def query(self, http: aiohttp.ClientSession, expression: str) -> list[tuple[dict[str, str], float]]:
        """One instant query: (labels, value) per series of the resulting vector."""
        try:
            async with http.get(f"{self.url}/api/v1/query", params={"query": expression}) as response:
                text = await response.text()
                if response.status >= 400:
                    raise MetricsError(f"Prometheus answered {response.status} to {expression!r}: {text[:300]}")
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            raise MetricsError(f"cannot query Prometheus at {self.url}: {type(error).__name__}: {error}") from error
        if answer.get("status") != "success":
            raise MetricsError(f"Prometheus refused {expression!r}: {answer.get('error', answer)}")
        data = answer.get("data") or {}
        if data.get("resultType") != "vector":
            raise MetricsError(f"expected a vector from {expression!r}, got {data.get('resultType')}")
        out = []
        for item in data.get("result") or []:
            try:
                out.append((dict(item.get("metric") or {}), float(item["value"][1])))
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        return out

    async def collect(self, targets: Sequence[Target]) -> Collected:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        connector = aiohttp.TCPConnector(ssl=self.ssl_context) if self.ssl_context is not None else None
        queries = promql(self.window)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), headers=headers,
                                         connector=connector) as http:
            results = await asyncio.gather(*(self.query(http, q) for q in queries.values()))
        by_name = dict(zip(queries, results, strict=True))
        instances: dict[str, list[str]] = {}  # server id -> instances reporting it
        for labels, _ in by_name["server_id"]:
            if labels.get("server_id") and labels.get("instance"):
                instances.setdefault(labels["server_id"], []).append(labels["instance"])
        values: dict[str, dict[str, float]] = {
            name: {labels.get("instance", ""): value for labels, value in series}
            for name, series in by_name.items() if name != "server_id"
        }
        out = Collected(window=self.window)
        for target in targets:
            found = [i for i in instances.get(target.id, []) if i in values["throughput"]]
            if not found:
                out.missing.append(target.id)
                out.errors[target.id] = "not in Prometheus (not scraped yet, or not discovered)"
                continue
            # A server normally has one instance; during a pod's rolling update it may have two: add their load.
            def total(name: str, found: list[str] = found) -> float:
                return sum(values[name].get(i, 0.0) for i in found)

            def first(name: str, found: list[str] = found) -> float | None:
                known = [values[name][i] for i in found if i in values[name]]
                return known[0] if known else None

            start, end = first("span_start"), first("span_end")
            out.loads[target.id] = ServerLoad(
                id=target.id, throughput=max(values["throughput"][i] for i in found), busy=total("busy"),
                queue_depth=max((values["queue_depth"].get(i, 0.0) for i in found), default=0.0),
                active_sessions=total("active_sessions"), request_rate=total("request_rate"),
                tokens_rate=total("tokens_rate"),
                start=int(start) if start is not None else None, end=int(end) if end is not None else None,
            )
        return out


# ---- direct scraping -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """What one scrape of one server gave: gauges as they are, counters to take rates of."""

    time: float
    server_id: str | None
    throughput: float
    start: int | None
    end: int | None
    queue_depth: float
    active_sessions: float
    busy_seconds: float  # sum of compute request durations
    requests: float  # compute requests
    tokens: float  # tokens processed

    def counters(self) -> tuple[float, float, float]:
        return self.busy_seconds, self.requests, self.tokens


def parse_sample(text: str, at: float) -> Sample:
    """One server's ``/metrics`` text (Prometheus exposition format) as a :class:`Sample`."""
    gauges: dict[str, float] = {}
    server_id: str | None = None
    busy = requests = tokens = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "llmswarm_server_info":
                server_id = labels.get("server_id") or server_id
            elif name == "llmswarm_request_duration_seconds_sum" and labels.get("kind") in COMPUTE_KINDS:
                busy += value
            elif name == "llmswarm_requests_total" and labels.get("kind") in COMPUTE_KINDS:
                requests += value
            elif name == "llmswarm_tokens_processed_total":
                tokens += value
            elif not labels:
                gauges[name] = value
    if "llmswarm_throughput_tokens_per_second" not in gauges:
        raise ValueError("no llmswarm_throughput_tokens_per_second: not a block server's metrics")
    start, end = gauges.get("llmswarm_span_start"), gauges.get("llmswarm_span_end")
    return Sample(
        time=at, server_id=server_id, throughput=gauges["llmswarm_throughput_tokens_per_second"],
        start=int(start) if start is not None else None, end=int(end) if end is not None else None,
        queue_depth=gauges.get("llmswarm_queue_depth", 0.0), active_sessions=gauges.get("llmswarm_active_sessions", 0.0),
        busy_seconds=busy, requests=requests, tokens=tokens,
    )


def load_between(server_id: str, before: Sample, after: Sample) -> ServerLoad | None:
    """Rates from two samples of one server; None if they cannot be compared (no time between, counters reset)."""
    elapsed = after.time - before.time
    deltas = [b - a for a, b in zip(before.counters(), after.counters(), strict=True)]
    if elapsed <= 0 or any(d < 0 for d in deltas):
        return None
    busy, requests, tokens = (d / elapsed for d in deltas)
    return ServerLoad(
        id=server_id, throughput=after.throughput, busy=busy, queue_depth=after.queue_depth,
        active_sessions=after.active_sessions, request_rate=requests, tokens_rate=tokens, start=after.start, end=after.end,
    )


def metrics_url(base: str) -> str:
    return f"{base.rstrip('/')}/metrics"


class ScrapeSource:
    """Reads every server's ``/metrics`` directly; keeps the previous sample of each for rates."""

    kind = "scrape"

    def __init__(self, url_for: Callable[[Target], str] | None = None, baseline_seconds: float = 2.0,
                 timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url_for = url_for or (lambda target: metrics_url(target.url))
        self.baseline_seconds = baseline_seconds
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.clock = clock
        self._last: dict[str, Sample] = {}

    async def _scrape(self, http: aiohttp.ClientSession, target: Target) -> Sample | str:
        url = self.url_for(target)
        try:
            async with http.get(url) as response:
                if response.status != 200:
                    return f"{url} answered {response.status}"
                text = await response.text()
            sample = parse_sample(text, self.clock())
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return f"cannot scrape {url}: {type(error).__name__}: {error}"
        except ValueError as error:
            return f"{url}: {error}"
        if sample.server_id is not None and sample.server_id != target.id:
            return f"{url} is server {sample.server_id}, not {target.id}"
        return sample

    async def collect(self, targets: Sequence[Target]) -> Collected:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context) if self.ssl_context is not None else None
        out = Collected()
        windows: list[float] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), connector=connector) as http:
            first = await asyncio.gather(*(self._scrape(http, t) for t in targets))
            samples: dict[str, Sample] = {}
            for target, result in zip(targets, first, strict=True):
                if isinstance(result, str):
                    out.missing.append(target.id)
                    out.errors[target.id] = result
                else:
                    samples[target.id] = result
            fresh = [t for t in targets if t.id in samples and (
                t.id not in self._last or load_between(t.id, self._last[t.id], samples[t.id]) is None)]
            if fresh:  # no usable previous sample: take a baseline now and measure over baseline_seconds
                for target in fresh:
                    self._last[target.id] = samples[target.id]
                await asyncio.sleep(self.baseline_seconds)
                again = await asyncio.gather(*(self._scrape(http, t) for t in fresh))
                for target, result in zip(fresh, again, strict=True):
                    if isinstance(result, str):
                        samples.pop(target.id)
                        out.missing.append(target.id)
                        out.errors[target.id] = result
                    else:
                        samples[target.id] = result
        for target in targets:
            sample = samples.get(target.id)
            if sample is None:
                continue
            load = load_between(target.id, self._last[target.id], sample)
            if load is None:
                out.missing.append(target.id)
                out.errors[target.id] = "its counters went back (a restart): measuring again next round"
            else:
                out.loads[target.id] = load
                windows.append(sample.time - self._last[target.id].time)
            self._last[target.id] = sample
        for gone in set(self._last) - {t.id for t in targets}:
            del self._last[gone]
        out.window = min(windows, default=0.0)
        return out


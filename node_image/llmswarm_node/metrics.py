"""Prometheus metrics of one block server (prefix ``llmswarm_``; see docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmswarm_requests", "Requests handled, by kind and outcome", ["kind", "status"], registry=r
        )
        self.latency = Histogram(
            "llmswarm_request_duration_seconds", "Time from request decoded to reply ready, by kind",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.auth_refusals = Counter(
            "llmswarm_auth_refusals", "Requests refused for their credential: missing, unknown, expired or revoked "
            "(credential), or without the use role (role)", ["reason"], registry=r,
        )
        self.pushes = Counter(
            "llmswarm_pushes", "Step outputs handed to the next server of a client's chain, by outcome "
            "(failed: the client sent it itself)", ["status"], registry=r,
        )
        self.pushes_received = Counter(
            "llmswarm_pushes_received", "Steps handed over by the previous server of a client's chain, by outcome",
            ["status"], registry=r,
        )
        self.tokens = Counter(
            "llmswarm_tokens_processed", "Tokens (batch x sequence) run through this server's blocks, by kind",
            ["kind"], registry=r,
        )
        self.active_sessions = Gauge("llmswarm_active_sessions", "Open inference sessions", registry=r)
        self.kv_cache_used = Gauge(
            "llmswarm_kv_cache_bytes_used", "Attention-cache bytes reserved by open sessions", registry=r
        )
        self.kv_cache_limit = Gauge("llmswarm_kv_cache_bytes_limit", "Attention-cache byte budget", registry=r)
        self.queue_depth = Gauge("llmswarm_queue_depth", "Compute tasks waiting for the compute thread", registry=r)
        self.throughput = Gauge(
            "llmswarm_throughput_tokens_per_second",
            "Inference tokens/s through the whole span, measured at start", registry=r,
        )
        self.batch_size = Histogram(
            "llmswarm_batch_size", "Rows (sessions x their batch) run together in one pass, by kind",
            ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.pass_tokens = Histogram(
            "llmswarm_pass_tokens", "Tokens run through the span in one pass, by kind",
            ["kind"], buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=r,
        )
        self.queue_wait = Histogram(
            "llmswarm_queue_wait_seconds", "Time from a request queued to its pass starting, by kind",
            ["kind"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0), registry=r,
        )
        self.pass_seconds = Histogram(
            "llmswarm_pass_seconds", "Compute time of one pass through the span, by kind",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.span_start = Gauge("llmswarm_span_start", "First block served (inclusive)", registry=r)
        self.span_end = Gauge("llmswarm_span_end", "End of the span served (exclusive)", registry=r)
        self.info = Gauge(
            "llmswarm_server_info", "Constant 1, labelled with what the server serves",
            ["model", "dtype", "server_id"], registry=r,
        )

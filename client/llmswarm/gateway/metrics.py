"""The gateway's own Prometheus metrics, all prefixed ``llmswarm_gateway_`` (docs/gateway.md lists them).

They live in a registry of their own, so several gateways in one process (tests) do
not collide, and ``GET /metrics`` shows only the gateway's series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ENDPOINTS = ("chat_completions", "completions", "models", "other")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmswarm_gateway_requests", "HTTP API requests answered, by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("llmswarm_gateway_request_duration_seconds",
                                          "time from a request's arrival to its last byte (streams included)",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmswarm_gateway_tokens", "tokens of answered requests: prompt tokens read, completion tokens generated",
                              ["kind"], registry=r)
        self.time_to_first_token = Histogram("llmswarm_gateway_time_to_first_token_seconds",
                                             "time from a request's admission to its first generated token (queue wait and prefill)",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("llmswarm_gateway_inter_token_latency_seconds",
                                             "time between consecutive generated tokens of one request",
                                             buckets=ITL_BUCKETS, registry=r)
        self.active = Gauge("llmswarm_gateway_active_generations", "generations running against the swarm", registry=r)
        self.queued = Gauge("llmswarm_gateway_queued_generations", "admitted generations waiting for a free slot", registry=r)
        self.cancelled = Counter("llmswarm_gateway_cancelled_generations",
                                 "generations stopped early because the HTTP client vanished, stopped reading or stopped the answer",
                                 ["reason"], registry=r)
        self.key_requests = Counter("llmswarm_gateway_key_requests", "API requests per API key (its name), by outcome",
                                    ["key", "status"], registry=r)
        self.key_tokens = Counter("llmswarm_gateway_key_tokens", "tokens per API key (its name): prompt read, completion generated",
                                  ["key", "kind"], registry=r)
        self.ready = Gauge("llmswarm_gateway_ready", "1 when the gateway has loaded the model and reached the swarm", registry=r)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)
        for reason in ("disconnected", "slow_client"):
            self.cancelled.labels(reason)

    def count_tokens(self, api_key: str | None, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)
        if api_key is not None:
            self.key_tokens.labels(api_key, "prompt").inc(prompt)
            self.key_tokens.labels(api_key, "completion").inc(completion)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

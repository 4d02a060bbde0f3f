"""What one running operator holds: settings, the API client, metrics, one lock per Swarm.

:meth:`Runtime.run` wraps :func:`~llmswarm_operator.reconcile.reconcile` with the lock (a
timer tick and a change handler never act on the same Swarm at once), timing, metrics
and error mapping; the Kopf handlers stay thin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import aiohttp

from llmswarm_control.load_metrics import LoadSource
from llmswarm_operator.kubeapi import ApiError, KubeClient
from llmswarm_operator.operator_metrics import OperatorMetrics
from llmswarm_operator.reconcile import Outcome, reconcile, summary
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.status import find_condition, refused_status
from llmswarm_operator.swarm_rebalance import due, enabled_spec, rebalance_round, source_for

log = logging.getLogger("llmswarm.operator")


class ReconcileFailed(Exception):
    """The API server could not be reached or refused a request; worth a retry."""


class ReconcileRefused(ReconcileFailed):
    """The API server refused a write for good (403, 422, ...): `outcome` holds the status and the Event that tell
    the user which request and why. The operator still retries (a granted permission heals the Swarm)."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


HINTS = {
    401: "the operator's credentials were refused",
    403: "the operator's RBAC lacks this permission (charts/llmswarm/templates/rbac.yaml)",
    404: "the API server does not serve this resource or namespace",
    422: "the API server (or an admission policy) refused the object as built from the Swarm's spec",
}


def refusal(body: Mapping[str, Any], error: ApiError) -> Outcome:
    """The status and Event that report a write the API server refuses for good."""
    reason = error.reason if error.reason.isalpha() else "".join(HTTPStatus(error.status).phrase.title().split())
    hint = HINTS.get(error.status, "the API server refused the request")
    message = f"{hint}: {error.request}: {error.status} {error.reason}: {error.message}"
    previous = body.get("status") or {}
    outcome = Outcome(refused_status(reason, message, (body.get("metadata") or {}).get("generation"), previous), "Failed")
    if (find_condition(previous, "Ready") or {}).get("message") != message[:4000]:
        outcome.events.append(("Warning", reason, message))
    return outcome


class Runtime:
    def __init__(self, settings: OperatorSettings | None = None, kube: KubeClient | None = None) -> None:
        self.settings = settings or OperatorSettings.from_env()
        self.kube = kube or KubeClient()
        self.metrics = OperatorMetrics()
        self.last_reconcile: dict[tuple[str, str], float] = {}
        self.last_rebalance: dict[tuple[str, str], float] = {}  # when the last rebalance round ran (epoch seconds)
        self._sources: dict[tuple[str, str], LoadSource] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def start(self) -> None:
        if self.settings.metrics_port:
            port = await self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            log.info("operator metrics on http://%s:%d/metrics", self.settings.metrics_host, port)

    async def stop(self) -> None:
        await self.metrics.stop()
        await self.kube.close()

    async def run(self, body: Mapping[str, Any], trigger: str, logger: logging.Logger | logging.LoggerAdapter[Any] = log) -> Outcome:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        lock = self._locks.setdefault(key, asyncio.Lock())
        started = time.perf_counter()
        async with lock:
            try:
                outcome = await reconcile(self.kube, self.settings, body)
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as error:
                raise self._failed(body, trigger, error) from error
            finally:
                self.metrics.duration.labels(trigger).observe(time.perf_counter() - started)
        self.last_reconcile[key] = time.time()
        self.metrics.reconciles.labels(trigger, "invalid" if outcome.invalid else "ok").inc()
        self.metrics.observe_writes(outcome.writes)
        self.metrics.observe_swarm(*key, outcome.status)
        if outcome.writes:
            logger.info("%s: phase %s; %s", trigger, outcome.phase, summary(outcome))
        return outcome

    async def rebalance(self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any] = log,
                        now: float | None = None) -> Outcome | None:
        """A rebalance round if the Swarm asks for one and it is due; None when nothing ran."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        spec = enabled_spec(body)
        if spec is None:
            self._sources.pop(key, None)
            return None
        now = time.time() if now is None else now
        if not due(body, spec, self.last_rebalance.get(key), now):
            return None
        lock = self._locks.setdefault(key, asyncio.Lock())
        started = time.perf_counter()
        async with lock:
            source = self._sources[key] = source_for(spec, self.settings, key[0], self._sources.get(key))
            try:
                round_ = await rebalance_round(self.kube, self.settings, body, spec, source, now)
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as error:
                self.metrics.rebalance.observe(*key, "failed")
                self.last_rebalance[key] = now
                raise self._failed(body, "rebalance", error) from error
            finally:
                self.metrics.duration.labels("rebalance").observe(time.perf_counter() - started)
        self.last_rebalance[key] = now
        if round_ is None:
            return None
        outcome = round_.outcome
        self.last_reconcile[key] = time.time()
        self.metrics.reconciles.labels("rebalance", "ok").inc()
        self.metrics.observe_writes(outcome.writes)
        self.metrics.observe_swarm(*key, outcome.status)
        planned = round_.plan
        self.metrics.rebalance.observe(*key, round_.result, moves=round_.moves,
                                       gain=planned.gain if planned is not None else None,
                                       bottleneck=planned.before if planned is not None else None, when=now)
        if round_.moves:
            logger.info("rebalance: %s", round_.message)
        else:
            logger.debug("rebalance round %s: %s", round_.result, round_.message)
        return outcome

    def _failed(self, body: Mapping[str, Any], trigger: str, error: BaseException) -> ReconcileFailed:
        """Count a failed reconciliation; a permanent refusal comes with the status and Event that report it."""
        kind = f"api_{error.status}" if isinstance(error, ApiError) else type(error).__name__
        self.metrics.errors.labels(kind).inc()
        self.metrics.reconciles.labels(trigger, "error").inc()
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, ApiError) and error.permanent:
            return ReconcileRefused(text, refusal(body, error))
        return ReconcileFailed(text)

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.forget(namespace, name)
        self.last_reconcile.pop((namespace, name), None)
        self.last_rebalance.pop((namespace, name), None)
        self._sources.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)

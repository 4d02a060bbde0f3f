"""Kopf registration: which function runs on which event. The logic lives elsewhere.

- ``startup``/``cleanup``: the :class:`~llmswarm_operator.runtime.Runtime` (settings, API
  client, metrics listener), and with peering a random priority per replica;
- ``login``: Kopf's own minimal login, shared with the operator's API client;
- ``create``/``update``/``resume``: one reconciliation; an invalid spec is a
  :class:`kopf.PermanentError`, servers not ready yet a :class:`kopf.TemporaryError`
  with a delay;
- a timer: the level-based loop that repairs whatever drifted (a deleted Deployment, a
  pod that became ready or failed) and finishes rollouts;
- the rebalance timer: when ``spec.rebalance.enabled``, a round every
  ``spec.rebalance.intervalSeconds`` (:mod:`~llmswarm_operator.swarm_rebalance`); it ticks
  often and does nothing until a round is due;
- ``probe``: for Kopf's liveness endpoint.

Deleting a Swarm needs no handler: everything it owns carries an owner reference and the
cluster's garbage collector removes it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable
from typing import Any

import kopf

from llmswarm_operator import kubeapi
from llmswarm_operator.reconcile import Outcome
from llmswarm_operator.runtime import ReconcileFailed, ReconcileRefused, Runtime
from llmswarm_operator.settings import PREFIX, OperatorSettings
from llmswarm_operator.swarm_spec import GROUP, PLURAL, VERSION

RESOURCE = (GROUP, VERSION, PLURAL)
REBALANCE_TICK = 5.0  # seconds between checks whether a Swarm's rebalance round is due


def _runtime(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if runtime is None:
        raise kopf.PermanentError("the operator did not start (no runtime in memo)")
    return runtime  # type: ignore[no-any-return]


def _write_status(body: Any, patch: kopf.Patch, status: dict[str, Any]) -> None:
    """Patch only the status fields that changed: an unchanged Swarm gets no write (and no watch event)."""
    current = body.get("status") or {}
    for key, value in status.items():
        if current.get(key) != value:
            patch.status[key] = value


def _post(body: Any, outcome: Outcome) -> None:
    for kind, reason, message in outcome.events:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])


async def _reported(runtime: Runtime, body: Any, patch: kopf.Patch, work: Awaitable[Outcome | None]) -> Outcome | None:
    """Run `work` and write what it found (status, Events); a failure is retried after the retry delay.

    A refusal the API server will repeat (403, 422, ...) is written too, before the retry: the Swarm's status
    and an Event say which request failed and why, not only the operator's log.
    """
    try:
        outcome = await work
    except ReconcileRefused as error:
        _write_status(body, patch, error.outcome.status)
        _post(body, error.outcome)
        raise kopf.TemporaryError(str(error), delay=runtime.settings.retry_delay) from error
    except ReconcileFailed as error:
        raise kopf.TemporaryError(str(error), delay=runtime.settings.retry_delay) from error
    if outcome is not None:
        _write_status(body, patch, outcome.status)
        _post(body, outcome)
    return outcome


def register(registry: kopf.OperatorRegistry, reconcile_interval: float) -> None:
    """Register the operator's handlers into `registry`, with the timer firing every `reconcile_interval` s."""

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        if getattr(memo, "runtime", None) is None:
            memo.runtime = Runtime(OperatorSettings.from_env())
        # Kopf would post an Event for every log line at this level and above: a retry while servers load is
        # one. Our own Events (ServerCreated, InvalidSpec, ...) are posted explicitly and are not affected.
        settings.posting.level = logging.CRITICAL
        settings.persistence.finalizer = "llmswarm.dev/finalizer"
        settings.background.instant_exit_timeout = 0.5  # let a timer tick in flight finish when the operator stops
        runtime = _runtime(memo)
        if runtime.settings.peering:
            # Kopf pauses every replica that sees another of equal priority: each draws its own, and the highest
            # live one acts. A replica gone silent counts as alive for `peering_lifetime` seconds.
            settings.peering.priority = secrets.randbelow(2**31 - 1) + 1
            settings.peering.lifetime = runtime.settings.peering_lifetime
            logger.info("peering %r with priority %d", runtime.settings.peering, settings.peering.priority)
        await runtime.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "runtime", None) is not None:
            await _runtime(memo).stop()

    @kopf.on.login(registry=registry)
    async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = kubeapi.login(**kwargs)
        if info is not None and getattr(memo, "runtime", None) is not None:
            _runtime(memo).kube.use(info, loader=lambda: kubeapi.login(**kwargs))
        return info

    @kopf.on.probe(id="swarms", registry=registry)
    def probe(memo: kopf.Memo, **_: Any) -> int:
        """How many Swarms this operator reconciled since it started."""
        return len(_runtime(memo).last_reconcile)

    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    @kopf.on.resume(*RESOURCE, registry=registry)
    async def converge(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, reason: str, logger: logging.Logger,
                       **_: Any) -> None:
        runtime = _runtime(memo)
        outcome = await _reported(runtime, body, patch, runtime.run(body, str(reason), logger))
        if outcome is None:
            return
        if outcome.invalid:
            raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")
        if outcome.phase in ("Pending", "Progressing"):
            ready = outcome.status.get("readyServers", "?")
            raise kopf.TemporaryError(f"{ready} servers ready; waiting for the rollout",
                                      delay=runtime.settings.retry_delay)

    @kopf.timer(*RESOURCE, interval=reconcile_interval, initial_delay=reconcile_interval, registry=registry)
    async def reconcile_timer(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                              **_: Any) -> None:
        runtime = _runtime(memo)
        await _reported(runtime, body, patch, runtime.run(body, "timer", logger))

    @kopf.timer(*RESOURCE, interval=min(reconcile_interval, REBALANCE_TICK), initial_delay=reconcile_interval,
                registry=registry)
    async def rebalance_timer(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                              **_: Any) -> None:
        runtime = _runtime(memo)
        await _reported(runtime, body, patch, runtime.rebalance(body, logger))

    @kopf.on.event(*RESOURCE, registry=registry)
    def forget_deleted(type: str, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED" and getattr(memo, "runtime", None) is not None:
            _runtime(memo).forget(namespace, name)


def interval_from_env() -> float:
    """The timer interval for the default registry (checked again, strictly, when the operator starts)."""
    raw = os.environ.get(f"{PREFIX}RECONCILE_INTERVAL", "")
    try:
        value = float(raw) if raw else OperatorSettings.reconcile_interval
    except ValueError:
        return OperatorSettings.reconcile_interval
    return value if value > 0 else OperatorSettings.reconcile_interval


_registered: set[int] = set()


def register_default() -> None:
    """Register into Kopf's default registry once (for ``kopf run -m llmswarm_operator.entry``)."""
    registry = kopf.get_default_registry()
    if id(registry) not in _registered:
        _registered.add(id(registry))
        register(registry, interval_from_env())

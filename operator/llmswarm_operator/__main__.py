"""``python -m llmswarm_operator``: run the Swarm operator with settings from ``LLMSWARM_OPERATOR_*``."""

from __future__ import annotations

import logging
import sys

import kopf

from llmswarm_operator.handlers import register
from llmswarm_operator.runtime import Runtime
from llmswarm_operator.settings import OperatorSettings, SettingsError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = OperatorSettings.from_env()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    registry = kopf.OperatorRegistry()
    register(registry, settings.reconcile_interval)
    kopf.run(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        liveness_endpoint=settings.liveness_endpoint or None,
        memo=kopf.Memo(runtime=Runtime(settings)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

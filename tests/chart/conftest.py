"""Fixtures of the chart tests: real local block servers (for the dashboard and the image's healthcheck)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chart.rendering import ROOT

OUTPUT = ROOT / "test-output" / "chart"


@pytest.fixture(scope="session")
def local_swarm() -> Iterator[object]:
    """Two real block servers of SmolLM2 (blocks [0, 15) and [15, 30)) and the route-map service, on 127.0.0.1."""
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    options = LocalSwarmOptions(model="smollm2", servers=2, port=0, progress=False, log_dir=OUTPUT / "dashboard-swarm-logs")
    with LocalSwarm(options) as swarm:
        yield swarm

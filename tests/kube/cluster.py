"""An emulated cluster with a node: the chart tests' API emulator (tests/chart/cluster.py) and a :class:`KubeNode`.

:func:`cluster_with_node` serves every kind the chart and the operator use, writes a kubeconfig for the
real ``kubectl``, and starts one node whose containers run with the node image's configuration
(``node_image/Dockerfile``, CPU variant, ``/opt/llmswarm`` being this machine's virtualenv).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from kmock._internal import dsl, rendering

from tests.chart.cluster import CHART_RESOURCES, ChartEmulator, install_crds
from tests.chart.rendering import Manifest, load_chart
from tests.kube.image import Image, from_dockerfile
from tests.kube.node import KubeNode, running_node
from tests.operator.cluster import BUILTINS, Kubectl, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
OUTPUT = ROOT / "test-output" / "kube"

#: Module mark of the tests that start a node: it needs root, ``ip`` (network namespaces) and ``nsenter``.
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
    reason="the node harness needs root, ip (network namespaces) and nsenter",
)


def node_image() -> Image:
    """The node image's runtime configuration, with its virtualenv (/opt/llmswarm) mapped onto this one."""
    return from_dockerfile(ROOT / "node_image" / "Dockerfile", {"VARIANT": "cpu"}, replace_paths={"/opt/llmswarm": str(VENV)})


@dataclass
class Cluster:
    emulator: ChartEmulator
    url: str
    kubectl: Kubectl
    node: KubeNode


def request_membership_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """kmock 0.8 finds the reaction to a request by asking, of each of its ~14 built-in reactions, whether the
    request is in that reaction's view, and answers by filtering its whole history of requests: every request
    costs time in proportion to all the requests before it. The node polls the API several times a second, so
    after a few minutes each request took a tenth of a second and more (measured: 15 ms with 500 requests
    recorded, 145 ms with 2,500) and one reconcile of the operator many seconds. Here membership of a request
    in a root (by identity, newest first) and in a filter (its criteria, then its source) is answered without
    iterating; the same answer for these two views, which are all the emulator's reactions use."""
    in_root, in_filter, in_priority = dsl.Root.__contains__, dsl.Filter.__contains__, dsl.Priority.__contains__

    def root_contains(self: dsl.Root, item: Any) -> bool:
        if isinstance(item, rendering.Request):
            return any(request is item for request in reversed(self._requests))
        return in_root(self, item)

    def filter_contains(self: dsl.Filter, item: Any) -> bool:
        if isinstance(item, rendering.Request):
            return bool(self.criteria(item)) and item in self._source
        return in_filter(self, item)

    def priority_contains(self: dsl.Priority, item: Any) -> bool:  # a hint on the chain: the source's requests
        if isinstance(item, rendering.Request):
            return item in self._source
        return in_priority(self, item)
    monkeypatch.setattr(dsl.Root, "__contains__", root_contains)
    monkeypatch.setattr(dsl.Filter, "__contains__", filter_contains)
    monkeypatch.setattr(dsl.Priority, "__contains__", priority_contains)


@contextlib.asynccontextmanager
async def cluster_with_node(tmp: Path, name: str, namespace: str = "default", **node_options: Any) -> AsyncIterator[Cluster]:
    """The emulator, kubectl and a started node; logs go to test-output/kube/<name>/."""
    emulator = ChartEmulator()
    for key, info in {**BUILTINS, **CHART_RESOURCES}.items():
        emulator.resources[key] = info
    logs = OUTPUT / name
    shutil.rmtree(logs, ignore_errors=True)
    image = node_image()
    options: dict[str, Any] = {"images": lambda ref: image, "work_dir": tmp / "node", "log_dir": logs, **node_options}
    with pytest.MonkeyPatch.context() as monkeypatch:
        request_membership_in_constant_time(monkeypatch)
        async with emulator, kmock.Server(emulator) as server:
            url = str(server.url).rstrip("/")
            async with running_node(emulator, url, **options) as node:
                yield Cluster(emulator, url, Kubectl(write_kubeconfig(tmp, url, namespace)), node)


def chart_crds() -> list[Manifest]:
    """Every CRD in the chart's crds/ (a file may hold several documents)."""
    chart = load_chart()
    try:
        return [doc for entry in chart.crds for doc in yaml.safe_load_all(entry["data"]) if doc]
    finally:
        chart.close()


async def install_chart(cluster: Cluster, installed: list[Manifest]) -> None:
    """What ``helm install`` does: the CRDs from crds/ (then served), then the rendered templates."""
    served = await install_crds(cluster.emulator, cluster.kubectl, chart_crds())
    assert "llmswarm.dev/v1alpha1/swarms" in served, served
    out = await cluster.kubectl.apply(yaml.safe_dump_all(installed))
    for manifest in installed:
        assert f"/{manifest['metadata']['name']} created" in out, f"{manifest['kind']} {manifest['metadata']['name']}:\n{out}"

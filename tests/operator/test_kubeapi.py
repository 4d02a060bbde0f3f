"""The operator's API client and apply() over HTTP against the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest

from llmswarm_operator.kubeapi import HASH_ANNOTATION, ApiError, KubeClient, apply, path_for
from llmswarm_operator.runtime import ReconcileFailed, Runtime
from llmswarm_operator.settings import OperatorSettings
from tests.operator.cluster import running_cluster
from tests.operator.conftest import free_port


def config_map(labels: dict[str, str], data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm", "namespace": "default", "labels": labels}, "data": data}


async def test_apply_creates_patches_by_digest_and_removes_what_it_no_longer_sets(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as (emulator, url, _, _):
        kube = KubeClient()
        kube.use(kopf.ConnectionInfo(server=url))
        try:
            assert await apply(kube, config_map({"a": "1", "b": "2"}, {"x": "1", "y": "2"})) == "created"
            assert await apply(kube, config_map({"a": "1", "b": "2"}, {"x": "1", "y": "2"})) == "unchanged"
            assert await apply(kube, config_map({"a": "1"}, {"x": "3"})) == "updated"
            stored = await kube.get("ConfigMap", "default", "cm")
            assert stored is not None
            assert stored["metadata"]["labels"] == {"a": "1"} and stored["data"] == {"x": "3"}
            assert HASH_ANNOTATION in stored["metadata"]["annotations"]
            # The emulator stored the merge of both writes: the removed label and key are gone there too.
            assert emulator.objects["v1/configmaps", "default", "cm"].last.raw["data"] == {"x": "3"}

            other = config_map({"a": "2"}, {})
            other["metadata"]["name"] = "other"
            await kube.create(other)
            # The emulator ignores label selectors; the client filters anyway.
            assert [o["metadata"]["name"] for o in await kube.list("ConfigMap", "default", {"a": "1"})] == ["cm"]
            assert await kube.get("ConfigMap", "default", "missing") is None
            assert await kube.delete("ConfigMap", "default", "other") is True
            assert await kube.delete("ConfigMap", "default", "other") is False
            with pytest.raises(ApiError) as raised:
                await kube.create(config_map({}, {}))
            assert raised.value.status == 409
        finally:
            await kube.close()


async def test_the_emulator_cannot_serve_server_side_apply(tmp_path: Path) -> None:
    """Why apply() writes merge patches: what kmock's emulator does with a Server-Side Apply (docs/testing.md).

    If this starts failing, the emulator learned SSA: apply() can then become one
    ``PATCH ?fieldManager=llmswarm-operator&force=true`` with ``application/apply-patch+yaml``.
    """
    ssa = {"Content-Type": "application/apply-patch+yaml"}
    path = "/api/v1/namespaces/default/configmaps/cm"
    query = "?fieldManager=llmswarm-operator&force=true"
    async with running_cluster(tmp_path) as (emulator, url, _, _), aiohttp.ClientSession() as http:
        async def call(method: str, target: str, body: str, headers: dict[str, str]) -> int:
            async with http.request(method, url + target, data=body, headers=headers) as response:
                await response.read()
                return response.status

        def stored() -> dict[str, Any]:
            return emulator.objects["v1/configmaps", "default", "cm"].last.raw  # type: ignore[no-any-return]

        # A real server creates a missing object from an apply (201); the emulator: 404.
        assert await call("PATCH", path + query, json.dumps(config_map({"a": "1", "b": "2"}, {"x": "1", "y": "2"})), ssa) == 404
        await call("POST", "/api/v1/namespaces/default/configmaps",
                   json.dumps(config_map({"a": "1", "b": "2"}, {"x": "1", "y": "2"})), {"Content-Type": "application/json"})
        # A real server removes the fields this manager applied before and no longer applies; the emulator merges.
        assert await call("PATCH", path + query, json.dumps(config_map({"a": "1"}, {"x": "3"})), ssa) == 200
        assert stored()["metadata"]["labels"] == {"a": "1", "b": "2"} and stored()["data"] == {"x": "3", "y": "2"}
        # YAML (what kubectl sends) is not parsed: answered 200 and ignored.
        body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\n  namespace: default\ndata:\n  x: '4'\n"
        assert await call("PATCH", path + query, body, ssa) == 200 and stored()["data"]["x"] == "3"
        # No field ownership: no managedFields, and another manager takes a field without force (a real server: 409).
        assert await call("PATCH", path + "?fieldManager=someone-else", json.dumps(config_map({}, {"x": "5"})), ssa) == 200
        assert stored()["data"]["x"] == "5" and "managedFields" not in stored()["metadata"]


def test_paths() -> None:
    assert path_for("Deployment", "ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert path_for("Pod", "ns") == "/api/v1/namespaces/ns/pods"
    assert path_for("Swarm", "ns", "s", "status") == "/apis/llmswarm.dev/v1alpha1/namespaces/ns/swarms/s/status"


async def test_an_unreachable_api_is_a_retryable_failure_and_counted() -> None:
    kube = KubeClient(timeout=2)
    kube.use(kopf.ConnectionInfo(server=f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    runtime = Runtime(OperatorSettings(metrics_port=0), kube)
    body = {"metadata": {"name": "demo", "namespace": "default", "uid": "u1"},
            "spec": {"pools": [{"name": "cpu", "gpuMemory": "2Gi"}]}}
    try:
        with pytest.raises(ReconcileFailed, match="ClientConnectorError"):
            await runtime.run(body, "timer")
        text = runtime.metrics.render().decode()
        assert 'llmswarm_operator_reconcile_errors_total{kind="ClientConnectorError"} 1.0' in text
        assert 'llmswarm_operator_reconciles_total{result="error",trigger="timer"} 1.0' in text
        # An invalid spec needs no API at all: it is reported, not retried.
        outcome = await runtime.run({**body, "spec": {"pools": []}}, "timer")
        assert outcome.invalid and outcome.phase == "Failed"
    finally:
        await runtime.stop()

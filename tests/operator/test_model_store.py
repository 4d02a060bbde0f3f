"""The model store (spec.modelStore): a claim filled once per model revision by a Job, read by the servers.

Manifests are checked as built; the operator's sequencing (no server before the store is ready, a new revision
is a new Job, existing servers untouched until it succeeded, a failed Job reported) against the emulator, whose
Job controller (tests/operator/cluster.py) ends Jobs as the test says.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmswarm_core.model_store import store_key
from llmswarm_operator import manifests as m
from llmswarm_operator import store as mstore
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.swarm_spec import InvalidSpec, parse_spec, plan_placement
from tests.operator.conftest import Cluster, Operator, eventually
from tests.operator.pod_security import restricted_violations
from tests.operator.test_operator_emulator import apply_doc, expected_servers, owned, status, wait_phase

SETTINGS = OperatorSettings(image="ghcr.io/llmswarm/node:test")
OWNER = m.Owner("demo", "llm", "0a1b2c3d-0000-0000-0000-000000000000")
SOURCE = "meta-llama/Llama-3.1-8B-Instruct"


def spec_doc(**store: Any) -> dict[str, Any]:
    return {
        "model": {"source": "smollm2", "hubTokenSecret": {"name": "hf", "key": "hf-token"}},
        "pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 3}],
        "modelStore": store or {"size": "20Gi"},
    }


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def servers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_spec(doc)
    _, cost, placement = plan_placement(spec)
    return [m.server_deployment(OWNER, spec, cost, s, SETTINGS) for s in m.desired_servers(OWNER.name, placement)]


def test_servers_read_the_store_read_only_and_fetch_nothing() -> None:
    key = store_key("smollm2", "")
    for deployment in servers(spec_doc()):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[args.index("--model") + 1] == f"{m.MODELS_DIR}/{key}"
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "demo-models", "readOnly": True}} in pod["volumes"]
        assert {"name": "models", "mountPath": m.MODELS_DIR, "readOnly": True} in container["volumeMounts"]
        assert "HF_TOKEN" not in env(container)  # servers download nothing: no hub token
        assert container["resources"]["requests"]["ephemeral-storage"] == f"{m.SCRATCH_BYTES // 2**20}Mi"
    # An existing claim is used as it is.
    (first, *_) = servers(spec_doc(claimName="shared-models"))
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "shared-models", "readOnly": True}} in \
        first["spec"]["template"]["spec"]["volumes"]


def test_without_a_store_servers_get_the_hub_token() -> None:
    doc = spec_doc()
    del doc["modelStore"]
    for deployment in servers(doc):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert env(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "hf-token"}}
        assert container["args"][container["args"].index("--model") + 1] == "smollm2"


def test_the_fill_job() -> None:
    doc = spec_doc()
    doc["model"].update(source=SOURCE, revision="5206a32", architecture={
        "numBlocks": 32, "hiddenSize": 4096, "intermediateSize": 14336, "numAttentionHeads": 32, "numKeyValueHeads": 8})
    spec = parse_spec(doc)
    job = mstore.fill_job(OWNER, spec, SETTINGS)
    key = store_key(SOURCE, "5206a32")
    assert job["metadata"]["name"] == mstore.job_name("demo", key) and len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == mstore.BACKOFF_LIMIT
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "llmswarm_core.model_store"]
    assert container["args"] == ["--source", SOURCE, "--revision", "5206a32", "--store", m.MODELS_DIR, "--key", key, "--quiet"]
    assert env(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "hf-token"}}
    assert env(container)["HF_HOME"].startswith(m.MODELS_DIR)  # the download is on the volume, not the pod's disk
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "demo-models"}} in pod["volumes"]
    claim = mstore.store_claim(OWNER, spec)
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}
    # Another revision, another directory and another Job.
    other = copy.deepcopy(doc)
    other["model"]["revision"] = "main"
    assert mstore.fill_job(OWNER, parse_spec(other), SETTINGS)["metadata"]["name"] != job["metadata"]["name"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["modelStore"].update(claimName="x"), "either claimName"),
    (lambda d: d["modelStore"].pop("size"), "either claimName"),
    (lambda d: (d.pop("modelStore"), d["model"].update(revision="main")), "model.revision needs modelStore"),
    (lambda d: d["modelStore"].update(size="0"), "more than 0"),
])
def test_bad_store_specs(change: Any, message: str) -> None:
    doc = spec_doc()
    change(doc)
    with pytest.raises(InvalidSpec, match=message):
        parse_spec(doc)


def test_job_states() -> None:
    job: dict[str, Any] = {"metadata": {"name": "j"}}
    assert mstore.job_state(None)[0] == mstore.PENDING
    assert mstore.job_state(job)[0] == mstore.PENDING
    assert mstore.job_state({**job, "status": {"active": 1}})[0] == mstore.FILLING
    assert mstore.job_state({**job, "status": {"succeeded": 1}})[0] == mstore.READY
    failed = mstore.job_state({**job, "status": {"conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}})
    assert failed[0] == mstore.FAILED and "boom" in failed[1]


def swarm(name: str, revision: str = "") -> dict[str, Any]:
    spec = spec_doc()
    spec["model"]["revision"] = revision
    return {"apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "metadata": {"name": name, "namespace": "default"},
            "spec": spec}


def model_args(cluster: Cluster, name: str) -> dict[str, str]:
    out = {}
    for server, deployment in owned(cluster, "deployments", name).items():
        if server != m.routemap_name(name):
            args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            out[server] = args[args.index("--model") + 1]
    return out


async def test_no_server_before_the_store_is_filled(cluster: Cluster, operator: Operator) -> None:
    cluster.controllers.jobs_end = ""  # the fill runs until the test lets it finish
    cluster.controllers.all_ready = True
    doc = swarm("stored")
    await apply_doc(cluster, doc)
    key = store_key("smollm2", "")
    job = mstore.job_name("stored", key)

    async def filling() -> dict[str, Any]:
        current = await status(cluster, "stored")
        assert (current.get("modelStore") or {}).get("phase") == "Filling", current
        return current
    current = await eventually(filling, 15, "the store to be filling")
    assert current["modelStore"]["job"] == job and current["modelStore"]["path"] == f"{m.MODELS_DIR}/{key}"
    assert current["phase"] == "Pending"
    ready = next(c for c in current["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ModelStoreFilling"
    assert set(owned(cluster, "persistentvolumeclaims", "stored")) == {"stored-models"}
    assert set(owned(cluster, "jobs", "stored")) == {job}
    assert model_args(cluster, "stored") == {}  # no server while the store fills

    cluster.controllers.jobs_end = "Complete"
    current = await wait_phase(cluster, "stored", "Ready")
    assert current["modelStore"]["phase"] == "Ready"
    assert model_args(cluster, "stored") == dict.fromkeys(expected_servers(doc), f"{m.MODELS_DIR}/{key}")

    # A new revision: a new Job; the servers keep the old directory until it is filled, then roll to the new one.
    cluster.controllers.jobs_end = ""
    await apply_doc(cluster, swarm("stored", revision="v2"))
    new_key = store_key("smollm2", "v2")
    new_job = mstore.job_name("stored", new_key)

    async def new_job_runs() -> bool:
        assert new_job in owned(cluster, "jobs", "stored")
        assert (await status(cluster, "stored"))["modelStore"]["job"] == new_job
        return True
    await eventually(new_job_runs, 15, "the new revision's Job")
    # Served by the old revision's servers, but not Ready: the spec's revision is not served yet.
    current = await wait_phase(cluster, "stored", "Progressing")
    assert next(c for c in current["conditions"] if c["type"] == "Ready")["reason"] == "ModelStoreFilling"
    assert set(model_args(cluster, "stored").values()) == {f"{m.MODELS_DIR}/{key}"}
    cluster.controllers.jobs_end = "Complete"

    async def rolled() -> bool:
        assert set(model_args(cluster, "stored").values()) == {f"{m.MODELS_DIR}/{new_key}"}
        assert set(owned(cluster, "jobs", "stored")) == {new_job}  # the old revision's Job is gone
        return True
    await eventually(rolled, 15, "servers on the new revision")
    assert (await wait_phase(cluster, "stored", "Ready"))["modelStore"]["path"] == f"{m.MODELS_DIR}/{new_key}"
    # The claim was made once.
    creates = [r for r in list(cluster.emulator) if r.resource is not None and r.resource.plural == "persistentvolumeclaims"
               and r.method == "POST"]
    assert len(creates) == 1


async def test_a_failed_fill_is_reported(cluster: Cluster, operator: Operator) -> None:
    cluster.controllers.jobs_end = "Failed"
    await apply_doc(cluster, swarm("broken"))
    current = await wait_phase(cluster, "broken", "Failed")
    assert current["modelStore"]["phase"] == "Failed"
    assert "backoff limit" in current["modelStore"]["message"]
    degraded = next(c for c in current["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ModelStoreFailed"
    assert model_args(cluster, "broken") == {}

    async def warned() -> bool:
        return any(e.get("reason") == "ModelStoreFailed" for e in cluster.controllers.live("events"))
    await eventually(warned, 10, "a ModelStoreFailed Event")

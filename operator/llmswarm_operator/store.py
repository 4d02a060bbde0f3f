"""A Swarm's model store: its claim, the Job that fills it, and what the Job's status says. Pure, no I/O.

With ``spec.modelStore``, the model is written once per (source, revision) into a directory of a shared volume
(``MODELS_DIR/KEY``, :func:`llmswarm_core.model_store.store_key`) by a Job running
``python -m llmswarm_core.model_store``; server pods mount the volume read-only and serve
``--model MODELS_DIR/KEY``. The operator creates no server Deployment until that Job has succeeded (and leaves
existing ones, of an earlier revision, as they are until then), so no server ever downloads or converts.

The Job's name carries the key: a new revision is a new Job (a Job's pod template cannot be changed), and the
Jobs of earlier revisions are deleted once the new one succeeded. A failed Job stays (its pods' logs say why);
deleting it makes the operator run it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmswarm_operator import manifests as m
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.swarm_spec import SwarmSpec

Body = dict[str, Any]

PENDING, FILLING, READY, FAILED = "Pending", "Filling", "Ready", "Failed"
FILL_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "2Gi"}}
BACKOFF_LIMIT = 2


@dataclass(frozen=True)
class StoreState:
    phase: str
    claim: str
    key: str
    job: str
    message: str

    def status(self, spec: SwarmSpec) -> Body:
        return {"phase": self.phase, "claim": self.claim, "path": f"{m.MODELS_DIR}/{self.key}", "job": self.job,
                "source": spec.model.source, "revision": spec.model.revision, "message": self.message}


def job_name(swarm: str, key: str) -> str:
    """``<swarm>-fill-<digest>``: the key's digest part (a new revision, a new Job), 47 characters at most."""
    return f"{swarm}-fill-{key.rsplit('-', 1)[-1][:10]}"


def store_claim(owner: m.Owner, spec: SwarmSpec) -> Body:
    """The claim the operator makes when the spec gives a size (not a claimName); owned by the Swarm."""
    store = spec.model_store
    assert store is not None and store.size is not None
    claim_spec: Body = {"accessModes": list(store.access_modes), "resources": {"requests": {"storage": str(store.size)}}}
    if store.storage_class_name is not None:
        claim_spec["storageClassName"] = store.storage_class_name
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": m._meta(owner, m.store_claim(owner.name, spec), m.labels(owner.name, m.COMPONENT_STORE)),
        "spec": claim_spec,
    }


def fill_job(owner: m.Owner, spec: SwarmSpec, settings: OperatorSettings) -> Body:
    """The Job that fills the store once: the node image running ``python -m llmswarm_core.model_store``.

    The hub token (``spec.model.hubTokenSecret``) is given to this pod only; the download goes to the store's
    volume (``.staging``), not the pod's disk."""
    store = spec.model_store
    assert store is not None
    key = m.store_key(spec)
    resources: Body = {k: {name: str(v) for name, v in values.items()}
                       for k, values in (("requests", store.resources.requests), ("limits", store.resources.limits)) if values}
    resources = resources or {k: dict(v) for k, v in FILL_RESOURCES.items()}
    container: Body = {
        "name": "fill",
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "llmswarm_core.model_store"],
        "args": ["--source", spec.model.source, "--revision", spec.model.revision, "--store", m.MODELS_DIR,
                 "--key", key, "--quiet"],
        "env": [{"name": "HF_HOME", "value": f"{m.MODELS_DIR}/.staging/huggingface"},
                {"name": "TOKENIZERS_PARALLELISM", "value": "false"}, *m.gpu_env(resources), *m.hub_token_env(spec)],
        "resources": resources,
        "volumeMounts": [{"name": "models", "mountPath": m.MODELS_DIR}],
    }
    volume = {"name": "models", "persistentVolumeClaim": {"claimName": m.store_claim(owner.name, spec)}}
    pod_spec = m._hardened_pod(spec, settings, [container], [volume])
    pod_spec["restartPolicy"] = "Never"
    if store.node_selector:
        pod_spec["nodeSelector"] = dict(store.node_selector)
    if store.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in store.tolerations]
    object_labels = m.labels(owner.name, m.COMPONENT_STORE)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": m._meta(owner, job_name(owner.name, key), object_labels, {m.ANNOTATION_STORE_KEY: key}),
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "template": {"metadata": {"labels": m.pod_labels(owner.name, m.COMPONENT_STORE),
                                      "annotations": {m.ANNOTATION_STORE_KEY: key}},
                         "spec": pod_spec},
        },
    }


def job_state(job: Mapping[str, Any] | None) -> tuple[str, str]:
    """(phase, message) of the store from its fill Job (None: not created yet)."""
    if job is None:
        return PENDING, "the fill Job is being created"
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return READY, f"filled by Job {job['metadata']['name']}"
        if condition.get("type") == "Failed":
            why = condition.get("message") or condition.get("reason") or "failed"
            return FAILED, (f"Job {job['metadata']['name']} failed: {why}; its pods' logs say why (kubectl logs "
                            f"job/{job['metadata']['name']}); delete the Job to run it again")
    if status.get("succeeded"):
        return READY, f"filled by Job {job['metadata']['name']}"
    if status.get("active"):
        failed = int(status.get("failed") or 0)
        return FILLING, f"Job {job['metadata']['name']} is filling the store" + (f" (attempt {failed + 1})" if failed else "")
    return PENDING, f"Job {job['metadata']['name']} has no running pod yet"

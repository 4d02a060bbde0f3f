"""Pure builders of the objects a Swarm owns. No I/O: dicts in, dicts out.

Per server: a Deployment (one replica running ``llmswarm serve --blocks START:END``) and
a Service. Per swarm: the route-map ConfigMap, and the route-map service (Deployment +
Service). Everything carries an owner reference to the Swarm and the
``app.kubernetes.io/*`` labels; selectors use only labels that never change.

A server's identity is its pool, its span and an ordinal among equal ones
(``<swarm>-<pool>-<key>-<start>-<end>-<n>``, :func:`server_name`): a new span is a new
server, started next to the old one, which is drained only when the new one is ready.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from llmswarm_control.placement import BlockCost, Placement
from llmswarm_core.routemap import RouteMap
from llmswarm_core.spans import Span
from llmswarm_operator.settings import OperatorSettings, package_version
from llmswarm_operator.swarm_spec import API_VERSION, KIND, PoolSpec, SwarmSpec, model_shape

Body = dict[str, Any]

LABEL_SWARM = "llmswarm.dev/swarm"
LABEL_SERVER = "llmswarm.dev/server"
LABEL_POOL = "llmswarm.dev/pool"
ANNOTATION_SPAN = "llmswarm.dev/span"
ANNOTATION_DRAINING = "llmswarm.dev/draining-since"
COMPONENT_SERVER = "block-server"
COMPONENT_ROUTEMAP = "route-map"
COMPONENT_IDENTITY = "server-identity"
IDENTITY_DIR = "/var/run/llmswarm/identity"
IDENTITY_KEY = "key.pem"
ROUTES_FILE = "routes.json"
ASSIGNMENT_FILE = "assignment.json"  # see assignment.py
ROUTES_DIR = "/etc/llmswarm"
ADAPTERS_DIR = "/var/lib/llmswarm/adapters"  # the route map's published adapters (a PVC, or the pod's own disk)
PRELOADED_DIR = "/var/run/llmswarm/adapters"  # spec.adapters from ConfigMaps, one folder each, in server pods
CACHE_DIR = "/var/cache/llmswarm"
MODELS_DIR = "/var/lib/llmswarm/models"  # the model store's volume: the fill Job writes it, servers read it
COMPONENT_STORE = "model-store"
ANNOTATION_STORE_KEY = "llmswarm.dev/store-key"
LABEL_BLOCKS = "llmswarm.dev/blocks"  # a server pod's span as "START-END": replicas of the same blocks avoid each other
GPU_RESOURCE = "nvidia.com/gpu"
#: The image's own user (node_image/Dockerfile): pods run as it, never as root.
RUN_AS = 10001
#: What the restricted Pod Security profile asks of every pod and container (tests/operator/pod_security.py).
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                                      "capabilities": {"drop": ["ALL"]}}
#: Bytes on disk per byte in memory of a block's weights: a quantized span is downloaded in 16 bits.
DOWNLOAD_FACTOR = {"none": 1, "int8": 2, "nf4": 4}
SCRATCH_BYTES = 2**30  # ephemeral storage beyond the span's files: logs, /tmp, the runtime's caches


@dataclass(frozen=True)
class Owner:
    """The Swarm that owns everything built here."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> Body:
        return {
            "apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
            "controller": True, "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class DesiredServer:
    name: str
    pool: str
    span: Span


MAX_NAME = 63  # a DNS label: Services are named after servers


def pool_key(swarm: str, pool: str) -> str:
    """Six characters (a-z, 2-7) from a digest of (swarm, pool): what tells ``a-b``/``c`` from ``a``/``b-c``."""
    digest = hashlib.sha256(f"{swarm}/{pool}".encode()).digest()
    return base64.b32encode(digest).decode()[:6].lower()


def server_name(swarm: str, pool: str, span: Span, ordinal: int) -> str:
    """``<swarm>-<pool>-<key>-<start>-<end>-<n>``, at most 63 characters (the readable part is cut first).

    Swarm and pool names may both hold ``-``, so they alone cannot tell Swarm ``a-b`` with pool ``c``
    from Swarm ``a`` with pool ``b-c``; the key (:func:`pool_key`) does. Every name ends in a digit, so it
    never equals a Swarm's ``<swarm>-routemap`` either.
    """
    suffix = f"-{pool_key(swarm, pool)}-{span.start}-{span.end}-{ordinal}"
    return f"{swarm}-{pool}"[:MAX_NAME - len(suffix)].rstrip("-") + suffix


def routemap_name(swarm: str) -> str:
    return f"{swarm}-routemap"


def desired_servers(swarm: str, placement: Placement) -> list[DesiredServer]:
    seen: Counter[tuple[str, Span]] = Counter()
    out = []
    for placed in placement.servers:
        key = (placed.pool, placed.span)
        out.append(DesiredServer(server_name(swarm, placed.pool, placed.span, seen[key]), placed.pool, placed.span))
        seen[key] += 1
    return out


def selector_labels(swarm: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llmswarm", "app.kubernetes.io/instance": swarm,
            "app.kubernetes.io/component": component}


def labels(swarm: str, component: str, **extra: str) -> dict[str, str]:
    """Labels of an object; pods get :func:`pod_labels` (no version, so an operator upgrade restarts nothing)."""
    return {**pod_labels(swarm, component, **extra), "app.kubernetes.io/version": package_version()}


def pod_labels(swarm: str, component: str, **extra: str) -> dict[str, str]:
    return {
        **selector_labels(swarm, component),
        "app.kubernetes.io/part-of": "llmswarm",
        "app.kubernetes.io/managed-by": "llmswarm-operator",
        LABEL_SWARM: swarm,
        **extra,
    }


def _meta(owner: Owner, name: str, object_labels: dict[str, str], annotations: dict[str, str] | None = None) -> Body:
    meta: Body = {"name": name, "namespace": owner.namespace, "labels": object_labels,
                  "ownerReferences": [owner.reference()]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def service_host(name: str, namespace: str, settings: OperatorSettings) -> str:
    return f"{name}.{namespace}.{settings.cluster_domain}" if settings.cluster_domain else f"{name}.{namespace}"


def server_url(owner: Owner, server: DesiredServer, spec: SwarmSpec, settings: OperatorSettings) -> str:
    return f"http://{service_host(server.name, owner.namespace, settings)}:{spec.server.port}"


def routemap_url(owner: Owner, spec: SwarmSpec, settings: OperatorSettings) -> str:
    """Where pods in the cluster reach the route-map service."""
    return f"http://{service_host(routemap_name(owner.name), owner.namespace, settings)}:{spec.route_map.port}"


def public_routemap_url(owner: Owner, spec: SwarmSpec, settings: OperatorSettings) -> str:
    """What clients should use: the external address if the spec gives one."""
    external = spec.route_map.external_address
    if external:
        return external if "://" in external else f"http://{external}:{spec.route_map.port}"
    return routemap_url(owner, spec, settings)


def server_args(owner: Owner, spec: SwarmSpec, cost: BlockCost, server: DesiredServer, settings: OperatorSettings) -> list[str]:
    model = spec.model
    args = [
        "serve",
        "--model", model.source,
        "--blocks", str(server.span),
        "--host", "0.0.0.0",
        "--port", str(spec.server.port),
        "--public-url", server_url(owner, server, spec, settings),
        "--swarm", spec.join.url if spec.join else routemap_url(owner, spec, settings),
        "--server-id", server.name,
        "--served-model-name", model_shape(spec.model).name,  # as the route map's record names the model
        "--identity-file", f"{IDENTITY_DIR}/{IDENTITY_KEY}",
        "--dtype", model.dtype,
        "--quiet",
    ]
    if spec.join and spec.join.relay:
        args.append("--relay")  # listed at the joined route map's address: its side cannot reach these pods
    if model.quantization != "none":
        args += ["--quantization", model.quantization]
    if cost.cache_bytes:
        args += ["--kv-cache-bytes", str(cost.cache_bytes * len(server.span))]
    for adapter in spec.adapters:
        source = (adapter.path or (f"hub:{adapter.hub}" if adapter.hub else None)
                  or f"{PRELOADED_DIR}/{adapter.name}")
        args += ["--adapters", f"{adapter.name}={source}"]
    return args + list(spec.server.extra_args)


def adapter_volumes(spec: SwarmSpec) -> tuple[list[Body], list[Body]]:
    """(volumes, mounts) of the spec's adapters that come from ConfigMaps, one read-only folder each."""
    volumes = [{"name": f"adapter-{i}", "configMap": {"name": a.config_map}}
               for i, a in enumerate(spec.adapters) if a.config_map]
    mounts = [{"name": f"adapter-{i}", "mountPath": f"{PRELOADED_DIR}/{a.name}", "readOnly": True}
              for i, a in enumerate(spec.adapters) if a.config_map]
    return volumes, mounts


def adapter_sources(spec: SwarmSpec) -> list[dict[str, str]]:
    """What status says of the spec's adapters: each name and where servers load it from."""
    return [{"name": a.name, "source": f"configMap/{a.config_map}" if a.config_map
             else f"hub:{a.hub}" if a.hub else f"path:{a.path}"} for a in spec.adapters]


def _http_probe(path: str, period: int, failures: int) -> Body:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 5}


def image_pull_secrets(spec: SwarmSpec, settings: OperatorSettings) -> list[Body]:
    """The operator's pull secrets and the Swarm's, each once, in order."""
    names = dict.fromkeys([*settings.image_pull_secrets, *(ref.name for ref in spec.image_pull_secrets)])
    return [{"name": name} for name in names]


def gpu_env(resources: Body) -> list[Body]:
    """``NVIDIA_VISIBLE_DEVICES=void`` for a container that asks for no GPU.

    The CUDA image sets it to ``all``: on a node whose default runtime is NVIDIA's, a pod without a GPU limit
    would then see every GPU of the node, those the device plugin gave other pods included. ``void`` exposes
    none (and no driver). With a GPU limit, the device plugin sets it to the GPUs it allocated.
    """
    asked = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    return [] if GPU_RESOURCE in asked else [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]


def _hardened_pod(spec: SwarmSpec, settings: OperatorSettings, containers: list[Body], volumes: list[Body],
                  account: str | None = None) -> Body:
    """A pod spec that passes the restricted Pod Security profile: non-root, no privilege, a read-only root
    filesystem with a scratch ``/tmp``; an API token only with a ServiceAccount of its own (`account`)."""
    for container in containers:
        container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY)
        container["volumeMounts"] = [*container.get("volumeMounts", []), {"name": "tmp", "mountPath": "/tmp"}]
    pod: Body = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "automountServiceAccountToken": account is not None,  # only a pod with its own, least-privilege account
        "enableServiceLinks": False,
        "containers": containers,
        "volumes": [*volumes, {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    if account is not None:
        pod["serviceAccountName"] = account
    secrets = image_pull_secrets(spec, settings)
    if secrets:
        pod["imagePullSecrets"] = secrets
    return pod


def ephemeral_request(cost: BlockCost, num_blocks: int, quantization: str, store: bool) -> str:
    """Ephemeral storage a server needs. With a model store it holds no model file (they are on the store's
    volume): scratch space only. Without one it downloads or converts the whole model into its own cache: every
    block as downloaded (estimated; 10% more for embeddings and LM head), plus scratch space."""
    needed = SCRATCH_BYTES
    if not store:
        needed += cost.weight_bytes * num_blocks * DOWNLOAD_FACTOR.get(quantization, 1) * 11 // 10
    return f"{-(-needed // 2**20)}Mi"


def store_claim(swarm: str, spec: SwarmSpec) -> str:
    """The PersistentVolumeClaim of the Swarm's model store: the one the spec names, else ``<swarm>-models``."""
    assert spec.model_store is not None
    return spec.model_store.claim_name or f"{swarm}-models"


def store_key(spec: SwarmSpec) -> str:
    """The model's directory in the store (one per source and revision)."""
    from llmswarm_core.model_store import store_key as key

    return key(spec.model.source, spec.model.revision)


def hub_token_env(spec: SwarmSpec) -> list[Body]:
    """HF_TOKEN from the Swarm's Secret, for the pod that downloads the model."""
    ref = spec.model.hub_token_secret
    return [] if ref is None else [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _model_volume(owner: Owner, spec: SwarmSpec, resources: Body) -> tuple[str, list[Body], Body, Body]:
    """A server's model: (``--model``, env, volume, mount). From the store, read-only and with nothing to fetch;
    without one, the source itself, fetched into the pod's own cache (an emptyDir as big as its request)."""
    if spec.model_store is not None:
        volume = {"name": "models", "persistentVolumeClaim": {"claimName": store_claim(owner.name, spec), "readOnly": True}}
        return (f"{MODELS_DIR}/{store_key(spec)}", [], volume,
                {"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    size = resources["requests"]["ephemeral-storage"]
    return spec.model.source, hub_token_env(spec), {"name": "cache", "emptyDir": {"sizeLimit": size}}, {}


def _spread(owner: Owner, server: DesiredServer) -> Body:
    """Replicas of the same blocks prefer different nodes; a Swarm's servers spread evenly over nodes."""
    same_blocks = {LABEL_SWARM: owner.name, LABEL_BLOCKS: _blocks_label(server.span)}
    return {
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"labelSelector": {"matchLabels": same_blocks}, "topologyKey": "kubernetes.io/hostname"},
        }]}},
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {LABEL_SWARM: owner.name, "app.kubernetes.io/component": COMPONENT_SERVER}},
        }],
    }


def _blocks_label(span: Span) -> str:
    return f"{span.start}-{span.end}"


def server_deployment(
    owner: Owner, spec: SwarmSpec, cost: BlockCost, server: DesiredServer, settings: OperatorSettings,
) -> Body:
    pool = _pool(spec, server.pool)
    extra = {LABEL_SERVER: server.name, LABEL_POOL: server.pool}
    match = {LABEL_SWARM: owner.name, LABEL_SERVER: server.name}
    span = str(server.span)
    resources = _resources(pool)
    requests = resources.setdefault("requests", {})
    requests.setdefault("ephemeral-storage", ephemeral_request(cost, model_shape(spec.model).num_blocks,
                                                               spec.model.quantization, spec.model_store is not None))
    model, model_env, model_volume, model_mount = _model_volume(owner, spec, resources)
    args = server_args(owner, spec, cost, server, settings)
    args[args.index("--model") + 1] = model
    # With a store the pod's own cache holds only what it fetches besides the model (hub adapters): scratch size.
    cache = model_volume if model_volume["name"] == "cache" else {"name": "cache", "emptyDir": {"sizeLimit": f"{SCRATCH_BYTES // 2**20}Mi"}}
    container: Body = {
        "name": "server",
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["llmswarm"],
        "args": args,
        "ports": [{"name": "http", "containerPort": spec.server.port, "protocol": "TCP"}],
        "env": [
            {"name": "LLMSWARM_CACHE", "value": CACHE_DIR},
            {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
            *gpu_env(resources),
            *(join_env(spec) if spec.join else token_env(settings)),
            *model_env,
        ],
        "resources": resources,
        # Loading a span can take minutes: the startup probe covers it (up to 30 minutes).
        "startupProbe": _http_probe("/healthz", 10, 180),
        "livenessProbe": _http_probe("/healthz", 20, 3),
        "readinessProbe": _http_probe("/readyz", 5, 2),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, *([model_mount] if model_mount else []),
                         {"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True}, *adapter_volumes(spec)[1]],
    }
    # Read-only for the pod's user and its fsGroup (the file's group): nobody else.
    identity = {"name": "identity", "secret": {"secretName": identity_secret_name(server.name), "defaultMode": 0o440}}
    volumes = [cache, *([model_volume] if model_volume is not cache else []), identity, *adapter_volumes(spec)[0]]
    pod_spec = _hardened_pod(spec, settings, [container], volumes)
    pod_spec["terminationGracePeriodSeconds"] = 60
    pod_spec.update(_spread(owner, server))
    if pool.runtime_class_name:
        pod_spec["runtimeClassName"] = pool.runtime_class_name
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, server.name, labels(owner.name, COMPONENT_SERVER, **extra), {ANNOTATION_SPAN: span}),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": match},
            # A changed pod (image, resources) starts next to the old one, which keeps serving until then.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels(owner.name, COMPONENT_SERVER, **extra, **{LABEL_BLOCKS: _blocks_label(server.span)}),
                    "annotations": {
                        ANNOTATION_SPAN: span,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(spec.server.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def identity_secret_name(server: str) -> str:
    return f"{server}-identity"


def identity_secret(owner: Owner, server: str, private_key_pem: bytes) -> Body:
    """A server's Ed25519 key (identity.py), made once by the operator and never rewritten: every pod of the
    server, through rollouts and restarts, speaks for the same id with it. Deleted with the server."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(owner, identity_secret_name(server),
                          labels(owner.name, COMPONENT_IDENTITY, **{LABEL_SERVER: server})),
        "data": {IDENTITY_KEY: base64.b64encode(private_key_pem).decode()},
    }


def server_service(owner: Owner, spec: SwarmSpec, server: DesiredServer) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            owner, server.name,
            labels(owner.name, COMPONENT_SERVER, **{LABEL_SERVER: server.name, LABEL_POOL: server.pool}),
            {ANNOTATION_SPAN: str(server.span)},
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_SWARM: owner.name, LABEL_SERVER: server.name},
            "ports": [{"name": "http", "port": spec.server.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def routemap_configmap(owner: Owner, routes: RouteMap, assignment: str | None = None) -> Body:
    """The route map (``routes.json``) and, once the rebalancer moved servers, their spans (``assignment.json``)."""
    data = {ROUTES_FILE: routes.model_dump_json(indent=1)}
    if assignment is not None:
        data[ASSIGNMENT_FILE] = assignment
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, routemap_name(owner.name), labels(owner.name, COMPONENT_ROUTEMAP)),
        "data": data,
    }


def token_env(settings: OperatorSettings) -> list[Body]:
    """LLMSWARM_TOKEN from the operator's token Secret, for every process that serves the swarm."""
    if not settings.token_secret:
        return []
    name, _, key = settings.token_secret.partition(":")
    return [{"name": "LLMSWARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key or "token"}}}]


def join_credential(spec: SwarmSpec) -> tuple[str, str]:
    """(Secret name, key) of a joined Swarm's credential."""
    assert spec.join is not None
    name, _, key = spec.join.credential_secret.partition(":")
    return name, key or "credential"


def join_env(spec: SwarmSpec) -> list[Body]:
    """A joined Swarm's servers: the joined swarm's credential as their token, and its authority key if it has one."""
    assert spec.join is not None
    name, key = join_credential(spec)
    env: list[Body] = [{"name": "LLMSWARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}]
    if spec.join.authority_key:
        env.append({"name": "LLMSWARM_AUTHORITY_KEY", "value": spec.join.authority_key})
    return env


def routemap_args(spec: SwarmSpec, settings: OperatorSettings, owner: Owner) -> list[str]:
    """What the route map is told beyond its record: outside servers, the relay and its public address."""
    args = ["--outside-servers"] if spec.route_map.outside_servers else []
    if spec.route_map.relay:
        args.append("--relay")
        if spec.route_map.external_address:
            args += ["--public-url", public_routemap_url(owner, spec, settings)]
    return args


def routemap_deployment(owner: Owner, spec: SwarmSpec, settings: OperatorSettings) -> Body:
    name = routemap_name(owner.name)
    port = spec.route_map.port
    resources = {"requests": {"cpu": "50m", "memory": "128Mi", "ephemeral-storage": "64Mi"}, "limits": {"memory": "512Mi"}}
    container: Body = {
        "name": "routemap",
        "image": settings.routemap_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "llmswarm_control.routemap_service"],
        # The record through the API (within a second) and from the mounted file (the kubelet refreshes it a
        # minute late): the newer counts, so a server the operator deleted is not served from a stale file.
        "args": ["--routes", f"{ROUTES_DIR}/{ROUTES_FILE}", "--configmap", name, "--host", "0.0.0.0", "--port", str(port),
                 "--adapter-dir", ADAPTERS_DIR, *routemap_args(spec, settings, owner)],
        "env": [*gpu_env(resources), *token_env(settings)],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": resources,
        "readinessProbe": _http_probe("/readyz", 5, 3),  # ready once it read routes.json
        "livenessProbe": _http_probe("/healthz", 20, 3),
        "volumeMounts": [{"name": "routes", "mountPath": ROUTES_DIR, "readOnly": True},
                         {"name": "adapters", "mountPath": ADAPTERS_DIR}],
    }
    claim = spec.route_map.adapter_claim
    # Published adapters outlive the pod on a claim; without one they live as long as the pod (its own disk).
    adapters = ({"name": "adapters", "persistentVolumeClaim": {"claimName": claim}} if claim
                else {"name": "adapters", "emptyDir": {"sizeLimit": "2Gi"}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, labels(owner.name, COMPONENT_ROUTEMAP)),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {LABEL_SWARM: owner.name, "app.kubernetes.io/component": COMPONENT_ROUTEMAP}},
            # A claim that one node mounts at a time: the old pod lets go of it before the new one starts.
            "strategy": {"type": "Recreate" if claim else "RollingUpdate"},
            "template": {
                "metadata": {
                    "labels": pod_labels(owner.name, COMPONENT_ROUTEMAP),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": _hardened_pod(spec, settings, [container], [{"name": "routes", "configMap": {"name": name}},
                                                                    adapters], account=name),
            },
        },
    }


def routemap_access(owner: Owner) -> tuple[Body, Body, Body]:
    """The route map's own ServiceAccount, and a Role (with its RoleBinding) that lets it read and watch its
    ConfigMap and nothing else (``resourceNames``)."""
    name = routemap_name(owner.name)
    object_labels = labels(owner.name, COMPONENT_ROUTEMAP)
    account: Body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(owner, name, object_labels),
                     "automountServiceAccountToken": False}  # mounted by the route-map pod only, which asks for it
    role: Body = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(owner, name, object_labels),
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get", "list", "watch"]}],
    }
    binding: Body = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(owner, name, object_labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }
    return account, role, binding


def disruption_budget_name(swarm: str) -> str:
    return f"{swarm}-servers"


def server_disruption_budget(owner: Owner, min_replicas: int) -> Body:
    """A PodDisruptionBudget over the Swarm's block servers: voluntary evictions (node drains, cluster upgrades)
    take at most ``min_replicas - 1`` servers at once, so every block keeps one (`min_replicas`: the fewest
    desired servers holding any block). With one server per block, nothing is evicted until the Swarm gets
    more; a pod that is not ready serves nothing and may always go."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, disruption_budget_name(owner.name), labels(owner.name, COMPONENT_SERVER)),
        "spec": {
            "maxUnavailable": max(min_replicas - 1, 0),
            "selector": {"matchLabels": {LABEL_SWARM: owner.name, "app.kubernetes.io/component": COMPONENT_SERVER}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def routemap_service(owner: Owner, spec: SwarmSpec) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, routemap_name(owner.name), labels(owner.name, COMPONENT_ROUTEMAP)),
        "spec": {
            "type": spec.route_map.service_type,
            "selector": {LABEL_SWARM: owner.name, "app.kubernetes.io/component": COMPONENT_ROUTEMAP},
            "ports": [{"name": "http", "port": spec.route_map.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _pool(spec: SwarmSpec, name: str) -> PoolSpec:
    for pool in spec.pools:
        if pool.name == name:
            return pool
    raise KeyError(name)


def _resources(pool: PoolSpec) -> Body:
    out: Body = {}
    if pool.resources.requests:
        out["requests"] = {k: str(v) for k, v in pool.resources.requests.items()}
    if pool.resources.limits:
        out["limits"] = {k: str(v) for k, v in pool.resources.limits.items()}
    return out


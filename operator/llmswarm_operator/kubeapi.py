"""A small async Kubernetes API client, and ``apply()`` that treats "exists" and "not found" explicitly.

It uses the credentials Kopf logs in with (a :class:`kopf.ConnectionInfo`), so the operator
has one login. Only what the operator needs: get, list (with a label selector, also
filtered here), create, merge-patch, delete.

Writes are JSON merge patches (RFC 7386), not Server-Side Apply: the API emulator the tests
run against cannot serve SSA (docs/testing.md says what it lacks), while merge patches mean
the same there and on every API server. :func:`apply` explains why its patches are correct.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import kopf

log = logging.getLogger("llmswarm.operator.kubeapi")

HASH_ANNOTATION = "llmswarm.dev/spec-hash"  # digest of the manifest the operator built
APPLIED_ANNOTATION = "llmswarm.dev/last-applied"  # the map keys that manifest set (see applied_keys)

#: kind -> (apiVersion, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Deployment": ("apps/v1", "deployments", True),
    "Service": ("v1", "services", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Secret": ("v1", "secrets", True),
    "Pod": ("v1", "pods", True),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets", True),
    "Event": ("v1", "events", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "Job": ("batch/v1", "jobs", True),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims", True),
    "Swarm": ("llmswarm.dev/v1alpha1", "swarms", True),
}

Body = dict[str, Any]


#: Statuses that a retry of the same request cannot change (bad request, unauthorized, forbidden, not found,
#: method not allowed, not acceptable, too large, unsupported media type, invalid): a person must act.
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 406, 413, 415, 422})


class ApiError(Exception):
    """The API server refused a request; `status` is its HTTP status, `request` the method and path."""

    def __init__(self, status: int, message: str, reason: str = "", request: str = "") -> None:
        super().__init__(f"{request + ': ' if request else ''}{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.request = request

    @property
    def permanent(self) -> bool:
        return self.status in PERMANENT_STATUSES


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class OwnershipConflict(Exception):
    """An object the operator would write exists and belongs to something else: it is left alone."""

    def __init__(self, kind: str, name: str, holder: str) -> None:
        whose = "has no owner" if holder == "no owner" else f"is owned by {holder}"
        super().__init__(f"{kind} {name} exists and {whose}, not by this Swarm: it is left alone (delete or rename "
                         "it, and the operator creates its own)")
        self.kind = kind
        self.name = name
        self.holder = holder


def path_for(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural, namespaced = RESOURCES[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name)}"
    if subresource is not None:
        base += f"/{subresource}"
    return base


def manifest_hash(obj: Mapping[str, Any]) -> str:
    """Digest of a manifest, ignoring the annotations this module adds."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:20]


def _canonical(obj: Mapping[str, Any]) -> str:
    clean = json.loads(json.dumps(obj))
    meta = clean.get("metadata", {})
    annotations = meta.get("annotations", {})
    annotations.pop(HASH_ANNOTATION, None)
    annotations.pop(APPLIED_ANNOTATION, None)
    if "annotations" in meta and not annotations:
        del meta["annotations"]
    return json.dumps(clean, sort_keys=True, separators=(",", ":"))


def applied_keys(obj: Mapping[str, Any]) -> Body:
    """The map keys `obj` sets, nested, each leaf (a scalar or a list) as ``1``: all that :func:`removals` needs.

    Recording keys rather than the manifest keeps the annotation small (a ConfigMap's data
    would otherwise be stored twice, against the 256 KiB limit on all annotations together).
    A full manifest recorded by an earlier version reads the same.
    """
    return {key: applied_keys(value) if isinstance(value, Mapping) else 1 for key, value in obj.items()}


def with_hash(obj: Body) -> Body:
    """A copy of `obj` annotated with its digest and with the keys it sets."""
    out = json.loads(json.dumps(obj))
    annotations = out.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[HASH_ANNOTATION] = manifest_hash(obj)
    annotations[APPLIED_ANNOTATION] = json.dumps(applied_keys(json.loads(_canonical(obj))), sort_keys=True,
                                                 separators=(",", ":"))
    return out


def removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> Body:
    """A merge patch that deletes what `old` set and `new` no longer sets (maps only; lists are replaced)."""
    out: Body = {}
    for key, value in old.items():
        if key not in new:
            out[key] = None
        elif isinstance(value, Mapping) and isinstance(new[key], Mapping):
            nested = removals(value, new[key])
            if nested:
                out[key] = nested
    return out


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> Body:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


CredentialsLoader = Callable[[], kopf.ConnectionInfo | None]


@dataclass
class _Session:
    http: aiohttp.ClientSession
    server: str
    headers: dict[str, str]
    ssl: ssl.SSLContext | bool | None


class KubeClient:
    """Async client over aiohttp. Give it credentials with :meth:`use` (the Kopf login handler does)."""

    def __init__(self, loader: CredentialsLoader | None = None, timeout: float = 30.0) -> None:
        self._loader = loader
        self._info: kopf.ConnectionInfo | None = None
        self._session: _Session | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ready = asyncio.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stale: list[_Session] = []

    def use(self, info: kopf.ConnectionInfo, loader: CredentialsLoader | None = None) -> None:
        """Use these credentials from now on (and `loader` to refresh them after a 401)."""
        if loader is not None:
            self._loader = loader
        if info != self._info:
            self._info = info
            if self._session is not None:
                self._stale.append(self._session)  # closed by the next request, in the event loop
                self._session = None
        self._ready.set()

    async def close(self) -> None:
        while self._stale:
            await self._stale.pop().http.close()
        if self._session is not None:
            await self._session.http.close()
            self._session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _open(self) -> _Session:
        while self._stale:
            await self._stale.pop().http.close()
        if self._session is None:
            if self._info is None:
                if self._loader is not None and (info := self._loader()) is not None:
                    self.use(info)
                else:
                    await asyncio.wait_for(self._ready.wait(), self._timeout.total)
            assert self._info is not None
            self._session = self._build(self._info)
        return self._session

    def _file(self, name: str, data: str | bytes) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmswarm-kube-")
        raw = data.encode() if isinstance(data, str) else data
        try:  # kubeconfig *-data fields are base64; kopf passes them as they are in the file
            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            pass
        path = os.path.join(self._tmp.name, name)
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def _build(self, info: kopf.ConnectionInfo) -> _Session:
        headers = {"Accept": "application/json", "User-Agent": "llmswarm-operator"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            pair = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        context: ssl.SSLContext | bool | None = None
        if info.server.startswith("https://"):
            if info.insecure:
                context = False
            else:
                ca_path = info.ca_path
                if info.ca_data:
                    ca_path = self._file("ca.crt", info.ca_data)
                context = ssl.create_default_context(cafile=os.fspath(ca_path) if ca_path else None)
                cert, key = info.certificate_path, info.private_key_path
                if info.certificate_data:
                    cert = self._file("client.crt", info.certificate_data)
                if info.private_key_data:
                    key = self._file("client.key", info.private_key_data)
                if cert:
                    context.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
        http = aiohttp.ClientSession(timeout=self._timeout, trust_env=info.trust_env)
        return _Session(http, info.server.rstrip("/"), headers, context)

    async def request(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        for attempt in (1, 2):
            session = await self._open()
            headers = dict(session.headers)
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body)
            async with session.http.request(
                method, session.server + path, data=data, params=params, headers=headers, ssl=session.ssl,
            ) as response:
                text = await response.text()
                if response.status == 401 and attempt == 1 and self._loader is not None:
                    info = self._loader()  # a rotated service-account token, a refreshed kubeconfig
                    if info is not None:
                        self.use(info)
                        continue
                if response.status >= 400:
                    raise _error(response.status, text, f"{method} {path}")
                return json.loads(text) if text else None
        raise AssertionError("unreachable")

    # ---- verbs ------------------------------------------------------------------------------------------------

    async def get(self, kind: str, namespace: str, name: str) -> Body | None:
        try:
            return await self.request("GET", path_for(kind, namespace, name))  # type: ignore[no-any-return]
        except NotFound:
            return None

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str] | None = None) -> list[Body]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else None
        answer = await self.request("GET", path_for(kind, namespace), params=params)
        items = list((answer or {}).get("items") or [])
        return [item for item in items if not selector or matches_labels(item, selector)]

    async def create(self, obj: Body) -> Body:
        meta = obj["metadata"]
        return await self.request("POST", path_for(obj["kind"], meta.get("namespace")), body=obj)  # type: ignore[no-any-return]

    async def patch(self, kind: str, namespace: str, name: str, patch: Body, subresource: str | None = None) -> Body:
        return await self.request(  # type: ignore[no-any-return]
            "PATCH", path_for(kind, namespace, name, subresource), body=patch, content_type="application/merge-patch+json",
        )

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete in the background (dependents by garbage collection); False if it was already gone."""
        try:
            await self.request("DELETE", path_for(kind, namespace, name), body={"propagationPolicy": "Background"})
        except NotFound:
            return False
        return True


def _error(status: int, text: str, request: str = "") -> ApiError:
    try:
        payload = json.loads(text)
        message, reason = str(payload.get("message", text)), str(payload.get("reason", ""))
    except (ValueError, AttributeError):
        message, reason = text[:500], ""
    if status == 404:
        return NotFound(status, message, reason, request)
    if status == 409:
        return Conflict(status, message, reason, request)
    return ApiError(status, message, reason, request)


ApplyResult = Literal["created", "updated", "unchanged"]


_UNKNOWN: Any = object()


async def apply(kube: KubeClient, obj: Body, existing: Body | None = _UNKNOWN) -> ApplyResult:
    """Make the object exist as built: create it, or patch it when its digest changed.

    `existing` is the object as just listed (None: known to be absent); without it, it is read.

    Why one merge patch is a correct update (what ``kubectl apply`` does on the client side,
    and what Server-Side Apply does for one field manager that always forces):

    - a merge patch sets every field the manifest gives, replaces lists whole (the manifest's
      list is the list) and leaves fields it does not name as they are: what the API server
      defaulted and what others add (the Deployment controller's revision annotation, a
      ``kubectl rollout restart`` stamp) survive;
    - a field the operator set before and no longer sets (a pool's ``nodeSelector`` emptied,
      a resource limit, a label, the ConfigMap's ``assignment.json``) gets an explicit
      ``null``: the previous manifest's keys are recorded on the object
      (:data:`APPLIED_ANNOTATION`), and :func:`removals` compares them with the new ones;
    - the digest (:data:`HASH_ANNOTATION`) skips the write when nothing the operator builds
      changed, so a restarted operator writes nothing and server-side defaults never cause
      endless updates.

    An object that exists but is not owned by the controller the manifest names (another Swarm's, or one
    made by hand) is never written: :class:`OwnershipConflict` says whose it is.

    The known difference from SSA with ``force``: a hand edit of a field the operator sets
    stays until what the operator builds for that object changes (SSA would undo it at the
    next apply), and nothing records who owns which field.
    """
    obj = with_hash(obj)
    meta = obj["metadata"]
    kind, namespace, name = obj["kind"], meta["namespace"], meta["name"]
    if existing is _UNKNOWN:
        existing = await kube.get(kind, namespace, name)
    if existing is None:
        try:
            await kube.create(obj)
            return "created"
        except Conflict:  # created meanwhile (another worker, or a slow cache)
            existing = await kube.get(kind, namespace, name)
            if existing is None:
                raise
    check_owner(obj, existing)
    annotations = existing.get("metadata", {}).get("annotations") or {}
    if annotations.get(HASH_ANNOTATION) == meta["annotations"][HASH_ANNOTATION]:
        return "unchanged"
    try:
        applied = json.loads(annotations.get(APPLIED_ANNOTATION) or "{}")
    except ValueError:
        applied = {}
    patch = merge(obj, removals(applied, obj)) if isinstance(applied, Mapping) else obj
    await kube.patch(kind, namespace, name, patch)
    return "updated"


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def check_owner(obj: Mapping[str, Any], existing: Mapping[str, Any]) -> None:
    """Raise :class:`OwnershipConflict` unless `existing` is owned by the controller `obj` names (if it names one)."""
    wanted = controller_of(obj)
    if wanted is None:
        return
    refs = (existing.get("metadata") or {}).get("ownerReferences") or []
    if any(ref.get("uid") == wanted.get("uid") for ref in refs):
        return
    holder = controller_of(existing) or (refs[0] if refs else None)
    raise OwnershipConflict(obj["kind"], obj["metadata"]["name"],
                            f"{holder.get('kind')} {holder.get('name')}" if holder else "no owner")


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Kopf's own minimal logins: in-cluster service account first, then KUBECONFIG / ~/.kube/config."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

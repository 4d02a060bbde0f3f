"""One reconciliation of one Swarm: read what exists, decide with the pure planner, act, report.

Handlers and the timer call :func:`reconcile`; it is idempotent (objects are applied by
digest, see :mod:`llmswarm_operator.kubeapi`) and fast (a handful of API calls, no waiting).
It returns the status to write and the events worth telling, and never writes the
Swarm itself: the Kopf handler does that with ``patch.status``.

It also reads the Swarm's route map (``GET /v1/routes``, a short timeout): servers there that
the operator did not create are outside servers (:mod:`llmswarm_operator.outside`). The online
ones hold their blocks, so the placement gives the operator's servers only the rest; when the
map cannot be read, nothing counts as outside and the reconciliation goes on as without them.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import ModelInfo, RouteMap
from llmswarm_core.routemap_client import RouteMapClient, RouteMapError
from llmswarm_core.security import token_from_env
from llmswarm_core.spans import Span, coverage
from llmswarm_operator import manifests as m
from llmswarm_operator import store as mstore
from llmswarm_operator.assignment import Assignment, fits
from llmswarm_operator.kubeapi import Conflict, KubeClient, OwnershipConflict, apply, check_owner
from llmswarm_operator.outside import OutsideServer, coverage_of, outside_servers
from llmswarm_operator.planner import ExistingServer, ServerEntry, online_coverage, plan_servers, ready_servers, route_map
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.status import Seen, condition, conflict_message, find_condition, invalid_status, swarm_status
from llmswarm_operator.swarm_spec import InvalidSpec, SwarmSpec, check_name, parse_spec, plan_placement
from llmswarm_operator.timestamps import epoch, iso, now_iso

Body = dict[str, Any]

log = logging.getLogger("llmswarm.operator")

#: Seconds the operator waits for its route map's answer: it never holds a reconciliation up longer.
ROUTES_TIMEOUT = 3.0


@dataclass
class Outcome:
    status: Body
    phase: str
    invalid: str | None = None  # the reason the spec cannot be acted on
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    writes: dict[str, int] = field(default_factory=dict)  # "created Deployment" -> count
    conflicts: list[str] = field(default_factory=list)  # objects left alone: they exist and are not this Swarm's
    # What the rebalancer builds on (empty for an invalid spec):
    desired: list[m.DesiredServer] = field(default_factory=list)  # the servers that should exist
    entries: list[ServerEntry] = field(default_factory=list)  # every server now, with its state
    workloads: set[str] = field(default_factory=set)  # names of every server Deployment, draining ones included
    num_blocks: int = 0
    rebalanced: bool = False  # `desired` comes from a rebalanced assignment, not from the placement
    outside: list[OutsideServer] = field(default_factory=list)  # servers in the route map the operator did not create

    def count(self, what: str) -> None:
        self.writes[what] = self.writes.get(what, 0) + 1


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def _span(text: str | None) -> Span | None:
    try:
        start, end = (int(part) for part in str(text).split(":"))
        return Span(start, end)
    except ValueError:
        return None


def existing_servers(deployments: list[Body]) -> dict[str, ExistingServer]:
    out = {}
    for d in deployments:
        meta = d.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get("app.kubernetes.io/component") != m.COMPONENT_SERVER:
            continue
        annotations = meta.get("annotations") or {}
        span = _span(annotations.get(m.ANNOTATION_SPAN))
        if span is None:
            continue
        out[meta["name"]] = ExistingServer(meta["name"], labels.get(m.LABEL_POOL, ""), span,
                                           epoch(annotations.get(m.ANNOTATION_DRAINING)))
    return out


def stored_assignment(configmap: Body | None) -> Assignment | None:
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get(m.ASSIGNMENT_FILE)
    return Assignment.from_json(text) if text else None


def previous_route_map(configmap: Body | None) -> RouteMap | None:
    if configmap is None:
        return None
    try:
        return RouteMap.model_validate_json((configmap.get("data") or {}).get(m.ROUTES_FILE, ""))
    except (ValidationError, ValueError):
        return None


async def reconcile(kube: KubeClient, settings: OperatorSettings, body: Mapping[str, Any], now: float | None = None,
                    assignment: Assignment | None = None) -> Outcome:
    """Converge the Swarm's objects; `assignment` (from the rebalancer) replaces the stored one."""
    now = time.time() if now is None else now
    meta = body.get("metadata") or {}
    name, namespace, uid = meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", "")
    generation = meta.get("generation")
    previous = body.get("status") or {}
    try:
        check_name(name)
        spec = parse_spec(body.get("spec"))
        shape, cost, placement = plan_placement(spec)
    except InvalidSpec as error:
        outcome = Outcome(invalid_status(str(error), generation, previous), "Failed", invalid=str(error))
        old = find_condition(previous, "Ready")
        if old is None or old.get("reason") != "InvalidSpec" or old.get("message") != str(error):
            outcome.events.append(("Warning", "InvalidSpec", str(error)))
        return outcome
    if not uid:
        raise RuntimeError(f"Swarm {namespace}/{name} has no metadata.uid; owner references need one")

    owner = m.Owner(name, namespace, uid)
    outcome = Outcome({}, "")

    # ---- observe ----
    selector = {m.LABEL_SWARM: name}
    deployments = [d for d in await kube.list("Deployment", namespace, selector) if owned_by(d, uid)]
    services = [s for s in await kube.list("Service", namespace, selector) if owned_by(s, uid)]
    pods = await kube.list("Pod", namespace, selector)
    configmap = await kube.get("ConfigMap", namespace, m.routemap_name(name))
    ours = configmap if configmap is not None and owned_by(configmap, uid) else None  # never read another's record
    if assignment is None:
        assignment = stored_assignment(ours)
    existing = existing_servers(deployments)
    model = ModelInfo(name=shape.name, num_blocks=shape.num_blocks, hidden_size=shape.hidden_size)
    credential = await join_token(kube, namespace, spec) if spec.join else None
    outside = await observe_outside(owner, spec, settings, model, own_ids(existing, ours, assignment), credential)
    if any(s.online for s in outside):  # they hold blocks: the operator's servers cover the rest
        shape, cost, placement = plan_placement(spec, coverage_of(shape.num_blocks, outside))
    if assignment is not None and not fits(assignment, name, placement):
        assignment = None  # the spec changed the servers: the placement wins
    desired = list(assignment.servers) if assignment is not None else m.desired_servers(name, placement)
    ready = ready_servers(pods, m.LABEL_SERVER)
    plan = plan_servers(desired, existing, ready, num_blocks=shape.num_blocks, redundancy=spec.redundancy,
                        now=now, drain_seconds=settings.drain_seconds)

    # ---- act: the route-map service first, then new servers, then old ones ----
    listed = {("Deployment", d["metadata"]["name"]): d for d in deployments}
    listed.update({("Service", s["metadata"]["name"]): s for s in services})
    fewest = min(coverage(shape.num_blocks, [d.span for d in desired]), default=0)
    # A Swarm that joins another swarm has no route map of its own: its servers announce to the joined one.
    routemap_objects = () if spec.join else (*m.routemap_access(owner), m.routemap_service(owner, spec),
                                              m.routemap_deployment(owner, spec, settings))
    for obj in (*routemap_objects, m.server_disruption_budget(owner, fewest)):
        await _apply(kube, obj, outcome, listed)
    if spec.join:  # joined since: the route map it ran before goes
        for kind in ("Deployment", "Service"):
            if (kind, m.routemap_name(name)) in listed and await kube.delete(kind, namespace, m.routemap_name(name)):
                outcome.count(f"deleted {kind}")
    store = await _model_store(kube, owner, spec, settings, outcome) if spec.model_store is not None else None
    for server in desired:
        if store is not None and store.phase != mstore.READY:
            continue  # no server before its model is in the store; existing ones (an older revision) stay as they are
        if ("Deployment", server.name) not in listed:  # a new server: its key first (its pods mount it)
            await _create_identity(kube, owner, server.name, outcome)
        if await _apply(kube, m.server_deployment(owner, spec, cost, server, settings), outcome, listed) == "created":
            outcome.events.append(("Normal", "ServerCreated", f"server {server.name} for blocks [{server.span.start}, "
                                   f"{server.span.end}) in pool {server.pool}"))
        await _apply(kube, m.server_service(owner, spec, server), outcome, listed)
    for server_name in plan.drain:
        await kube.patch("Deployment", namespace, server_name,
                         {"metadata": {"annotations": {m.ANNOTATION_DRAINING: iso(now, fraction=True)}}})
        outcome.count("drained Deployment")
        outcome.events.append(("Normal", "ServerDraining", f"server {server_name} is no longer needed: draining for "
                               f"{settings.drain_seconds:g} s before removal"))
    for server_name in plan.undrain:
        await kube.patch("Deployment", namespace, server_name, {"metadata": {"annotations": {m.ANNOTATION_DRAINING: None}}})
        outcome.count("undrained Deployment")
    for server_name in plan.delete:
        for kind, object_name in (("Deployment", server_name), ("Service", server_name),
                                  ("Secret", m.identity_secret_name(server_name))):
            if await kube.delete(kind, namespace, object_name):
                outcome.count(f"deleted {kind}")
        outcome.events.append(("Normal", "ServerRemoved", f"server {server_name} removed"))
    keep = {e.name for e in plan.entries} | (set() if spec.join else {m.routemap_name(name)})
    for service in services:
        service_name = service["metadata"]["name"]
        if service_name not in keep and service_name not in plan.delete:
            if await kube.delete("Service", namespace, service_name):
                outcome.count("deleted Service")

    # ---- publish the route map ----
    urls = {e.name: f"http://{m.service_host(e.name, namespace, settings)}:{spec.server.port}" for e in plan.entries}
    routes = route_map(model, plan.entries, urls, spec.model.dtype, previous_route_map(ours))
    stored = assignment.to_json() if assignment is not None else None
    await _apply(kube, m.routemap_configmap(owner, routes, stored), outcome, {("ConfigMap", m.routemap_name(name)): configmap})

    # ---- report ----
    online = [a + b for a, b in zip(online_coverage(shape.num_blocks, plan.entries), coverage_of(shape.num_blocks, outside),
                                    strict=True)]
    seen = Seen(
        redundancy=spec.redundancy, placement=placement, plan=plan,
        online_coverage=online, routemap_version=routes.version,
        routemap_url=spec.join.url if spec.join else m.public_routemap_url(owner, spec, settings),
        routemap_configmap=m.routemap_name(name),
        generation=generation, conflicts=tuple(outcome.conflicts), outside=tuple(outside),
    )
    outcome.status = swarm_status(seen, previous)
    outcome.status["adapters"] = m.adapter_sources(spec)
    if store is not None:
        _report_store(outcome, store, spec, previous)
    outcome.phase = outcome.status["phase"]
    outcome.desired, outcome.entries, outcome.num_blocks = desired, list(plan.entries), shape.num_blocks
    outcome.workloads, outcome.rebalanced = set(existing), assignment is not None
    outcome.outside = outside
    if not placement.feasible and (previous.get("placement") or {}).get("message") != placement.message:
        outcome.events.append(("Warning", "PlacementInsufficient", placement.message))
    if outcome.conflicts and conflict_message(outcome.conflicts) != (find_condition(previous, "Degraded") or {}).get("message"):
        outcome.events.append(("Warning", "ObjectConflict", conflict_message(outcome.conflicts)))
    return outcome


def own_ids(existing: Mapping[str, ExistingServer], record: Body | None, assignment: Assignment | None) -> set[str]:
    """Ids of the servers the operator knows as the Swarm's: its workloads, its last record's, its assignment's."""
    routes = previous_route_map(record)
    return (set(existing) | {s.id for s in (routes.servers if routes is not None else [])}
            | {s.name for s in (assignment.servers if assignment is not None else ())})


def routemap_read_url(owner: m.Owner, spec: SwarmSpec, settings: OperatorSettings) -> str:
    """Where the operator reads the Swarm's route map (`routemap_url`: the route map's Service by default)."""
    host = m.service_host(m.routemap_name(owner.name), owner.namespace, settings)
    return settings.routemap_url.format(host=host, swarm=owner.name, namespace=owner.namespace, port=spec.route_map.port)


_unread: dict[str, str] = {}  # route-map URL -> why it could not be read last time (logged once per reason)


async def read_routes(url: str, token: str | None, timeout: float = ROUTES_TIMEOUT) -> RouteMap | None:
    """``GET {url}/v1/routes`` with `token`; None (and a log line) when the map cannot be read."""
    try:
        async with RouteMapClient(url, token, timeout=timeout) as client:
            routes = await client.routes()
    except RouteMapError as error:
        level = logging.DEBUG if _unread.get(url) == str(error) else logging.WARNING
        _unread[url] = str(error)
        log.log(level, "outside servers are not counted: %s", error)
        return None
    if _unread.pop(url, None) is not None:
        log.info("the route map at %s answers again", url)
    return routes


async def observe_outside(owner: m.Owner, spec: SwarmSpec, settings: OperatorSettings, model: ModelInfo,
                          own: set[str], join_credential: str | None = None) -> list[OutsideServer]:
    """The outside servers in the Swarm's route map (with spec.join, the joined swarm's, read with
    `join_credential`); none when the map cannot be read."""
    if spec.join:
        token, url = join_credential, spec.join.url
    else:
        token = token_from_env(None) if settings.token_secret else None  # the chart gives the operator the swarm token
        url = routemap_read_url(owner, spec, settings)
    routes = await read_routes(url, token)
    if routes is None:
        return []
    return outside_servers(routes, model, owner.name, [p.name for p in spec.pools], own)


async def join_token(kube: KubeClient, namespace: str, spec: SwarmSpec) -> str | None:
    """The join credential in spec.join's Secret (the one Secret the operator reads), None where it is missing."""
    name, key = m.join_credential(spec)
    secret = await kube.get("Secret", namespace, name)
    encoded = ((secret or {}).get("data") or {}).get(key)
    if not encoded:
        log.warning("Secret %s/%s has no key %r: the joined swarm's route map is read without a credential",
                    namespace, name, key)
        return None
    try:
        return base64.b64decode(encoded).decode().strip()
    except ValueError:
        log.warning("Secret %s/%s: key %r is not base64 text", namespace, name, key)
        return None


async def _model_store(kube: KubeClient, owner: m.Owner, spec: SwarmSpec, settings: OperatorSettings,
                       outcome: Outcome) -> mstore.StoreState:
    """Make the store's claim (unless the spec names one) and its fill Job exist; say how far the fill is.

    Both are created once and never patched (a claim's and a Job's spec are mostly immutable): a new revision is
    a new Job, and the earlier revisions' Jobs go once it succeeded. One that exists and is not this Swarm's is
    left alone and reported."""
    claim, key = m.store_claim(owner.name, spec), m.store_key(spec)
    built = mstore.fill_job(owner, spec, settings)
    name = built["metadata"]["name"]
    wanted = [("PersistentVolumeClaim", mstore.store_claim(owner, spec))] if spec.model_store and not spec.model_store.claim_name else []
    job: Body | None = None
    for kind, obj in [*wanted, ("Job", built)]:
        existing = await kube.get(kind, owner.namespace, obj["metadata"]["name"])
        if existing is None:
            try:
                existing = await kube.create(obj)
            except Conflict:  # made meanwhile: read again at the next reconciliation
                return mstore.StoreState(mstore.PENDING, claim, key, name, f"{kind} {obj['metadata']['name']} was just made")
            outcome.count(f"created {kind}")
            if kind == "Job":
                outcome.events.append(("Normal", "ModelStoreFilling", f"Job {name} fills {claim} with {spec.model.source}"
                                       f"{'@' + spec.model.revision if spec.model.revision else ''}"))
        try:
            check_owner(obj, existing)
        except OwnershipConflict as error:
            outcome.conflicts.append(str(error))
            return mstore.StoreState(mstore.PENDING, claim, key, name, str(error))
        job = existing
    phase, message = mstore.job_state(job)
    if phase == mstore.READY:  # earlier revisions' Jobs are done with
        for old in await kube.list("Job", owner.namespace, {m.LABEL_SWARM: owner.name,
                                                            "app.kubernetes.io/component": m.COMPONENT_STORE}):
            if old["metadata"]["name"] != name and owned_by(old, owner.uid):
                if await kube.delete("Job", owner.namespace, old["metadata"]["name"]):
                    outcome.count("deleted Job")
    return mstore.StoreState(phase, claim, key, name, message)


def _report_store(outcome: Outcome, store: mstore.StoreState, spec: SwarmSpec, previous: Mapping[str, Any]) -> None:
    """``status.modelStore``; while the store of the spec's revision is not ready, the Swarm is not either.

    Filling: ``Pending`` with no server yet, else ``Progressing`` (servers of an earlier revision keep serving).
    Failed: ``Failed`` with no server yet, else ``Degraded``; a Warning Event once per message."""
    status = outcome.status
    status["modelStore"] = store.status(spec)
    before = previous.get("modelStore") or {}
    if store.phase == mstore.READY:
        if before.get("phase") not in (None, mstore.READY):
            outcome.events.append(("Normal", "ModelStoreReady", store.message))
        return
    failed = store.phase == mstore.FAILED
    if failed and before.get("message") != store.message:
        outcome.events.append(("Warning", "ModelStoreFailed", store.message))
    if status["phase"] != "Failed":
        serving = status["phase"] != "Pending"
        status["phase"] = ("Degraded" if serving else "Failed") if failed else ("Progressing" if serving else "Pending")
    reason = "ModelStoreFailed" if failed else "ModelStoreFilling"
    message = f"model store {store.phase}: {store.message}"
    generation, now = status.get("observedGeneration"), now_iso()
    since = previous.get("conditions") or []  # transition times carry over from the status as it was written
    replaced = {"Ready": condition("Ready", False, reason, message, since, now, generation)}
    if failed:
        replaced["Degraded"] = condition("Degraded", True, reason, message, since, now, generation)
    else:
        replaced["Progressing"] = condition("Progressing", True, reason, message, since, now, generation)
    status["conditions"] = [replaced.get(c["type"], c) for c in status.get("conditions") or []]


async def _create_identity(kube: KubeClient, owner: m.Owner, server: str, outcome: Outcome) -> None:
    """Create new server `server`'s key Secret. One that exists is kept: the operator never reads Secrets (its
    role may create and delete them only), and a new key would be a new identity, refused by the route map as a
    hijack of the server's id."""
    try:
        await kube.create(m.identity_secret(owner, server, ServerIdentity.generate().private_pem()))
    except Conflict:
        return
    outcome.count("created Secret")


async def _apply(kube: KubeClient, obj: Body, outcome: Outcome, listed: Mapping[tuple[str, str], Body | None]) -> str:
    """Apply `obj`, knowing what exists from the lists read at the start (objects of another owner are read).

    An object that exists and is not this Swarm's is left alone and reported (``conflict``)."""
    key = (obj["kind"], obj["metadata"]["name"])
    try:
        result = await apply(kube, obj, listed[key]) if key in listed else await apply(kube, obj)
    except OwnershipConflict as error:
        outcome.conflicts.append(str(error))
        return "conflict"
    if result != "unchanged":
        outcome.count(f"{result} {obj['kind']}")
    return result


def summary(outcome: Outcome) -> str:
    return json.dumps(outcome.writes, sort_keys=True) if outcome.writes else "no changes"

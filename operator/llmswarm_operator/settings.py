"""The operator's settings: one typed object, loaded once from ``LLMSWARM_OPERATOR_*`` variables.

Every field maps one to one onto an environment variable (the field name in upper case
with the prefix) and onto a value of the Helm chart. Loading fails fast with the name of
the variable that is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

PREFIX = "LLMSWARM_OPERATOR_"


def package_version() -> str:
    try:
        return version("llmswarm")
    except PackageNotFoundError:  # running from a source tree without metadata
        return "0.0.0"


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    #: Image of block servers (the CUDA build), unless a Swarm sets ``spec.image``.
    image: str = field(default_factory=lambda: f"ghcr.io/llmswarm/node:{package_version()}")
    #: Image of the route-map service: the CPU build (it never needs CUDA).
    routemap_image: str = field(default_factory=lambda: f"ghcr.io/llmswarm/node:{package_version()}-cpu")
    #: imagePullPolicy of the pods the operator creates.
    image_pull_policy: str = "IfNotPresent"
    #: Secrets with registry credentials (names, comma separated) given to every pod the operator creates, in the
    #: Swarm's namespace; a Swarm's ``spec.imagePullSecrets`` adds more.
    image_pull_secrets: tuple[str, ...] = ()
    #: Namespaces to watch, comma separated; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    #: Seconds between two level-based reconciliations of one Swarm (the timer).
    reconcile_interval: float = 15.0
    #: Seconds before a create/update/resume handler that is waiting for pods retries.
    retry_delay: float = 10.0
    #: Seconds an old server stays in the route map as ``draining`` before its workload is deleted.
    drain_seconds: float = 30.0
    #: Port of the operator's Prometheus metrics (``/metrics``); 0 disables them.
    metrics_port: int = 9090
    #: Address of the metrics listener.
    metrics_host: str = "0.0.0.0"
    #: Kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``; empty disables it.
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    #: Name of the Kopf peering object (so that only one operator acts); empty: standalone.
    peering: str = ""
    #: Seconds a replica's peering record stays valid without a keep-alive: how soon the others take over from a
    #: replica that died without a goodbye (each replica draws a random priority; the highest live one acts).
    peering_lifetime: int = 60
    #: Cluster DNS suffix used in the URLs of servers and of the route-map service.
    cluster_domain: str = "svc.cluster.local"
    #: Servers the rebalancer moves in one round, at most (a Swarm's ``spec.rebalance`` sets when and how much gain).
    rebalance_max_moves: int = 1
    #: Where the rebalancer scrapes a server's metrics when a Swarm gives no ``prometheusUrl``: a template with
    #: ``{host}`` (the server's Service host), ``{server}``, ``{namespace}`` and ``{port}``. From outside the
    #: cluster, e.g. the API server's proxy: ``http://127.0.0.1:8001/api/v1/namespaces/{namespace}/services/{server}:{port}/proxy/metrics``.
    rebalance_scrape_url: str = "http://{host}:{port}/metrics"
    #: Where the operator reads a Swarm's route map (``GET /v1/routes``) to count the outside servers that joined
    #: it: a template with ``{host}`` (the route map's Service host), ``{swarm}``, ``{namespace}`` and ``{port}``.
    routemap_url: str = "http://{host}:{port}"
    #: The Secret with the swarm token, as ``name`` or ``name:key`` (key ``token`` by default), in each Swarm's
    #: namespace. Block servers and the route map get it as ``LLMSWARM_TOKEN``; empty: no token.
    token_secret: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if name not in env:
                continue
            raw = env[name].strip()
            try:
                values[f.name] = _convert(f.name, f.type, raw)
            except ValueError as error:
                raise SettingsError(f"{name}={raw!r}: {error}") from None
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("image", "routemap_image"):
            if not getattr(self, name):
                raise SettingsError(f"{PREFIX}{name.upper()} must not be empty")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise SettingsError(f"{PREFIX}IMAGE_PULL_POLICY must be Always, IfNotPresent or Never")
        for name in ("reconcile_interval", "retry_delay"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()} must be > 0")
        if self.drain_seconds < 0:
            raise SettingsError(f"{PREFIX}DRAIN_SECONDS must be >= 0")
        if self.peering_lifetime < 1:
            raise SettingsError(f"{PREFIX}PEERING_LIFETIME must be >= 1")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"{PREFIX}METRICS_PORT must be a port number or 0")
        if self.liveness_endpoint and not self.liveness_endpoint.startswith(("http://", "https://")):
            raise SettingsError(f"{PREFIX}LIVENESS_ENDPOINT must be an http(s) URL or empty")
        if self.rebalance_max_moves < 0:
            raise SettingsError(f"{PREFIX}REBALANCE_MAX_MOVES must be >= 0")
        _check_url_template("REBALANCE_SCRAPE_URL", self.rebalance_scrape_url, ("host", "server", "namespace", "port"))
        _check_url_template("ROUTEMAP_URL", self.routemap_url, ("host", "swarm", "namespace", "port"))


def _check_url_template(name: str, template: str, placeholders: tuple[str, ...]) -> None:
    """An http(s) URL template using only `placeholders` (SettingsError otherwise)."""
    try:
        url = template.format(**{p: "1" for p in placeholders})
    except (KeyError, IndexError, ValueError) as error:
        known = ", ".join(f"{{{p}}}" for p in placeholders)
        raise SettingsError(f"{PREFIX}{name}: unknown placeholder {error}; use {known}") from None
    if not url.startswith(("http://", "https://")):
        raise SettingsError(f"{PREFIX}{name} must be an http(s) URL template")


def _convert(name: str, kind: object, raw: str) -> object:
    kind_text = str(kind)
    if kind_text == "float":
        return float(raw)
    if kind_text == "int":
        return int(raw)
    if kind_text.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw

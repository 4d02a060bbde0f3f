"""The chart through the real Helm v4 engine (PyPI helm-python-sdk), and what the tests need of its output."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart, _native

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "llmswarm"
CI_DIR = CHART_DIR / "ci"
RELEASE = "llmswarm"
NAMESPACE = "llmswarm"

Manifest = dict[str, Any]


def scenario_files() -> dict[str, Path | None]:
    """The default values and every ci/*-values.yaml scenario, by name."""
    out: dict[str, Path | None] = {"default": None}
    for path in sorted(CI_DIR.glob("*-values.yaml")):
        out[path.name.removesuffix("-values.yaml")] = path
    return out


def scenario_values(name: str) -> dict[str, Any]:
    path = scenario_files()[name]
    return {} if path is None else (yaml.safe_load(path.read_text()) or {})


@dataclass
class Rendered:
    """One rendering: the manifests by template, parsed, and NOTES.txt."""

    templates: dict[str, str]
    manifests: list[Manifest] = field(default_factory=list)
    notes: str = ""

    def kinds(self) -> list[str]:
        return sorted(m["kind"] for m in self.manifests)

    def get(self, kind: str, name: str | None = None) -> Manifest:
        found = self.all(kind, name)
        assert len(found) == 1, f"{len(found)} {kind} named {name}: {[m['metadata']['name'] for m in self.all(kind)]}"
        return found[0]

    def all(self, kind: str, name: str | None = None) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]

    def installed(self) -> list[Manifest]:
        """What `helm install` applies: everything but hooks (the helm test pod)."""
        return [m for m in self.manifests if "helm.sh/hook" not in (m["metadata"].get("annotations") or {})]


def load_chart() -> Chart:
    return Chart.load(str(CHART_DIR))


#: The API versions of a cluster with the Prometheus Operator (kube-prometheus-stack) installed.
PROMETHEUS_OPERATOR = ("monitoring.coreos.com/v1",)


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE,
           api_versions: tuple[str, ...] = ()) -> Rendered:
    """`helm install --dry-run` (`helm template`): `api_versions` are what the cluster serves beyond the built-in
    ones (`.Capabilities.APIVersions`, `helm template --api-versions`)."""
    chart = load_chart()
    try:
        if api_versions:
            # helm-python-sdk 0.2.2's Chart.render() has no api_versions argument; its engine takes them as an option.
            options = {"name": release, "namespace": namespace, "is_install": True, "api_versions": list(api_versions)}
            templates = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(copy.deepcopy(values or {})),
                                                       json.dumps(options)))
        else:
            templates = chart.render(copy.deepcopy(values or {}), name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()
    rendered = Rendered(templates)
    for path, text in sorted(templates.items()):
        if path.endswith("NOTES.txt"):
            rendered.notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                rendered.manifests.append(doc)
    return rendered


def crd_documents() -> list[Manifest]:
    """The CRDs Helm installs from crds/ before the templates."""
    chart = load_chart()
    try:
        return [yaml.safe_load(entry["data"]) for entry in chart.crds]
    finally:
        chart.close()


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base` (maps merge, anything else is replaced), as Helm merges values."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value (or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def pod_templates(rendered: Rendered) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(object name, pod metadata, pod spec) of every pod the chart creates (Deployments and bare Pods)."""
    out = []
    for m in rendered.manifests:
        if m["kind"] == "Deployment":
            template = m["spec"]["template"]
            out.append((m["metadata"]["name"], template["metadata"], template["spec"]))
        elif m["kind"] == "Pod":
            out.append((m["metadata"]["name"], m["metadata"], m["spec"]))
    return out


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True

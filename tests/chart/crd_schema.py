"""The Swarm spec part of the chart's values.schema.json, derived from the CRD.

``swarm.spec`` in values.schema.json is the CRD's OpenAPI v3 schema of ``spec`` written as draft-07
JSON schema (so that Helm rejects a bad Swarm before anything is applied): the ``x-kubernetes-*``
extensions dropped, draft-4 style ``exclusiveMinimum: true`` turned into a number, and
``additionalProperties: false`` on every object with fixed properties (the API server would prune
unknown fields silently; the chart refuses them). A test checks that the file holds exactly this.

After a change to the CRD: ``.venv/bin/python -m tests.chart.crd_schema`` rewrites that part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmswarm"
CRD_FILE = CHART / "crds" / "swarms.llmswarm.dev.yaml"
VALUES_SCHEMA = CHART / "values.schema.json"


def crd_spec_schema() -> dict[str, Any]:
    definition = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in definition["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]  # type: ignore[no-any-return]


def swarm_schema() -> dict[str, Any]:
    """The CRD's schema of a whole Swarm as (draft-4) JSON schema: the x-kubernetes-* extensions dropped."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    definition = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in definition["spec"]["versions"] if v.get("storage")]
    return strip(version["schema"]["openAPIV3Schema"])  # type: ignore[no-any-return]


def to_draft7(schema: Any) -> Any:
    if isinstance(schema, list):
        return [to_draft7(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: to_draft7(value) for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(limit)
        elif out.get(bound) is False:
            del out[bound]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def swarm_spec_values_schema() -> dict[str, Any]:
    schema: dict[str, Any] = to_draft7(crd_spec_schema())
    schema["description"] = "The Swarm's spec, checked against the CRD's schema (charts/llmswarm/crds/)."
    return schema


def main() -> None:
    values_schema = json.loads(VALUES_SCHEMA.read_text())
    values_schema["properties"]["swarm"]["properties"]["spec"] = swarm_spec_values_schema()
    VALUES_SCHEMA.write_text(json.dumps(values_schema, indent=2) + "\n")
    print(f"wrote the swarm.spec schema into {VALUES_SCHEMA.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

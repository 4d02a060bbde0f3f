"""The CRD is a valid Kubernetes object, the examples validate against its schema, and the
operator's spec model agrees with it (same fields, same defaults)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from llmswarm_operator.swarm_spec import PoolSpec, SwarmSpec, parse_spec, plan_placement
from tests.operator.cluster import crd

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
K8S_VERSION = "1.37"


def spec_schema() -> dict[str, Any]:
    version = crd()["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def json_schema(schema: Any) -> Any:
    """The CRD's OpenAPI v3 schema as draft-4 JSON schema (drop the x-kubernetes-* extensions)."""
    if isinstance(schema, dict):
        return {k: json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [json_schema(v) for v in schema]
    return schema


def validate(doc: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(json_schema(spec_schema())).validate(doc)


def test_crd_is_a_valid_object_with_status_and_printer_columns() -> None:
    definition = crd()
    kubernetes_validate.validate(definition, K8S_VERSION, strict=True)
    assert definition["metadata"]["name"] == "swarms.llmswarm.dev"
    spec = definition["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "llmswarm.dev", "Namespaced", "Swarm", "swarms")
    assert spec["names"]["shortNames"] == ["sw"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model.source", "Servers": ".status.readyServers", "Min-Replicas": ".status.coverage.minReplicas",
        "Phase": ".status.phase", "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate_against_the_schema_and_the_operator(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "llmswarm.dev/v1alpha1" and doc["kind"] == "Swarm"
    validate(doc)
    _, _, placement = plan_placement(parse_spec(doc["spec"]))
    assert placement.feasible, placement.message


def test_three_examples_cover_cpu_heterogeneous_and_70b_int8() -> None:
    specs = [yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES]
    assert any(s["model"]["source"] == "smollm2" and len(s["pools"]) == 1 for s in specs)
    hetero = [s for s in specs if len({p.get("relativeSpeed", 1) for p in s["pools"]}) > 1
              and len({p["gpuMemory"] for p in s["pools"]}) > 1]
    assert hetero
    assert any("70B" in s["model"]["source"] and s["model"]["quantization"] == "int8" for s in specs)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("spec", "redundancy"), 0, "less than the minimum"),
    (("spec", "model", "quantization"), "int4", "is not one of"),
    (("spec", "model", "dtype"), "float64", "is not one of"),
    (("spec", "pools"), [], "should be non-empty"),
    (("spec", "pools", 0, "relativeSpeed"), 0, "less than or equal to the minimum"),
    (("spec", "pools", 0, "name"), "CPU_pool", "does not match"),
    (("spec", "pools", 0, "minServers"), -1, "less than the minimum"),
    (("spec", "routeMap", "serviceType"), "ExternalName", "is not one of"),
])
def test_the_schema_rejects_bad_values(path: tuple[Any, ...], value: Any, message: str) -> None:
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    bad = copy.deepcopy(doc)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError) as raised:
        validate(bad)
    assert message in raised.value.message


def test_the_schema_requires_pools_and_gpu_memory() -> None:
    with pytest.raises(jsonschema.ValidationError) as raised:
        validate({"apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "spec": {}})
    assert raised.value.message == "'pools' is a required property"
    with pytest.raises(jsonschema.ValidationError) as raised:
        validate({"spec": {"pools": [{"name": "a"}]}})
    assert raised.value.message == "'gpuMemory' is a required property"


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    return schema.get("properties", {})  # type: ignore[no-any-return]


def _model_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {info.alias or name: info for name, info in model.model_fields.items()}


def _pairs(schema: dict[str, Any], model: type[BaseModel], where: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    fields = _model_fields(model)
    assert set(_properties(schema)) == set(fields), f"{where}: schema and spec model differ"
    for key, sub in _properties(schema).items():
        yield f"{where}.{key}", sub, fields[key]


def _walk(schema: dict[str, Any], model: type[BaseModel], where: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    for path, sub, info in _pairs(schema, model, where):
        yield path, sub, info
        annotation = info.annotation
        for candidate in (*getattr(annotation, "__args__", ()), annotation):
            inner = getattr(candidate, "__args__", (candidate,))[0] if getattr(candidate, "__origin__", None) is list else candidate
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                items = sub.get("items", sub)
                if _properties(items):
                    yield from _walk(items, inner, path)
                break


def test_spec_model_has_the_schema_fields_and_defaults() -> None:
    schema = _properties(spec_schema())["spec"]
    checked = 0
    # Optional objects given with only their required fields, so that their defaults are compared too.
    minimal = parse_spec({"pools": [{"name": "p", "gpuMemory": "1Gi"}], "model": {"hubTokenSecret": {"name": "hf"}},
                          "modelStore": {"size": "1Gi"},
                          "join": {"url": "https://a.example", "credentialSecret": "a-join"}}).model_dump(by_alias=True)
    for path, sub, _ in _walk(schema, SwarmSpec, "spec"):
        if "default" not in sub or sub["default"] == {}:
            continue
        keys = path.split(".")[1:]
        value: Any = minimal
        for key in keys:
            value = value[0] if isinstance(value, list) else value
            value = value[key]
        assert value == sub["default"], f"{path}: CRD default {sub['default']!r}, operator default {value!r}"
        checked += 1
    assert checked >= 15
    pool_schema = _properties(schema)["pools"]["items"]
    assert set(pool_schema["required"]) == {n for n, f in _model_fields(PoolSpec).items() if f.is_required()}

"""Parsing and validating a Swarm's spec; what it implies for placement; the operator's settings."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llmswarm_operator.model_catalog import CATALOG
from llmswarm_operator.settings import OperatorSettings, SettingsError
from llmswarm_operator.swarm_spec import (
    InvalidSpec,
    block_cost,
    check_name,
    model_shape,
    parse_bytes,
    parse_quantity,
    parse_spec,
    plan_placement,
)

POOL = {"name": "gpu", "gpuMemory": "16Gi"}


@pytest.mark.parametrize(("text", "value"), [
    ("80Gi", 80 * 2**30), ("16G", 16 * 10**9), ("512Mi", 512 * 2**20), ("1.5Gi", 3 * 2**29), ("2", 2), (3, 3),
    ("1e3", 1000), ("500m", Decimal("0.5")), ("1k", 1000), ("4Ki", 4096),
])
def test_quantities(text: str | int, value: int | Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "80GB", "1.2.3Gi", "ten"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(text)


def test_negative_memory_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        parse_bytes("-1Gi")


def test_defaults() -> None:
    spec = parse_spec({"pools": [POOL]})
    assert spec.model.source == "smollm2" and spec.model.dtype == "float32" and spec.model.quantization == "none"
    assert spec.redundancy == 1 and spec.route_map.service_type == "ClusterIP" and spec.route_map.port == 8700
    pool = spec.pools[0]
    assert (pool.min_servers, pool.max_servers, pool.relative_speed, pool.reserved_memory) == (1, None, 1.0, "512Mi")
    assert pool.usable_bytes == 16 * 2**30 - 512 * 2**20


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "spec.pools: Field required"),
    ({"pools": []}, "spec.pools: List should have at least 1 item"),
    ({"pools": [POOL, POOL]}, "pool names must be unique; repeated: gpu"),
    ({"pools": [{**POOL, "minServers": 3, "maxServers": 2}]}, "spec.pools[0]: maxServers (2) is less than minServers (3)"),
    ({"pools": [{**POOL, "gpuMemory": "1Gi", "reservedMemory": "2Gi"}]}, "gpuMemory (1Gi) must be more than reservedMemory (2Gi)"),
    ({"pools": [{**POOL, "gpuMemory": "lots"}]}, "spec.pools[0].gpuMemory: not a quantity: 'lots'"),
    ({"pools": [{**POOL, "minServers": 0}]}, "the pools allow no server at all"),
    ({"pools": [POOL], "redundancy": 0}, "spec.redundancy: Input should be greater than or equal to 1"),
    ({"pools": [POOL], "model": {"quantization": "int4"}}, "spec.model.quantization: Input should be 'none', 'int8' or 'nf4'"),
    ({"pools": [{**POOL, "colour": "blue"}]}, "spec.pools[0].colour: Extra inputs are not permitted"),
    ({"pools": [{**POOL, "name": "GPU"}]}, "spec.pools[0].name: String should match pattern"),
    ({"pools": [{**POOL, "resources": {"limits": {"cpu": "many"}}}]}, "spec.pools[0].resources.limits: cpu: not a quantity"),
    ({"pools": [{**POOL, "tolerations": [{"operator": "Sometimes"}]}]}, "spec.pools[0].tolerations[0].operator"),
])
def test_invalid_specs_say_what_to_fix(spec: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(spec)
    assert message in str(raised.value)


def test_names_must_fit_service_names() -> None:
    check_name("llama70b-int8")
    for bad in ("9lives", "Big", "a" * 31, "x_y"):
        with pytest.raises(InvalidSpec, match=r"metadata\.name"):
            check_name(bad)


def test_model_shapes_come_from_the_catalog_or_the_spec() -> None:
    shape = model_shape(parse_spec({"pools": [POOL]}).model)
    assert (shape.name, shape.num_blocks, shape.hidden_size) == ("SmolLM2-135M-Instruct", 30, 576)
    assert CATALOG["meta-llama/Llama-3.1-70B-Instruct"].num_blocks == 80
    custom = parse_spec({"pools": [POOL], "model": {
        "source": "/models/mine", "name": "mine",
        "architecture": {"numBlocks": 12, "hiddenSize": 256, "intermediateSize": 1024, "numAttentionHeads": 4}}})
    shape = model_shape(custom.model)
    assert (shape.name, shape.num_blocks, shape.num_key_value_heads, shape.head_dim) == ("mine", 12, 4, 64)
    renamed = parse_spec({"pools": [POOL], "model": {"name": "tiny"}})
    assert model_shape(renamed.model).name == "tiny" and model_shape(renamed.model).num_blocks == 30
    with pytest.raises(InvalidSpec, match="not in the operator's catalog"):
        model_shape(parse_spec({"pools": [POOL], "model": {"source": "org/unknown"}}).model)


def test_block_cost_follows_dtype_quantization_and_cache() -> None:
    def cost(**model: object) -> tuple[int, int]:
        spec = parse_spec({"pools": [POOL], "model": {"source": "meta-llama/Llama-3.1-70B-Instruct", **model}})
        c = block_cost(spec.model, model_shape(spec.model))
        return c.weight_bytes, c.cache_bytes

    fp16, cache16 = cost(dtype="float16", cacheTokens=1000)
    int8, cache8 = cost(dtype="float16", quantization="int8", cacheTokens=1000)
    nf4, _ = cost(dtype="float16", quantization="nf4", cacheTokens=1000)
    assert fp16 > int8 > nf4 and 1.9 < fp16 / int8 < 2.0
    assert cache16 == cache8 == 1000 * 2 * 8 * 128 * 2  # the cache stays in the compute dtype
    assert cost(dtype="float16", cacheTokens=0)[1] == 0


def test_blocks_per_server_beyond_the_model_is_invalid() -> None:
    with pytest.raises(InvalidSpec, match="blocksPerServer"):
        plan_placement(parse_spec({"pools": [{**POOL, "blocksPerServer": 31}]}))


def test_settings_from_env() -> None:
    settings = OperatorSettings.from_env({
        "LLMSWARM_OPERATOR_IMAGE": "registry.local/node:1", "LLMSWARM_OPERATOR_NAMESPACES": "a, b",
        "LLMSWARM_OPERATOR_RECONCILE_INTERVAL": "2.5", "LLMSWARM_OPERATOR_METRICS_PORT": "0",
        "LLMSWARM_OPERATOR_LIVENESS_ENDPOINT": "",
    })
    assert settings.image == "registry.local/node:1" and settings.namespaces == ("a", "b")
    assert settings.reconcile_interval == 2.5 and settings.metrics_port == 0 and settings.liveness_endpoint == ""
    assert OperatorSettings.from_env({}).image.startswith("ghcr.io/llmswarm/node:")
    with pytest.raises(SettingsError, match="LLMSWARM_OPERATOR_RECONCILE_INTERVAL='soon'"):
        OperatorSettings.from_env({"LLMSWARM_OPERATOR_RECONCILE_INTERVAL": "soon"})
    with pytest.raises(SettingsError, match="DRAIN_SECONDS must be >= 0"):
        OperatorSettings.from_env({"LLMSWARM_OPERATOR_DRAIN_SECONDS": "-1"})
    with pytest.raises(SettingsError, match="IMAGE_PULL_POLICY"):
        OperatorSettings.from_env({"LLMSWARM_OPERATOR_IMAGE_PULL_POLICY": "Sometimes"})


def test_servers_announce_the_model_under_the_name_the_operator_records(tmp_path) -> None:
    """The route map refuses announcements of another model: a server's name for it must be the record's, whatever
    the source (a directory's last component, a renamed model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmswarm_cli.main import build_parser
    from llmswarm_control.placement import BlockCost
    from llmswarm_core.source import model_name, resolve
    from llmswarm_operator import manifests as m
    from llmswarm_operator.settings import OperatorSettings

    folder = tmp_path / "my-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=2)).save_pretrained(folder)
    assert model_name(str(folder)) == resolve(str(folder), progress=False).name == "my-llama"
    assert model_name(str(folder) + "/") == "my-llama" and model_name("org/repo") == "org/repo"
    assert model_name("/weights/llama.gguf") == "llama" and model_name("smollm2") == "SmolLM2-135M-Instruct"
    architecture = {"numBlocks": 2, "hiddenSize": 16, "intermediateSize": 32, "numAttentionHeads": 2}
    for model, expected in (({"source": str(folder), "architecture": architecture}, "my-llama"),
                            ({"name": "tiny"}, "tiny")):
        spec = parse_spec({"pools": [POOL], "model": model})
        assert model_shape(spec.model).name == expected
        server = m.DesiredServer("s-0", POOL["name"], spec_span(spec))
        args = m.server_args(m.Owner("demo", "llm", "uid"), spec, BlockCost(1, 1), server, OperatorSettings(image="x"))
        assert build_parser().parse_args(args).served_model_name == expected


def spec_span(spec):
    from llmswarm_core.spans import Span

    return Span(0, model_shape(spec.model).num_blocks)

"""The ``Swarm`` resource: typed spec, defaults, validation, and what it implies for placement.

The CRD's OpenAPI schema (``charts/llmswarm/crds/swarms.llmswarm.dev.yaml``) rejects
most bad input on a real API server; this module checks the same rules and those a
schema cannot express (pool names unique, ``maxServers >= minServers``, a known model
shape), and applies the same defaults, so the operator never relies on the server to
have done it. :class:`InvalidSpec` carries a message that says what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from llmswarm_control.placement import (
    DTYPE_BYTES,
    BlockCost,
    Placement,
    Pool,
    estimate_block_bytes,
    kv_cache_bytes_per_token,
    place,
)
from llmswarm_core.defaults import DEFAULT_MODEL, ROUTE_MAP_PORT
from llmswarm_core.source import model_name
from llmswarm_operator.model_catalog import CATALOG, ModelShape, llama_shape

GROUP = "llmswarm.dev"
VERSION = "v1alpha1"
PLURAL = "swarms"
KIND = "Swarm"
API_VERSION = f"{GROUP}/{VERSION}"

MAX_SWARM_NAME = 30
MAX_POOL_NAME = 16
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8", "nf4"]


class InvalidSpec(ValueError):
    """The Swarm cannot be acted on as written; the message says what to change."""


# ---- Kubernetes quantities ---------------------------------------------------------------------------------------

_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": Decimal("0.001"),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity (``80Gi``, ``16G``, ``500m``, ``1.5e9``) as a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValueError(f"not a quantity: {value!r} (examples: 80Gi, 16G, 500Mi, 2)")
    number, suffix = match.groups()
    try:
        return Decimal(number) * _SUFFIXES[suffix or ""]
    except InvalidOperation:
        raise ValueError(f"not a quantity: {value!r}") from None


def parse_bytes(value: str | int | float) -> int:
    amount = parse_quantity(value)
    if amount < 0:
        raise ValueError(f"a memory size must be >= 0, got {value!r}")
    return int(amount)


Quantity = str | int


def _check_quantities(values: dict[str, Quantity]) -> dict[str, Quantity]:
    for key, value in values.items():
        try:
            parse_quantity(value)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    return values


# ---- the spec ----------------------------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class Architecture(_Spec):
    """The shape of a model that is not in the built-in catalog (Llama-style blocks)."""

    num_blocks: Annotated[int, Field(ge=1, le=1024)]
    hidden_size: Annotated[int, Field(ge=1)]
    intermediate_size: Annotated[int, Field(ge=1)]
    num_attention_heads: Annotated[int, Field(ge=1)]
    num_key_value_heads: Annotated[int, Field(ge=1)] | None = None
    head_dim: Annotated[int, Field(ge=1)] | None = None
    params_per_block: Annotated[int, Field(ge=1)] | None = None


OBJECT_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class SecretKey(_Spec):
    """A key of a Secret in the Swarm's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=OBJECT_NAME)]
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "token"


class ModelSpec(_Spec):
    source: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_MODEL
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    dtype: Dtype = "float32"
    quantization: Quantization = "none"
    architecture: Architecture | None = None
    cache_tokens: Annotated[int, Field(ge=0, le=10_000_000)] = 8192
    # The hub revision (branch, tag or commit) the model store is filled from; for other sources a label: a new
    # value fills the store again. Needs spec.modelStore (servers without a store download the default branch).
    revision: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$|^$")] = ""
    # The Secret holding a Hugging Face token (gated models): HF_TOKEN of whatever downloads the model (the fill
    # Job with a store, the servers without one).
    hub_token_secret: SecretKey | None = None


class Toleration(_Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = None
    toleration_seconds: int | None = None


class Resources(_Spec):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, values: dict[str, Quantity]) -> dict[str, Quantity]:
        return _check_quantities(values)


class PoolSpec(_Spec):
    name: Annotated[str, Field(min_length=1, max_length=MAX_POOL_NAME, pattern=NAME_PATTERN)]
    gpu_memory: Quantity
    reserved_memory: Quantity = "512Mi"
    relative_speed: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    min_servers: Annotated[int, Field(ge=0, le=1000)] = 1
    max_servers: Annotated[int, Field(ge=0, le=1000)] | None = None
    blocks_per_server: Annotated[int, Field(ge=1)] | None = None
    runtime_class_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("gpu_memory", "reserved_memory")
    @classmethod
    def _memory(cls, value: Quantity) -> Quantity:
        parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> PoolSpec:
        if self.max_servers is not None and self.max_servers < self.min_servers:
            raise ValueError(f"maxServers ({self.max_servers}) is less than minServers ({self.min_servers})")
        if parse_bytes(self.gpu_memory) <= parse_bytes(self.reserved_memory):
            raise ValueError(f"gpuMemory ({self.gpu_memory}) must be more than reservedMemory ({self.reserved_memory})")
        return self

    @property
    def usable_bytes(self) -> int:
        return parse_bytes(self.gpu_memory) - parse_bytes(self.reserved_memory)


AccessMode = Literal["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce", "ReadWriteOncePod"]


class ModelStoreSpec(_Spec):
    """A volume that holds the model once per revision, filled by a Job; servers read their spans from it.

    Either ``claimName`` (an existing PersistentVolumeClaim, kept when the Swarm goes) or ``size`` (the operator
    makes ``<swarm>-models``, owned by the Swarm)."""

    claim_name: Annotated[str, Field(max_length=253, pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$")] = ""
    size: Quantity | None = None
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None
    access_modes: Annotated[list[AccessMode], Field(min_length=1, max_length=4)] = Field(
        default_factory=lambda: ["ReadWriteMany"])
    # The fill Job's pod (converting a GGUF file holds the model in memory; a safetensors source one block).
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)

    @field_validator("size")
    @classmethod
    def _size(cls, value: Quantity | None) -> Quantity | None:
        if value is not None and parse_bytes(value) <= 0:
            raise ValueError(f"size must be more than 0, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_volume(self) -> ModelStoreSpec:
        if bool(self.claim_name) == (self.size is not None):
            raise ValueError("modelStore: give either claimName (an existing PersistentVolumeClaim) or size (one the "
                             "operator makes)")
        return self


class LocalObjectReference(_Spec):
    name: Annotated[str, Field(min_length=1, max_length=253)]


class ServerSpec(_Spec):
    port: Annotated[int, Field(ge=1, le=65535)] = 8701
    extra_args: list[str] = Field(default_factory=list)


class RebalanceSpec(_Spec):
    enabled: bool = False
    interval_seconds: Annotated[int, Field(ge=10, le=86400)] = 60
    prometheus_url: str = ""
    min_gain: Annotated[float, Field(ge=0, le=10)] = 0.25


class RouteMapSpec(_Spec):
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    external_address: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = ROUTE_MAP_PORT
    # A PersistentVolumeClaim that keeps published adapters across route-map pods ("": the pod's own disk)
    adapter_claim: Annotated[str, Field(max_length=253, pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$")] = ""
    # Servers the operator did not create (`llmswarm serve --join`, another cluster's Swarm with spec.join) are
    # listed, counted and placed around (an open swarm); off: only the operator's servers are listed.
    outside_servers: bool = False
    # The route map relays (llmswarm_core/relay.py): servers behind NAT and other clusters' servers attach to it,
    # and clients outside the cluster reach every server through its one address (externalAddress).
    relay: bool = False


class JoinSpec(_Spec):
    """Serve another swarm (its route map at `url`, typically another cluster's Swarm with outsideServers and
    relay) instead of running a route map here: this Swarm's servers join it through its relay, and the operator
    places them around the coverage that swarm already has."""

    url: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")]
    # The Secret holding the join credential ("name", key `credential`, or "name:key"): the servers' token there,
    # and the operator's to read that swarm's route map.
    credential_secret: Annotated[str, Field(max_length=300,
                                            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[-._a-zA-Z0-9]{1,253})?$")]
    # That swarm's authority key, where it checks credentials (clients' credentials are checked against it).
    authority_key: Annotated[str, Field(max_length=64)] = ""
    relay: bool = True  # serve through that route map's relay (its servers cannot reach this cluster's pods)


class AdapterSource(_Spec):
    """A PEFT LoRA adapter every block server loads at start and serves by `name`: from a ConfigMap (its
    adapter_config.json and adapter_model.safetensors, the latter as binaryData) or a directory in the image."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")]
    config_map: Annotated[str, Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] | None = None
    path: Annotated[str, Field(max_length=4096, pattern=r"^/")] | None = None
    hub: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?$")] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSource:
        if sum(source is not None for source in (self.config_map, self.path, self.hub)) != 1:
            raise ValueError(f"adapter {self.name}: give exactly one of configMap, path and hub")
        return self


class SwarmSpec(_Spec):
    model: ModelSpec = Field(default_factory=ModelSpec)
    redundancy: Annotated[int, Field(ge=1, le=64)] = 1
    pools: Annotated[list[PoolSpec], Field(min_length=1, max_length=32)]
    image: str | None = None
    image_pull_secrets: Annotated[list[LocalObjectReference], Field(max_length=16)] = Field(default_factory=list)
    server: ServerSpec = Field(default_factory=ServerSpec)
    rebalance: RebalanceSpec = Field(default_factory=RebalanceSpec)
    route_map: RouteMapSpec = Field(default_factory=RouteMapSpec)
    adapters: Annotated[list[AdapterSource], Field(max_length=32)] = Field(default_factory=list)
    model_store: ModelStoreSpec | None = None
    join: JoinSpec | None = None

    @model_validator(mode="after")
    def _pools(self) -> SwarmSpec:
        if self.model.revision and self.model_store is None:
            raise ValueError("model.revision needs modelStore: servers without a store download the default branch")
        names = [p.name for p in self.pools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(duplicates)}")
        adapters = [a.name for a in self.adapters]
        if len(set(adapters)) != len(adapters):
            raise ValueError("adapter names must be unique")
        if sum((p.max_servers if p.max_servers is not None else p.min_servers) for p in self.pools) < 1:
            raise ValueError("the pools allow no server at all: give some pool minServers or maxServers >= 1")
        return self


def parse_spec(spec: dict[str, Any] | None) -> SwarmSpec:
    try:
        return SwarmSpec.model_validate(dict(spec or {}))
    except ValidationError as error:
        raise InvalidSpec(_describe(error)) from None


def check_name(name: str) -> None:
    if len(name) > MAX_SWARM_NAME or not re.match(NAME_PATTERN, name):
        raise InvalidSpec(
            f"metadata.name {name!r} must be at most {MAX_SWARM_NAME} characters of a-z, 0-9 and '-', "
            "starting with a letter (it prefixes the names of Services)"
        )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item.get("loc", ()))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    more = len(error.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# ---- what the spec implies ---------------------------------------------------------------------------------------


def model_shape(model: ModelSpec) -> ModelShape:
    """The model's shape, from ``spec.model.architecture`` or from the catalog."""
    if model.architecture is not None:
        a = model.architecture
        return llama_shape(
            model.name or model_name(model.source), a.num_blocks, a.hidden_size, a.intermediate_size, a.num_attention_heads,
            a.num_key_value_heads, a.head_dim, a.params_per_block,
        )
    known = CATALOG.get(model.source)
    if known is None:
        raise InvalidSpec(
            f"spec.model.source {model.source!r} is not in the operator's catalog of model shapes; give "
            "spec.model.architecture (numBlocks, hiddenSize, intermediateSize, numAttentionHeads, "
            f"numKeyValueHeads). Known sources: {', '.join(sorted(CATALOG))}"
        )
    if model.name is not None:
        return ModelShape(model.name, *(getattr(known, f) for f in ModelShape.__dataclass_fields__ if f != "name"))
    return known


def block_cost(model: ModelSpec, shape: ModelShape) -> BlockCost:
    weights = estimate_block_bytes(shape.params_per_block, shape.hidden_size, model.dtype, model.quantization)
    cache = kv_cache_bytes_per_token(shape.num_key_value_heads, shape.head_dim, model.dtype) * model.cache_tokens
    return BlockCost(weights, cache)


def placement_pools(spec: SwarmSpec) -> list[Pool]:
    return [
        Pool(
            name=p.name, memory_bytes=p.usable_bytes, speed=p.relative_speed, min_servers=p.min_servers,
            max_servers=p.max_servers, blocks_per_server=p.blocks_per_server,
        )
        for p in spec.pools
    ]


def plan_placement(spec: SwarmSpec, covered: Sequence[int] = ()) -> tuple[ModelShape, BlockCost, Placement]:
    """The model's shape, what a block costs, and where each server's span goes; `covered` (servers per block)
    holds blocks already (outside servers), so the operator's servers fill only the rest."""
    shape = model_shape(spec.model)
    for pool in spec.pools:
        if pool.blocks_per_server is not None and pool.blocks_per_server > shape.num_blocks:
            raise InvalidSpec(
                f"pool {pool.name}: blocksPerServer ({pool.blocks_per_server}) is more than the model's "
                f"{shape.num_blocks} blocks"
            )
    cost = block_cost(spec.model, shape)
    return shape, cost, place(shape.num_blocks, placement_pools(spec), spec.redundancy, cost, covered)


__all__ = [
    "API_VERSION", "DTYPE_BYTES", "GROUP", "KIND", "PLURAL", "VERSION", "InvalidSpec", "ModelSpec", "ModelStoreSpec",
    "PoolSpec",
    "SwarmSpec", "block_cost", "check_name", "model_shape", "parse_bytes", "parse_quantity", "parse_spec",
    "plan_placement",
]

"""Client-trained LoRA through the swarm: the header that describes an adapter and how its weights are packed.

A client that trains LoRA weights sends them with each stateless forward or backward (they
change every step), and with the open of an inference session (they hold for the session).
They travel as one float32 tensor ``lora`` of shape ``[blocks, per_block]`` beside the
request header's :class:`LoraSpec` ``{r, alpha, target_modules}``: row ``i`` holds block
``start + i``, and inside a row, for each target module in :func:`block_layout`'s order (sorted by
its path inside the block), ``A`` ([r, in_features], row-major) then ``B`` ([out_features, r]).
A backward answers ``grad_lora`` in the same layout. The same layout serves every block of a
span, so a model whose blocks differ in the target modules' shapes is refused.

A target matches a module as PEFT matches it: its path inside the block equals the target or
ends with ``"." + target``; a target that matches no linear layer of the block is an error.
The delta a target module adds is ``(x @ A.T @ B.T) * alpha / r``, PEFT's with ``lora_dropout=0``.
Nothing here touches a model: the modules of a block are given as (path, in_features,
out_features) triples by whoever holds the block (the server's real one, the client's meta copy).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from transformers import PretrainedConfig

LORA_TENSOR = "lora"
GRAD_TENSOR = "grad_lora"
PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: PEFT_PREFIX + the module's path in the causal LM + suffix
PEFT_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}
MAX_RANK = 1024  # the header's own bound; each server sets a lower limit of its own
MAX_TARGETS = 32
ADAPTER_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"  # a published adapter's name (no leading dot: never "..")
UPLOAD_METADATA = "llmswarm.lora"  # the safetensors metadata key of a published adapter's {r, alpha, target_modules, base_model}

ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")]


class LoraSpec(BaseModel):
    """What a request's ``lora`` tensor holds: rank, alpha and the target modules (PEFT's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    r: Annotated[int, Field(ge=1, le=MAX_RANK)]
    alpha: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=MAX_TARGETS)]

    @field_validator("target_modules")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("target_modules must not repeat a name")
        return names

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def key(self) -> tuple[int, tuple[str, ...]]:
        """What the packed layout depends on (alpha only scales)."""
        return self.r, tuple(sorted(self.target_modules))


class LoraLayoutError(ValueError):
    """The targets do not fit the model's blocks (no match, a non-linear match, blocks that differ)."""


@dataclass(frozen=True)
class Slot:
    """One target module's A and B inside a block's row of the packed tensor."""

    path: str  # inside the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    offset: int  # where A begins; B follows it

    def a_size(self, r: int) -> int:
        return r * self.in_features

    def b_size(self, r: int) -> int:
        return self.out_features * r


@dataclass(frozen=True)
class BlockLayout:
    """Where each target module's A and B lie in one block's row: ``size`` numbers in all."""

    r: int
    slots: tuple[Slot, ...]

    @property
    def size(self) -> int:
        last = self.slots[-1]
        return last.offset + last.a_size(self.r) + last.b_size(self.r)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(slot.path for slot in self.slots)

    def unpack(self, row: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Views of A [r, in] and B [out, r] per module path in one block's row (differentiable)."""
        pairs = {}
        for slot in self.slots:
            a_end = slot.offset + slot.a_size(self.r)
            a = row[slot.offset:a_end].view(self.r, slot.in_features)
            b = row[a_end:a_end + slot.b_size(self.r)].view(slot.out_features, self.r)
            pairs[slot.path] = (a, b)
        return pairs

    def pack(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One block's row from its (A, B) per module path (differentiable)."""
        return torch.cat([t.reshape(-1) for path in self.paths for t in pairs[path]])


def matches(path: str, target: str) -> bool:
    """PEFT's rule for a list of target modules: the path is the target or ends with "." + target."""
    return path == target or path.endswith("." + target)


def block_layout(modules: Iterable[tuple[str, int | None, int | None]], spec: LoraSpec) -> BlockLayout:
    """The layout of one block whose modules are (path, in_features, out_features), None for a non-linear one."""
    modules = list(modules)
    chosen: dict[str, tuple[int, int]] = {}
    for target in spec.target_modules:
        hits = [(path, fan_in, fan_out) for path, fan_in, fan_out in modules if matches(path, target)]
        if not hits:
            raise LoraLayoutError(f"target module {target!r} matches no module of a block")
        for path, fan_in, fan_out in hits:
            if fan_in is None or fan_out is None:
                raise LoraLayoutError(f"target module {target!r} matches {path!r}, which is not a linear layer")
            chosen[path] = (fan_in, fan_out)
    slots, offset = [], 0
    for path in sorted(chosen):
        fan_in, fan_out = chosen[path]
        slot = Slot(path, fan_in, fan_out, offset)
        slots.append(slot)
        offset += slot.a_size(spec.r) + slot.b_size(spec.r)
    return BlockLayout(spec.r, tuple(slots))


def span_layout(blocks: Iterable[Iterable[tuple[str, int | None, int | None]]], spec: LoraSpec) -> BlockLayout:
    """The one layout shared by every block given (each block's modules as for block_layout)."""
    layouts = {block_layout(modules, spec) for modules in blocks}
    if len(layouts) != 1:
        raise LoraLayoutError("the target modules differ in shape between blocks; one packed layout cannot serve them")
    return layouts.pop()


def linear_modules(block: torch.nn.Module) -> list[tuple[str, int | None, int | None]]:
    """(path, in_features, out_features) of every submodule of a block; None for one that is not linear.

    Linear means integer ``in_features`` and ``out_features`` (nn.Linear, bitsandbytes' and PEFT's layers).
    """
    found: list[tuple[str, int | None, int | None]] = []
    for path, module in block.named_modules():
        if not path:
            continue
        fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        linear = isinstance(fan_in, int) and isinstance(fan_out, int)
        found.append((path, fan_in if linear else None, fan_out if linear else None))
    return found


def peft_key(block_path: str, block: int, path: str, which: str) -> str:
    """PEFT's saved key for A or B (`which`) of module `path` of a block; `block_path` is where the causal LM
    keeps its blocks (e.g. "model.layers"), so block 3's q_proj A is
    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    return f"{PEFT_PREFIX}{block_path}.{block}.{path}{PEFT_SUFFIXES[which]}"


_PEFT_KEY = re.compile(r"^base_model\.model\.((?:[A-Za-z_][A-Za-z0-9_]*\.)*?[A-Za-z_][A-Za-z0-9_]*)\.(0|[1-9][0-9]{0,5})\."
                       r"([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.lora_([AB])\.weight$")


def split_peft_key(key: str) -> tuple[str, int, str, str] | None:
    """(block path, block, module path, "A" or "B") of a PEFT key of a block's LoRA weight; None for any other key.

    The block path is where the causal LM keeps its blocks, read as the part before the first number."""
    match = _PEFT_KEY.match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3), match.group(4)


def parse_peft_key(block_path: str, key: str) -> tuple[int, str, str] | None:
    """(block, module path, "A" or "B") of a PEFT key of a LoRA weight of block `block_path`.N; None otherwise."""
    split = split_peft_key(key)
    if split is None or split[0] != block_path:
        return None
    return split[1], split[2], split[3]


def model_block_modules(config: PretrainedConfig) -> list[list[tuple[str, int | None, int | None]]]:
    """Each block's modules as (path, in_features, out_features), read from a copy of the model on the meta device
    (no memory, no weights)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from llmswarm_core.arch import architecture_of

    arch = architecture_of(config)
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](copy.deepcopy(config))
    layers = getattr(getattr(model, arch.base), arch.layers)
    return [linear_modules(layer) for layer in layers]


class PublishedBlocks(BaseModel):
    """The header of ``GET /v1/adapters/{name}/blocks/{start}-{end}`` (a wire frame whose tensor ``lora`` holds the
    blocks' weights, packed as a request's): what a server needs to serve a published adapter by name."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["adapter_blocks"]
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=ADAPTER_NAME)]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=1)]
    lora: LoraSpec
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

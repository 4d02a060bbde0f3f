"""LoRA weights that the client owns and trains through the swarm, saved and loaded as a standard PEFT adapter.

:class:`LoraWeights` holds an A [r, in] and a B [out, r] for each target module of each remote
block, as ``nn.Parameter``s initialized as PEFT initializes them (A Kaiming-uniform with
a=sqrt(5), B zeros), so a torch optimizer trains them. Each request carries them packed
(:meth:`LoraWeights.packed`, the layout of ``llmswarm_core.lora``); the servers add their
deltas to the frozen blocks' outputs and return their gradients from backward.

The module paths and shapes come from a copy of the model's blocks on the ``meta`` device (no
memory, no weights). :meth:`LoraWeights.save` writes what PEFT's ``save_pretrained`` writes
(``adapter_config.json``, ``adapter_model.safetensors`` with PEFT's key names), so plain PEFT
loads it onto a local transformers model; :meth:`LoraWeights.load` reads such a directory back.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig

from llmswarm_core.arch import Architecture
from llmswarm_core.lora import BlockLayout, LoraLayoutError, LoraSpec, model_block_modules, parse_peft_key, peft_key, span_layout

if TYPE_CHECKING:
    from peft import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# LoraConfig settings the swarm does not apply, with the value that means "not used".
_UNSUPPORTED: dict[str, Any] = {
    "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
    "alpha_pattern": {}, "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "lora_bias": False, "init_lora_weights": True,
}


class LoraConfigError(ValueError):
    """A LoRA configuration or adapter directory that the swarm cannot train or serve."""


@dataclass(frozen=True)
class SessionLora:
    """The LoRA weights an inference session opens with: its spec and the packed weights of every block."""

    spec: LoraSpec
    weights: torch.Tensor  # [blocks, per_block], float32

    def blocks(self, start: int, end: int) -> torch.Tensor:
        return self.weights[start:end]


def spec_of(lora_config: LoraConfig, model_type: str) -> LoraSpec:
    """The wire's LoraSpec for a PEFT LoraConfig; raises LoraConfigError for settings the swarm does not apply."""
    for name, unused in _UNSUPPORTED.items():
        value = getattr(lora_config, name, unused)
        if value != unused and not (unused in (None, {}) and not value):
            raise LoraConfigError(f"LoraConfig.{name}={value!r} is not supported through the swarm (use {unused!r})")
    targets = lora_config.target_modules
    if targets is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        targets = defaults.get(model_type)
        if targets is None:
            raise LoraConfigError(f"give target_modules: PEFT has no default targets for {model_type!r}")
    if isinstance(targets, str):
        raise LoraConfigError("give target_modules as a list of module names; a regular expression is not supported "
                              "through the swarm")
    try:
        return LoraSpec(r=int(lora_config.r), alpha=float(lora_config.lora_alpha), target_modules=sorted(targets))
    except ValueError as error:
        raise LoraConfigError(f"LoraConfig does not fit the swarm: {error}") from None


class _Pair(nn.Module):
    """One target module's LoRA weights, named as PEFT names them."""

    def __init__(self, r: int, fan_in: int, fan_out: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # PEFT's reset_lora_parameters (init_lora_weights=True)


def _key(path: str) -> str:
    return path.replace(".", "__")  # module names cannot hold dots


class LoraWeights(nn.Module):
    """Client-owned LoRA weights for every block of the model (see the module's docstring)."""

    def __init__(self, config: PretrainedConfig, arch: Architecture, lora_config: LoraConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec_of(lora_config, config.model_type)
        self.lora_config = copy.deepcopy(lora_config)
        self.block_path = f"{arch.base}.{arch.layers}"
        try:
            self.layout: BlockLayout = span_layout(model_block_modules(config), self.spec)
        except LoraLayoutError as error:
            raise LoraConfigError(f"LoRA targets {self.spec.target_modules}: {error}") from None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({_key(s.path): _Pair(self.spec.r, s.in_features, s.out_features, dtype) for s in self.layout.slots})
            for _ in range(int(config.num_hidden_layers))
        )

    def pairs(self, block: int) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        modules = self.blocks[block]
        return {path: (modules[_key(path)].lora_A, modules[_key(path)].lora_B) for path in self.layout.paths}

    def packed(self) -> torch.Tensor:
        """Every block's weights as the wire carries them: [blocks, per_block], differentiable."""
        return torch.stack([self.layout.pack(self.pairs(block)) for block in range(len(self.blocks))])

    def for_session(self) -> SessionLora:
        return SessionLora(self.spec, self.packed().detach().float().cpu())

    # ---- PEFT's format -----------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under PEFT's saved key names (what ``set_peft_model_state_dict`` takes)."""
        state = {}
        for block in range(len(self.blocks)):
            for path, (a, b) in self.pairs(block).items():
                state[peft_key(self.block_path, block, path, "A")] = a.detach()
                state[peft_key(self.block_path, block, path, "B")] = b.detach()
        return state

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named weights in; every weight must be there with its shape, and nothing else."""
        expected = self.peft_state_dict()
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise LoraConfigError(f"the adapter's weights do not fit: missing {missing[:4]}, unexpected {unknown[:4]}")
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise LoraConfigError(f"{key} has shape {list(state[key].shape)}, the model needs {list(target.shape)}")
        for block in range(len(self.blocks)):
            for path, (a, b) in self.pairs(block).items():
                a.copy_(state[peft_key(self.block_path, block, path, "A")])
                b.copy_(state[peft_key(self.block_path, block, path, "B")])

    def save(self, directory: str | os.PathLike[str], base_model: str) -> None:
        """Write a standard PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."""
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.lora_config)
        config.base_model_name_or_path = base_model
        config.target_modules = set(self.spec.target_modules)
        if config.task_type is None:
            config.task_type = "CAUSAL_LM"
        config.inference_mode = True
        config.save_pretrained(str(folder))
        state = {key: tensor.contiguous().clone() for key, tensor in self.peft_state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory (a LoRA one)."""
    from peft import LoraConfig

    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LoraConfigError(f"{path}: not a readable adapter config ({error})") from None
    if not isinstance(data, dict) or data.get("peft_type", "LORA") != "LORA":
        raise LoraConfigError(f"{path}: not a LoRA adapter (peft_type {data.get('peft_type') if isinstance(data, dict) else None!r})")
    return LoraConfig.from_pretrained(str(directory))


def read_weights(directory: str | os.PathLike[str], block_path: str) -> dict[str, torch.Tensor]:
    """The block weights of a PEFT adapter directory's safetensors file (PEFT's key names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise LoraConfigError(f"{path}: not a readable safetensors file ({error})") from None
    strays = sorted(key for key in state if parse_peft_key(block_path, key) is None)
    if strays:
        raise LoraConfigError(f"{path} holds weights outside the blocks' LoRA layers: {strays[:4]}")
    return state

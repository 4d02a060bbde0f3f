"""Publishing LoRA adapters to a swarm's route map, and listing what is published.

A published adapter is one safetensors file: PEFT's key names and, in the file's metadata
under ``llmswarm.lora``, ``{r, alpha, target_modules, base_model}`` (the route map checks it
against the swarm's model: llmswarm_control/adapters.py). It is then served by name: a model
loaded with ``active_adapter=NAME`` (or the gateway's ``model: "base:NAME"``) runs with it,
each server fetching only its span's weights on first use.

Only the publisher of a name may replace it: the route map keeps the SHA-256 of a publisher
key, a secret kept here in ``~/.cache/llmswarm/publisher.key`` (mode 0600; or
``$LLMSWARM_PUBLISHER_KEY``).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import requests
import torch

from llmswarm.errors import SwarmError
from llmswarm.lora import WEIGHTS_FILE, LoraConfigError, read_config, spec_of
from llmswarm.sequence_manager import SwarmClient
from llmswarm_core.lora import UPLOAD_METADATA, LoraSpec, split_peft_key
from llmswarm_core.source import cache_root

KEY_ENV = "LLMSWARM_PUBLISHER_KEY"
PUBLISH_TIMEOUT = 300.0


def upload_body(state: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> bytes:
    """The safetensors file that publishes `state` (PEFT's key names)."""
    from safetensors.torch import save

    fields = {"r": spec.r, "alpha": spec.alpha, "target_modules": spec.target_modules, "base_model": base_model}
    tensors = {key: tensor.detach().float().contiguous().cpu() for key, tensor in state.items()}
    return save(tensors, metadata={"format": "pt", UPLOAD_METADATA: json.dumps(fields)})


def adapter_dir_body(directory: str | os.PathLike[str], base_model: str | None = None) -> bytes:
    """The upload of a PEFT adapter directory (adapter_config.json, adapter_model.safetensors); `base_model`
    overrides the config's base_model_name_or_path (it must name the swarm's model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(directory)
    if config.target_modules is None:
        raise LoraConfigError(f"{directory}: adapter_config.json names no target_modules")
    spec = spec_of(config, "")
    base = base_model or config.base_model_name_or_path
    if not base:
        raise LoraConfigError(f"{directory}: adapter_config.json names no base model; give one")
    path = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise LoraConfigError(f"{path}: not a readable safetensors file ({error})") from None
    strays = sorted(key for key in state if split_peft_key(key) is None)
    if strays:
        raise LoraConfigError(f"{path} holds weights outside the blocks' LoRA layers: {strays[:4]}")
    return upload_body(state, spec, base)


def publisher_key() -> str:
    """This user's publisher key: $LLMSWARM_PUBLISHER_KEY, else the key file (made on first use, mode 0600)."""
    explicit = os.environ.get(KEY_ENV)
    if explicit:
        return explicit
    path = cache_root() / "publisher.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def default_publisher() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "anonymous"
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", user)[:64] or "anonymous"


def _check(response: requests.Response, what: str) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise SwarmError(f"{what}: HTTP {response.status_code}: {message}")
    return response.json()


def publish(client: SwarmClient, name: str, body: bytes, replace: bool = False,
            publisher: str | None = None) -> dict[str, Any]:
    """``POST /v1/adapters/{name}``; the route map's entry for it, or SwarmError with the route map's reason."""
    headers = {"Content-Type": "application/octet-stream", "X-Llmswarm-Publisher": publisher or default_publisher(),
               "X-Llmswarm-Publisher-Key": publisher_key()}
    try:
        response = client.http.post(f"{client.url}/v1/adapters/{name}", data=body, headers=headers,
                                    params={"replace": "1"} if replace else None, timeout=PUBLISH_TIMEOUT,
                                    verify=client.verify)
    except requests.RequestException as error:
        raise SwarmError(f"cannot publish adapter {name!r}: {error}") from error
    result: dict[str, Any] = _check(response, f"the route map refused adapter {name!r}")
    return result


def published(client: SwarmClient) -> list[dict[str, Any]]:
    """``GET /v1/adapters``: every published adapter's entry (name, publisher, size, base model, targets...)."""
    try:
        response = client.http.get(f"{client.url}/v1/adapters", timeout=client.config.request_timeout,
                                   verify=client.verify)
    except requests.RequestException as error:
        raise SwarmError(f"cannot list the published adapters: {error}") from error
    adapters: list[dict[str, Any]] = _check(response, "cannot list the published adapters")["adapters"]
    return adapters

"""Defaults that every part shares: one place to change them."""

from __future__ import annotations

from typing import Literal

#: The model SPEC used when none is given: SmolLM2-135M-Instruct, shipped on PyPI as GGUF.
DEFAULT_MODEL = "smollm2"

#: The route map's port (``llmswarm up``, the operator's route-map Service).
ROUTE_MAP_PORT = 8700

#: Where a client finds a local swarm started with ``llmswarm up``.
DEFAULT_SWARM = f"http://127.0.0.1:{ROUTE_MAP_PORT}"

#: Compute and wire dtypes of hidden states, in the order the CLI lists them.
FloatDtype = Literal["float32", "bfloat16", "float16"]
FLOAT_DTYPES: tuple[FloatDtype, ...] = ("float32", "bfloat16", "float16")

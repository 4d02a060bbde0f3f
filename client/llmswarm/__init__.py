"""llmswarm: run and fine-tune language models split across many block servers.

Names are imported lazily, so ``import llmswarm_cli.main`` (and the ``llmswarm`` command)
does not load torch before it has set up the process environment.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DistributedModelForCausalLM": "llmswarm.model",
    "DistributedModelForSequenceClassification": "llmswarm.model",
    "RemoteCache": "llmswarm.model",
    "ClientConfig": "llmswarm.config",
    "InferenceSession": "llmswarm.inference",
    "RemoteSequential": "llmswarm.stateless",
    "ClientStats": "llmswarm.sequence_manager",
    "SwarmClient": "llmswarm.sequence_manager",
    "SwarmError": "llmswarm.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmswarm' has no attribute {name!r}")

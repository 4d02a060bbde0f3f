"""llmswarm: run and fine-tune language models split across many block servers."""

from llmswarm.model import DistributedModelForCausalLM, RemoteCache
from llmswarm.remote import ClientConfig, InferenceSession, RemoteSequential, SwarmClient, SwarmError

__all__ = [
    "ClientConfig",
    "DistributedModelForCausalLM",
    "InferenceSession",
    "RemoteCache",
    "RemoteSequential",
    "SwarmClient",
    "SwarmError",
]
__version__ = "0.1.0"

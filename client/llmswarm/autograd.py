"""The swarm's blocks as a differentiable function (the server weights stay frozen).

Forward runs the chain with stateless forwards and keeps each hop's inputs; backward sends
the output gradients back through the same hops in reverse, each server returning the
gradients of its inputs, of the deep prompts and of the client's LoRA weights it received.
"""

from __future__ import annotations

from typing import Any

import torch

from llmswarm.stateless import RemoteSequential, Trace


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, lora: torch.Tensor | None,
                remote: RemoteSequential, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
                ) -> torch.Tensor:
        trace = Trace()
        ctx.prompts, ctx.lora = _detached(prompts), _detached(lora)
        output = remote.forward(hidden.detach(), attention_mask, position_ids, ctx.prompts, trace=trace, lora=ctx.lora)
        ctx.remote, ctx.trace = remote, trace
        ctx.attention_mask, ctx.position_ids = attention_mask, position_ids
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = ctx.remote.backward(ctx.trace, grad_output.contiguous(), ctx.attention_mask, ctx.position_ids,
                                    ctx.prompts, ctx.lora)
        return grads.hidden, grads.prompts, grads.lora, None, None, None


def remote_blocks(remote: RemoteSequential, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                  lora: torch.Tensor | None = None) -> torch.Tensor:
    """Every block of the swarm applied to `hidden`, differentiable in `hidden`, `prompts` and `lora`
    (the client's LoRA weights [blocks, per_block], laid out for the remote's lora_spec)."""
    return _RemoteBlocks.apply(hidden, prompts, lora, remote, attention_mask, position_ids)

"""The swarm's blocks as a differentiable function (the server weights stay frozen).

Forward runs the chain with stateless forwards and keeps each hop's inputs; backward sends
the output gradients back through the same hops in reverse, each server returning the
gradients of its inputs and of the deep prompts it received.
"""

from __future__ import annotations

from typing import Any

import torch

from llmswarm.stateless import RemoteSequential, Trace


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, remote: RemoteSequential,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        trace = Trace()
        output = remote.forward(hidden.detach(), attention_mask, position_ids,
                                None if prompts is None else prompts.detach(), trace=trace)
        ctx.remote, ctx.trace = remote, trace
        ctx.attention_mask, ctx.position_ids = attention_mask, position_ids
        ctx.prompts = None if prompts is None else prompts.detach()
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_prompts = ctx.remote.backward(ctx.trace, grad_output.contiguous(), ctx.attention_mask,
                                                        ctx.position_ids, ctx.prompts)
        return grad_hidden, grad_prompts, None, None, None


def remote_blocks(remote: RemoteSequential, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Every block of the swarm applied to `hidden`, differentiable in `hidden` and `prompts`."""
    return _RemoteBlocks.apply(hidden, prompts, remote, attention_mask, position_ids)

"""The self-check of decode.py's lean pass against transformers' forward, before a span uses it.

decode.py mirrors transformers' layers op for op; this check catches a transformers version
whose layers compute otherwise, before any client sees a difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from llmswarm_node.decode import DecodePath

# transformers' forward of the same blocks: (hidden, attention_mask, position_ids, cache) -> output
Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


@torch.inference_mode()
def agrees_with_transformers(path: DecodePath, reference: Reference, new_cache: Callable[[], DynamicCache],
                             hidden_size: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the lean pass gives bit-identical outputs and caches on random inputs, with and without padding."""
    generator = torch.Generator().manual_seed(0)
    padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    cases = []
    for mask in (torch.ones(1, 3, dtype=torch.long), padded):
        rows = mask.shape[0]
        inputs = [torch.randn(rows, n, hidden_size, generator=generator) for n in (3, 1, 1)]
        cases.append((mask, [x.to(device, dtype) for x in inputs]))
    results = []
    for lean in (True, False):
        outputs, caches = [], []
        for prompt_mask, (prompt, *steps) in cases:
            cache = new_cache()
            mask = prompt_mask.to(device)
            reference(prompt, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
            for hidden in steps:
                positions = mask.sum(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                run = path.run if lean else reference
                outputs.append(run(hidden, mask, positions, cache))
            caches.append(cache)
        results.append((outputs, caches))
    (lean_outputs, lean_caches), (outputs, caches) = results
    if not all(torch.equal(a, b) for a, b in zip(lean_outputs, outputs, strict=True)):
        return False
    return all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for lean_cache, cache in zip(lean_caches, caches, strict=True)
               for a, b in zip(lean_cache.layers, cache.layers, strict=True))

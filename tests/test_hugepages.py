"""Weights moved into one huge-page mapping keep their values, their sharing and the module's output."""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from llmswarm_node.hugepages import pack_in_huge_pages


def test_packed_weights_keep_values_ties_and_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 64, bias=False))
    model[0].register_buffer("scale", torch.arange(96, dtype=torch.int64))
    tied = nn.Linear(96, 64, bias=False)
    tied.weight = model[2].weight  # one parameter in two places
    model.append(tied)
    before = {name: t.clone() for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    x = torch.randn(3, 64)
    expected = model[:3](x)

    mapping = pack_in_huge_pages(model)

    assert mapping is not None
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        assert start <= tensor.data_ptr() < start + len(mapping), name
        assert tensor.data_ptr() % 64 == 0
        assert torch.equal(tensor, before[name]), name
    assert model[3].weight is model[2].weight
    assert torch.equal(model[:3](x), expected)

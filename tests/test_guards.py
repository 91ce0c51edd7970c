"""Causal masks read from a registered buffer (nanoGPT): fused on the causal path, still correct after
the buffer is changed in place or replaced."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import attnfuse


class NanoGPTAttention(nn.Module):
    def __init__(self, block_size: int = 16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_registered_tril_buffer_runs_causal_and_follows_buffer_changes():
    torch._dynamo.reset()
    model, reference = NanoGPTAttention(), NanoGPTAttention()
    attnfuse.optimize(model)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    torch.testing.assert_close(model(q, k, v), reference(q, k, v))
    features = attnfuse.report(model).sites[0].features
    assert features["causal"] == "top_left" and features["mask"] is None and features["causal_guarded_by_buffer"]

    with torch.no_grad():  # written in place: every row now also ignores key 0 (row 0 becomes NaN)
        model.bias[..., 0] = 0
        reference.bias[..., 0] = 0
    torch.testing.assert_close(model(q, k, v), reference(q, k, v), equal_nan=True, atol=2e-5, rtol=1e-4)

    with torch.no_grad():  # written back to the triangle: the causal path is proven again
        model.bias.copy_(torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))
        reference.bias.copy_(model.bias)
    torch.testing.assert_close(model(q, k, v), reference(q, k, v), atol=2e-5, rtol=1e-4)

    model.bias = torch.ones(1, 1, 16, 16)  # replaced by a new tensor that masks nothing
    reference.bias = torch.ones(1, 1, 16, 16)
    torch.testing.assert_close(model(q, k, v), reference(q, k, v), atol=2e-5, rtol=1e-4)

"""Test-owned attention modules whose scores carry more than a plain bias: ALiBi, relative-position
buckets, softcaps and sliding windows, written the ways real models write them."""
from __future__ import annotations

import math

import torch
from torch import nn


def alibi_slopes(heads: int, device=None, dtype=None) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (n + 1) / heads) for n in range(heads)], device=device, dtype=dtype)


class AlibiCausal(nn.Module):
    """Bloom/MPT style: ``slopes[h] * (j - i)`` added to the scores, then a causal ``-inf`` fill."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        rel = torch.arange(j, device=q.device)[None, :] - torch.arange(j - i, j, device=q.device)[:, None]
        bias = alibi_slopes(self.heads, q.device, q.dtype)[:, None, None] * rel[None]
        sim = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        sim = sim.masked_fill(torch.ones(i, j, dtype=torch.bool, device=q.device).triu(j - i + 1), float("-inf"))
        return sim.softmax(-1) @ v


class AlibiSymmetric(nn.Module):
    """Encoder ALiBi: ``-slopes[h] * |i - j|``, no mask."""

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads).view(heads, 1, 1))

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        distance = (torch.arange(i, device=q.device)[:, None] - torch.arange(j, device=q.device)[None, :]).abs()
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bhij,bhjd->bhid", (sim - self.slopes * distance).softmax(dim=-1), v)


class BucketBias(nn.Module):
    """T5-style: relative positions bucketed with log, looked up in a learned (buckets, heads) table."""

    def __init__(self, heads: int, buckets: int = 8, max_distance: int = 16):
        super().__init__()
        self.table = nn.Embedding(buckets, heads)
        self.buckets, self.max_distance = buckets, max_distance

    def bucket(self, rel):
        exact = self.buckets // 2
        small = rel.abs() < exact
        large = exact + (torch.log(rel.abs().float() / exact + 1e-6) / math.log(self.max_distance / exact)
                         * (self.buckets - exact)).long()
        large = torch.minimum(large, torch.full_like(large, self.buckets - 1))
        return torch.where(small, rel.abs(), large)

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        rel = torch.arange(j, device=q.device)[None, :] - torch.arange(i, device=q.device)[:, None]
        bias = self.table(self.bucket(rel)).permute(2, 0, 1)
        return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v


class SoftcapWindow(nn.Module):
    """Gemma 2 style: scale, ``tanh(s / cap) * cap``, then an additive sliding-window causal mask."""

    def __init__(self, cap: float = 20.0, window: int = 3):
        super().__init__()
        self.cap, self.window = cap, window

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        w = w / self.cap
        w = torch.tanh(w)
        w = w * self.cap
        q_pos = torch.arange(j - i, j, device=q.device)[:, None]
        k_pos = torch.arange(j, device=q.device)[None, :]
        keep = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
        w = w + torch.where(keep, 0.0, torch.finfo(w.dtype).min)
        return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v

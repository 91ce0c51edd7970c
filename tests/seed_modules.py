"""Test-owned re-implementations of the five seed ``Attend`` forms (their naive, non-flash path).

Written for the tests from the spellings listed in DESIGN.md, not copied: einsum QK/PV products
(``b h i d`` with ``b h j d`` or single-head ``b j d``), a scale multiply, ``masked_fill`` with
``-finfo(dtype).max`` for a ``triu(j - i + 1)`` causal mask or a ``~mask`` key-padding mask, an
additive bias before the causal fill, a custom scale, dropout on the probabilities.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import einsum, nn


def _kv_pattern(k: torch.Tensor) -> str:
    return "b j d" if k.ndim == 3 else "b h j d"


def _bottom_right_causal(i: int, j: int, device: torch.device) -> torch.Tensor:
    return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)


class GenomicsStyle(nn.Module):
    """Causal, optional additive ``attn_bias`` then causal fill, single-head k/v allowed, dropout."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal = causal
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, q, k, v, mask=None, attn_bias=None):
        kv = _kv_pattern(k)
        scores = einsum(f"b h i d, {kv} -> b h i j", q, k) * (q.shape[-1] ** -0.5)
        if attn_bias is not None:
            scores = scores + attn_bias
        if self.causal:
            scores = scores.masked_fill(_bottom_right_causal(q.shape[-2], k.shape[-2], q.device),
                                        -torch.finfo(scores.dtype).max)
        weights = self.attn_dropout(scores.softmax(dim=-1))
        return einsum(f"b h i j, {kv} -> b h i d", weights, v)


class MegabyteStyle(nn.Module):
    """Causal via a mask helper, single-head k/v allowed, dropout."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal = causal
        self.attn_dropout = nn.Dropout(dropout)

    def causal_mask(self, i, j, device):
        return _bottom_right_causal(i, j, device)

    def forward(self, q, k, v, mask=None):
        kv = _kv_pattern(k)
        scale = q.shape[-1] ** -0.5
        sim = einsum(f"b h i d, {kv} -> b h i j", q, k) * scale
        if self.causal:
            sim = sim.masked_fill(self.causal_mask(q.shape[-2], k.shape[-2], q.device), -torch.finfo(sim.dtype).max)
        attn = self.attn_dropout(sim.softmax(dim=-1))
        return einsum(f"b h i j, {kv} -> b h i d", attn, v)


class PaddingStyle(nn.Module):
    """Key-padding mask ``(b, j)`` rearranged to ``(b, 1, 1, j)`` and filled where ``~mask``; optional scale."""

    def __init__(self, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        self.scale = scale
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, q, k, v, mask=None):
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        if mask is not None and mask.ndim != 4:
            mask = rearrange(mask, "b j -> b 1 1 j")
        sim = einsum("b h i d, b h j d -> b h i j", q, k) * scale
        if mask is not None:
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        attn = self.attn_dropout(sim.softmax(dim=-1))
        return einsum("b h i j, b h j d -> b h i d", attn, v)


class BiasThenCausalStyle(nn.Module):
    """Additive ``bias`` then a causal fill built from the scores' own shape."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal = causal
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, q, k, v, bias=None):
        sim = einsum("b h i d, b h j d -> b h i j", q, k) * (q.shape[-1] ** -0.5)
        if bias is not None:
            sim = sim + bias
        if self.causal:
            i, j = sim.shape[-2:]
            sim = sim.masked_fill(torch.ones((i, j), dtype=torch.bool, device=q.device).triu(j - i + 1),
                                  -torch.finfo(sim.dtype).max)
        attn = self.attn_dropout(sim.softmax(dim=-1))
        return einsum("b h i j, b h j d -> b h i d", attn, v)


SEEDS = {
    "genomics": GenomicsStyle,
    "megabyte": MegabyteStyle,
    "rin": PaddingStyle,
    "voicebox": PaddingStyle,
    "make_a_video": BiasThenCausalStyle,
}

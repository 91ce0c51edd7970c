"""Masks as one boolean keep-mask: two keep-masks of a site as one, a causal (windowed) triangle, both combined.

The kernels (``attnfuse.kernels``) build SDPA's one ``attn_mask`` from these, and ``attnfuse.kernels.rows``
finds the rows where every key is masked.
"""
from __future__ import annotations

from typing import Optional

import torch

from attnfuse.vocabulary import causal_offset


def conjunction(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first & second``: two keep-masks of one site as one (one pass over the broadcast masks)."""
    return first & second


def causal_keep(L: int, S: int, alignment: str, device: torch.device, window: Optional[int] = None) -> torch.Tensor:
    """The ``(L, S)`` keep-mask of a causal triangle aligned top-left or bottom-right, optionally
    limited to the last ``window`` keys up to the diagonal (a sliding window)."""
    offset = causal_offset(alignment, L, S)
    keep = torch.ones(L, S, dtype=torch.bool, device=device).tril(offset)
    return keep if window is None else keep.triu(offset - window + 1)


def combined_keep(keep: Optional[torch.Tensor], causal: Optional[str], L: int, S: int, device: torch.device,
                  window: Optional[int] = None) -> Optional[torch.Tensor]:
    """A keep-mask and a causal (windowed) triangle as one boolean mask; either may be absent."""
    if causal is None:
        return keep
    triangle = causal_keep(L, S, causal, device, window)
    return triangle if keep is None else keep & triangle

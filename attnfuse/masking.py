"""Masks as one boolean keep-mask: two keep-masks of a site as one, a causal (windowed) triangle, both combined.

The kernels (``attnfuse.kernels``) build SDPA's one ``attn_mask`` from these, and ``attnfuse.kernels.rows``
finds the rows where every key is masked.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from attnfuse.vocabulary import causal_offset


def conjunction(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first & second``: two keep-masks of one site as one (one pass over the broadcast masks)."""
    return first & second


def keep_from_masks(masks: Sequence[torch.Tensor], negated: Sequence[bool],
                    to_scores: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
    """A site's keep-masks as one boolean mask on the scores' layout (``to_scores``): a 0/1 mask that multiplied
    the scores keeps where it is not 0, a negated mask where it is False; None without masks."""
    keep = None
    for mask, inverted in zip(masks, negated):
        mask = mask if mask.dtype == torch.bool else mask != 0
        mask = to_scores(mask.logical_not() if inverted else mask)
        keep = mask if keep is None else conjunction(keep, mask)
    return keep


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

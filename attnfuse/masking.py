"""Masks as one boolean keep-mask: two keep-masks of a site as one, a causal (windowed) triangle, both combined.

The kernels (``attnfuse.kernels``) build SDPA's one ``attn_mask`` from these, and ``attnfuse.kernels.rows``
finds the rows where every key is masked.
"""
from __future__ import annotations

from typing import Optional

import torch


def conjunction(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first & second``: two keep-masks of one site as one (one pass over the broadcast masks)."""
    return first & second


def causal_keep(L: int, S: int, alignment: str, device: torch.device, window: Optional[int] = None) -> torch.Tensor:
    """The ``(L, S)`` keep-mask of a causal triangle aligned top-left or bottom-right, optionally
    limited to the last ``window`` keys up to the diagonal (a sliding window)."""
    offset = 0 if alignment == "top_left" else S - L
    keep = torch.ones(L, S, dtype=torch.bool, device=device).tril(offset)
    return keep if window is None else keep.triu(offset - window + 1)


def combined_keep(keep: Optional[torch.Tensor], causal: Optional[str], L: int, S: int, device: torch.device,
                  window: Optional[int] = None) -> Optional[torch.Tensor]:
    """A keep-mask and a causal (windowed) triangle as one boolean mask; either may be absent."""
    if causal is None:
        return keep
    triangle = causal_keep(L, S, causal, device, window)
    return triangle if keep is None else keep & triangle


def is_traced(q: torch.Tensor) -> bool:
    """Whether we run under a compiler's tracer, where SDPA's ``CausalBias`` subclass cannot be created."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(q, (torch._subclasses.FakeTensor, FunctionalTensor)) or \
        torch._is_functional_tensor(q)


def causal_offset(causal: str, L: int, S: int) -> int:
    """How far the diagonal of a causal triangle sits right of the main one: 0 top-left, ``S - L`` bottom-right."""
    return 0 if causal == "top_left" else S - L

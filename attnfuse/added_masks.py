"""An added ``0 / fill`` window mask read as a causal window and key-padding keep-masks, and when each is used.

transformers' eager models with a sliding window (Mistral, Gemma 2, ...) add one ``(B, 1, L, S)`` bias,
``where(causal & window & padding[b, kv], 0, finfo.min)``. The matcher reads it as the causal window and the
``(B, 1, 1, S)`` padding keep-mask with a fill of ``finfo.min`` (``patterns/causal.py``), so the call runs on a
kernel's window path (FlexAttention's block mask on CUDA) instead of adding a materialized bias. Where that is
exact, for a fill at which ``s + fill`` rounds to ``fill`` for every ``|s|`` below 1e30 (the magnitude of scores
the project takes as given for a fill of -1e30 to mask, ``dominance.PROVEN_FILL``; fp32's and bf16's lowest
values, not fp16's):

* a row that keeps a key: the masked entries hold ``s + fill`` instead of ``-inf``; both weigh exactly 0.
* a row that keeps no key (a left-padded query, or a padded query past its window): the original's softmax runs
  over every key of ``s + fill == fill``: uniform, the mean of v, which the fused call writes back. Its backward
  reaches the scores (the softmax's derivative at uniform weights is not 0), so q and k get gradients from such a
  row that a written-back mean does not give: calls that need gradients add the original's bias, rebuilt bit for
  bit from the same masks (``AddedMask.bias``), exactly as the site ran before this reading existed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from attnfuse.dominance import PROVEN_FILL


@dataclass(frozen=True)
class AddedMask:
    """The fill and dtype of an added mask read as keep-masks: enough to rebuild it for calls with gradients."""

    fill: float
    dtype: torch.dtype

    @staticmethod
    def needs_bias(q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether this call adds the rebuilt bias (gradients reach q or k) instead of using the keep-masks."""
        return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)

    def bias(self, full_keep: torch.Tensor) -> torch.Tensor:
        """The original's additive mask: 0 where ``full_keep`` keeps, ``fill`` elsewhere, in the bias's dtype."""
        zero = torch.zeros((), dtype=self.dtype, device=full_keep.device)
        return torch.where(full_keep, zero, torch.full((), self.fill, dtype=self.dtype, device=full_keep.device))


def absorbs_every_score(fill: float, dtypes: Iterable[torch.dtype]) -> bool:
    """Whether ``s + fill`` rounds to ``fill`` in each of ``dtypes`` for every ``|s|`` below ``-PROVEN_FILL``."""
    dtypes = list(dtypes)
    return bool(dtypes) and all(_absorbed_below(fill, dtype) >= -PROVEN_FILL for dtype in dtypes)


def _absorbed_below(fill: float, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s floats next to ``fill`` on the side of zero: ``|s|`` under it is absorbed."""
    if not dtype.is_floating_point:
        return 0.0
    info = torch.finfo(dtype)
    value = abs(float(torch.tensor(fill, dtype=torch.float64).to(dtype)))
    if not math.isfinite(value) or value < info.tiny:
        return 0.0
    mantissa, exponent = math.frexp(value)
    spacing = 2.0 ** (exponent - 1) * info.eps / (2.0 if mantissa == 0.5 else 1.0)
    return spacing / 2

"""Whether a finite fill acts as a mask: the one fact about masking that depends on the scores' values.

``masked_fill(m, -1e9)`` (or ``-1e4``, or ``finfo(fp16).min``) keeps a masked key out of the softmax only
while every kept score exceeds the fill by enough for ``exp(fill - max)`` to underflow to zero (104 in
fp32 arithmetic, 746 in fp64); a kept score pushed down by an additive padding bias, or scores of a
magnitude near the fill, break it and the original then attends to the masked keys. A fill at or below
``absorbing(dtype)`` (-1e30, or fp16's lowest value) needs no check while the additive biases stay above it; any other finite fill is checked on each call from a bound on the scores,
``|scale| * max|q_i| * max|k_j|`` (one pass over q and k and a host sync). The bias minimum is read
at every call too (one reduction over the bias and a host read; ``attnfuse.memo`` says why nothing
is memoized). When the check fails the site runs its original ops for that call (``attnfuse.original``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from attnfuse.masking import is_traced

PROVEN_FILL = -1e30


def absorbing(dtype: torch.dtype) -> float:
    """The fill at or below which a masked score needs no check in scores of ``dtype``: -1e30, or the
    dtype's lowest finite value where that is higher (fp16's -65504, below which no kept score can go)."""
    return max(PROVEN_FILL, float(torch.finfo(dtype).min)) if dtype.is_floating_point else PROVEN_FILL


def underflow_gap(dtype: torch.dtype) -> float:
    """How far below the row maximum a score must be for its ``exp`` to round to zero in ``dtype``'s softmax."""
    return 746.0 if dtype == torch.float64 else 104.0


def _smallest(bias: torch.Tensor) -> float:
    if bias.numel() == 0:
        return 0.0
    return float(bias.detach().amin().float())


@dataclass(frozen=True)
class FillDominance:
    """The per-call check that the site's finite fill still masks (see the module docstring)."""

    fill: float
    softmax_dtype: torch.dtype
    scores_dtype: torch.dtype

    def holds(self, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: Optional[float],
              biases: Sequence[torch.Tensor]) -> bool:
        if is_traced(q):
            return False  # no values under a compiler's tracer: the original ops run
        lowest_bias = sum(_smallest(b) for b in biases)
        floor = absorbing(self.scores_dtype)
        if self.fill <= floor and lowest_bias > floor:
            return True
        bound = abs(scale) * _largest_norm(q) * _largest_norm(k)
        if softcap is not None:
            bound = min(bound, abs(softcap))
        return -bound + lowest_bias >= self.fill + underflow_gap(self.softmax_dtype)


def _largest_norm(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    x = x.detach()
    return float(torch.linalg.vector_norm(x if x.dtype == torch.float64 else x.float(), dim=-1).amax())

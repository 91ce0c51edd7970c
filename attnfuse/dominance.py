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

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from attnfuse.memo import host_bool
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import MASKING_THRESHOLD

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


def _largest(bias: torch.Tensor) -> float:
    if bias.numel() == 0:
        return 0.0
    return float(bias.detach().amax().float())


# the masking threshold as each half-precision dtype stores it (-1e4 is -9984 in bf16), worked out once
_STORED_THRESHOLD = {dtype: float(torch.tensor(MASKING_THRESHOLD, dtype=torch.float64).to(dtype))
                     for dtype in (torch.float16, torch.bfloat16)}


def half_live_floor(dtype: torch.dtype) -> float:
    """The bias at or below which a key is not live in a half-precision addition: ``absorbing(dtype)``, or the masking
    threshold as ``dtype`` stores it where that is higher. A row whose every key is that low is uniform by rounding
    in the original's fp16 / bf16 ``s + fill``, not in a kernel's fp32 one."""
    floor = absorbing(dtype)
    return max(floor, _STORED_THRESHOLD[dtype]) if dtype in _STORED_THRESHOLD else floor


def live_floor(bias_dtype: torch.dtype, q_dtype: torch.dtype) -> tuple[Optional[float], Optional[float]]:
    """``(floor, absorbed_below)`` for ``every_row_has_a_live_key`` on a bias of ``bias_dtype`` beside q of
    ``q_dtype``: a half-precision bias's rows of keys at or below ``half_live_floor``, but above ``PROVEN_FILL``,
    are uniform only in its own arithmetic; a wider bias beside fp16 q is taken in fp16, where keys below -65504 are
    ``-inf``; any other bias has the default floor (``absorbing``)."""
    if q_dtype == torch.float16 and bias_dtype != q_dtype:
        return float(torch.finfo(torch.float16).min), None
    if bias_dtype in _STORED_THRESHOLD:
        return half_live_floor(bias_dtype), PROVEN_FILL
    return None, None


def live_keys(bias: Optional[torch.Tensor], full_keep: Optional[torch.Tensor],
              dtype: torch.dtype, floor: Optional[float] = None) -> Optional[torch.Tensor]:
    """True where a key is kept and its bias is above ``floor`` (``absorbing(dtype)`` unless given): the keys a row's
    softmax is over when the row has one (None: every key)."""
    live = None if bias is None else bias > (absorbing(dtype) if floor is None else floor)
    if full_keep is not None:
        live = full_keep if live is None else live & full_keep
    return live


def every_row_has_a_live_key(bias: Optional[torch.Tensor], full_keep: Optional[torch.Tensor],
                             dtype: torch.dtype, floor: Optional[float] = None,
                             absorbed_below: Optional[float] = None) -> bool:
    """Whether every query row keeps a key whose bias is above the masking floor, or (``absorbed_below``) holds only
    keys at or below that value (one pass over the bias and mask, one host read). In such a row the masked keys,
    and kept keys with an absorbing bias, have weight exactly 0 whatever value they hold (``fill + bias``, ``-inf``
    or ``finfo.min`` after a clamp); in a row without one, the original's weights depend on those values, so the
    site's own ops run."""
    live = rows_with_a_live_key(bias, full_keep, dtype, floor, absorbed_below)
    return live is None or host_bool(live) is True  # unreadable (under a tracer): the original ops run


def rows_with_a_live_key(bias: Optional[torch.Tensor], full_keep: Optional[torch.Tensor], dtype: torch.dtype,
                         floor: Optional[float] = None, absorbed_below: Optional[float] = None) -> Optional[torch.Tensor]:
    """``every_row_has_a_live_key``'s answer unread (a one-element tensor, for a read shared with another flag), or
    None where there is nothing to check (every key live)."""
    live = live_keys(bias, full_keep, dtype, floor)
    if live is None:
        return None
    rows = live.any(-1)
    if absorbed_below is not None and bias is not None:  # a row of keys that low is uniform in fp32 too
        low = bias <= absorbed_below
        rows = rows | (low if full_keep is None else low | ~full_keep).all(-1)
    return rows.all()


@dataclass(frozen=True)
class FillDominance:
    """The per-call check that the site's finite fill still masks (see the module docstring).

    ``after_fill``: positions, in the site's bias list, of biases added after the fill (masked entries then
    hold ``fill + bias``, so the bias's largest value counts too). ``finite_scores``: the scores were
    multiplied by a 0/1 mask, so they must be finite as well (``inf * 0`` is NaN).
    """

    fill: float
    softmax_dtype: torch.dtype
    scores_dtype: torch.dtype
    after_fill: tuple[int, ...] = ()
    finite_scores: bool = False

    def holds(self, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: Optional[float],
              biases: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
              full_keep: Optional[torch.Tensor] = None) -> bool:
        """``biases``: the site's bias terms (scaled); ``bias``: their sum as the kernel adds it, and
        ``full_keep`` the call's keep-mask with its causal triangle, read when a bias holds absorbing values."""
        if is_traced(q):
            return False  # no values under a compiler's tracer: the original ops run
        floor = absorbing(self.scores_dtype)
        lowest_bias = sum(_smallest(b) for b in biases)
        masked_top = self.fill + sum(_largest(biases[i]) for i in self.after_fill)
        absorbed_kept = False  # kept keys whose bias is absorbing: they compete like masked keys
        if lowest_bias <= floor and bias is not None:
            if not every_row_has_a_live_key(bias, full_keep, self.scores_dtype):
                return False
            lowest_bias, absorbed_kept = _smallest(bias.detach().masked_fill(bias <= floor, math.inf)), True
        norms = _largest_norm(q) * _largest_norm(k) if self.finite_scores else None
        if norms is not None and not max(1.0, abs(scale)) * norms < float(torch.finfo(self.scores_dtype).max) / 4:
            return False  # a score may be infinite, and ``inf * 0`` is NaN in the original
        if self.fill <= floor and masked_top <= floor and lowest_bias > floor:
            return True
        bound = abs(scale) * (norms if norms is not None else _largest_norm(q) * _largest_norm(k))
        if softcap is not None:
            bound = min(bound, abs(softcap))
        if absorbed_kept:
            masked_top = max(masked_top, floor + bound)
        return -bound + lowest_bias >= masked_top + underflow_gap(self.softmax_dtype)


def _largest_norm(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    x = x.detach()
    return float(torch.linalg.vector_norm(x if x.dtype == torch.float64 else x.float(), dim=-1).amax())

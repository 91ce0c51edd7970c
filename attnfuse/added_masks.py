"""An additive ``0 / fill`` mask read as a causal flag and key-padding keep-masks, and the calls that may use it.

transformers' eager models add one ``(B, 1, L, S)`` bias, ``where(causal & padding[b, kv], 0, finfo.min)``
(with a sliding window for Mistral and Gemma 2). The matcher reads it as the causal (windowed) flag and the
``(B, 1, 1, S)`` padding keep-mask with a fill of ``finfo.min`` (``patterns/causal.py``), so the call runs on
the kernels' causal path instead of adding a materialized bias. Where that is exact:

* a row that keeps a key: the masked entries hold ``s + fill`` instead of ``fill``; both weigh exactly 0 for a
  fill at the bottom of the dtype (the same argument as for a replacing fill, ``attnfuse.dominance``).
* a row that keeps no key (a left-padded query, or a padded query past its window): the original's softmax runs
  over every key of ``s + fill``. That is uniform (the mean of v, which the fused call writes back) only while
  ``s + fill`` rounds to ``fill`` for every score (``|s|`` below ~1e31 for fp32's lowest value, 16 for fp16's),
  and its backward reaches the scores (the softmax's derivative at uniform weights is not 0), so q and k get
  gradients from such a row that a written-back mean does not give.

So each call reads whether some row keeps no key (a pass over the mask, one host read); where one does, the call
uses the fast path only without gradients to q and k and with the scores bounded below the rounding limit
(``|scale| * max|q_i| * max|k_j|``, or the softcap: one pass over q and k, one host read). Every other call, and
every call under a compiler's tracer (no value can be read there), adds the mask rebuilt from the same keep-mask,
bit for bit the original's bias, as the site did before this reading existed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from attnfuse.dominance import _largest_norm
from attnfuse.masking import is_traced
from attnfuse.memo import host_bool

# The scores' bound from norms may exceed the computed scores by their rounding: a margin for it.
_ROUNDING_MARGIN = 1.01


@dataclass(frozen=True)
class AddedMask:
    """What a call needs to decide between the keep-mask reading and the original's bias, and to rebuild it.

    ``fill``: the masked value; ``dtype``: the bias's dtype; ``absorbed_below``: ``|s|`` under which ``s + fill``
    rounds to ``fill`` in the addition's dtype (0: never proven, rows without keys always take the bias)."""

    fill: float
    dtype: torch.dtype
    absorbed_below: float

    def reads_as_mask(self, full_keep: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                      softcap: Optional[float]) -> bool:
        """Whether this call may run as the causal flag and keep-masks (``full_keep``: the call's whole keep-mask)."""
        if is_traced(q) or is_traced(full_keep):
            return False
        if full_keep.shape[-1] == 0 or host_bool(full_keep.any(-1).all()):
            return True  # every row keeps a key
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return False
        bound = abs(softcap) if softcap is not None else math.inf
        if bound * _ROUNDING_MARGIN >= self.absorbed_below:
            bound = min(bound, abs(scale) * _largest_norm(q) * _largest_norm(k))
        return bound * _ROUNDING_MARGIN < self.absorbed_below

    def bias(self, full_keep: torch.Tensor) -> torch.Tensor:
        """The original's additive mask: 0 where ``full_keep`` keeps, ``fill`` elsewhere, in the bias's dtype."""
        zero = torch.zeros((), dtype=self.dtype, device=full_keep.device)
        return torch.where(full_keep, zero, self.fill)


def absorbed_below(fill: float, dtypes: Iterable[torch.dtype]) -> float:
    """The bound on ``|s|`` under which ``s + fill`` rounds to ``fill`` in every one of ``dtypes`` (half the
    spacing of floats next to ``fill`` on the side of zero); 0 for none, a non-finite or a subnormal fill."""
    limits = []
    for dtype in dtypes:
        if not dtype.is_floating_point:
            return 0.0
        info = torch.finfo(dtype)
        value = abs(float(torch.tensor(fill, dtype=torch.float64).to(dtype)))
        if not math.isfinite(value) or value < info.tiny:
            return 0.0
        mantissa, exponent = math.frexp(value)
        spacing = 2.0 ** (exponent - 1) * info.eps / (2.0 if mantissa == 0.5 else 1.0)
        limits.append(spacing / 2)
    return min(limits, default=0.0)

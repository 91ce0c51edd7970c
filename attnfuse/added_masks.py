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

So each call reads whether some row keeps no key (a pass over the mask, one host read). Where one does, the
scores are bounded (``|scale| * max|q_i| * max|k_j|``, or the softcap: one pass over q and k, one host read) and
the call takes one of three paths (``AddedMask.path``): ``"mask"`` (the fast path) without gradients to q and k
and with the bound under the rounding limit; ``"bias"`` (the original's mask rebuilt bit for bit from the same
keep-mask and added by the kernel, as the site ran before this reading existed) with gradients, where the bound
is also under the limit of the kernel's own addition (in fp32 or the bias's dtype); ``"original"`` (the site's
own ops) otherwise, fp16's dead rows being the usual case. Under a compiler's tracer no value can be read: the
bias path runs where its limit is at least 1e30 (the magnitude of scores the project already takes as given for
a fill of -1e30 to mask, ``dominance.PROVEN_FILL``), the original ops elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from attnfuse.dominance import PROVEN_FILL, _largest_norm
from attnfuse.masking import is_traced
from attnfuse.memo import host_bool

# The scores' bound from norms may exceed the computed scores by their rounding: a margin for it.
_ROUNDING_MARGIN = 1.01


@dataclass(frozen=True)
class AddedMask:
    """What a call needs to choose its path (see the module docstring), and to rebuild the original's bias.

    ``fill``: the masked value; ``dtype``: the bias's dtype; ``absorbed_below``: ``|s|`` under which ``s + fill``
    rounds to ``fill`` in the original's addition; ``kernel_absorbed_below``: the same for that and the kernel's
    addition of the rebuilt bias (0: never proven)."""

    fill: float
    dtype: torch.dtype
    absorbed_below: float
    kernel_absorbed_below: float

    def path(self, full_keep: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
             softcap: Optional[float]) -> str:
        """``"mask"``, ``"bias"`` or ``"original"`` for this call (``full_keep``: its whole keep-mask)."""
        if is_traced(q) or is_traced(full_keep):
            return "bias" if self.kernel_absorbed_below >= -PROVEN_FILL else "original"
        if full_keep.shape[-1] == 0 or host_bool(full_keep.any(-1).all()):
            return "mask"  # every row keeps a key
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        limit = self.kernel_absorbed_below if needs_grad else self.absorbed_below
        bound = abs(softcap) if softcap is not None else math.inf
        if bound * _ROUNDING_MARGIN >= limit:
            bound = min(bound, abs(scale) * _largest_norm(q) * _largest_norm(k))
        if bound * _ROUNDING_MARGIN >= limit:
            return "original"
        return "bias" if needs_grad else "mask"

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

"""Lowering of masks: the one ``attn_mask`` SDPA takes, and the rows where every key is masked.

SDPA takes a single mask, so keep-masks, a causal triangle and additive biases are combined here
only when more than one is present; a lone causal mask stays on the kernels' causal path. Rows in
which every key is masked are where kernels disagree (0, NaN, or, on cuDNN, unmasked); the
original model's answer for them (the mean of v for a finite fill, NaN for ``-inf``) is written
back explicitly, so the result never depends on the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.bias import causal_lower_right

from attnfuse.memo import ContentMemo, memoizable

_ROWS_WITHOUT_KEYS = ContentMemo()  # keep-mask -> whether some query row keeps no key
_CONJUNCTIONS = ContentMemo()  # keep-mask -> ContentMemo(another keep-mask -> the two combined)


def conjunction(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first & second``; for the same two unchanged masks, the same tensor at every call.

    A site with two keep-masks (say padding and a custom mask) would otherwise hand a fresh tensor
    to every call, and the facts memoized about a keep-mask (``rows_without_keys``) would cost a host
    synchronization each time. The combination is a fact about ``second`` stored under a fact about
    ``first``, so a write to either mask gives a new conjunction.
    """
    combinations_with_first = _CONJUNCTIONS.get(first, None, ContentMemo)
    return combinations_with_first.get(second, None, lambda: first & second)


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


def sdpa_mask(full_keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: Optional[str], L: int,
              S: int, q: torch.Tensor, window: Optional[int] = None) -> tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` for SDPA, building an ``L x S`` tensor only when the inputs force it.

    ``full_keep`` is the call's keep-mask already combined with its causal triangle (``combined_keep``),
    or None when the call has no keep-mask.
    """
    device = q.device
    if full_keep is None and bias is None and window is None:
        if causal is None:
            return None, False
        if causal == "top_left" or L == S:
            return None, True
        if L < S and not is_traced(q):
            return causal_lower_right(L, S), False
    keep = full_keep if full_keep is not None else combined_keep(None, causal, L, S, device, window)
    if bias is None:
        return keep, False
    if keep is None:  # the bias keeps its dtype: attend decided it (an fp32 bias on bf16 q is added in fp32)
        return bias, False
    return bias.masked_fill(~keep, torch.finfo(bias.dtype).min), False


def rows_without_keys(keep: Optional[torch.Tensor], causal: Optional[str], L: int, S: int,
                      device: torch.device, window: Optional[int] = None,
                      full_keep: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A boolean broadcastable to ``(B, H, L, 1)``, True where a query row keeps no key; None if none does.

    For a keep-mask the answer needs its values: eagerly, whether any row is empty is learned once per
    unchanged mask (one host synchronization, ``attnfuse.memo``), so the usual mask, with a key in
    every row, costs no pass over the output. ``full_keep`` may pass ``combined_keep``'s result if built.
    """
    if keep is None and window is None:
        if causal == "bottom_right" and L > S:
            return (torch.arange(L, device=device) < L - S).unsqueeze(-1)
        return None
    if keep is None and (causal == "bottom_right" or L <= S):
        # a window keeps the diagonal key j = i + S - L whenever that key exists
        return (torch.arange(L, device=device) < L - S).unsqueeze(-1) if L > S else None

    def empty_rows() -> torch.Tensor:
        full = full_keep if full_keep is not None else combined_keep(keep, causal, L, S, device, window)
        return ~full.any(-1, keepdim=True)

    if keep is not None and memoizable(keep):
        if not _ROWS_WITHOUT_KEYS.get(keep, (causal, L, S, window), lambda: bool(empty_rows().any())):
            return None
    return empty_rows()


def restore_fully_masked_rows(out: torch.Tensor, v: torch.Tensor, dead: torch.Tensor, mode: str) -> torch.Tensor:
    """Write the chosen output into rows with every key masked: zero, the mean of v, or NaN."""
    if mode in ("zero", "nan"):
        fill = torch.full((), 0.0 if mode == "zero" else float("nan"), dtype=out.dtype, device=out.device)
    else:
        fill = v.mean(dim=-2, keepdim=True).to(out.dtype)
        if fill.shape[1] != out.shape[1]:
            fill = fill.repeat_interleave(out.shape[1] // fill.shape[1], dim=1)
    if not out.requires_grad and not is_traced(out):
        return torch.where(dead, fill, out, out=out)  # no gradient to keep: in place, no second output
    return torch.where(dead, fill, out)

"""Lowering of masks: the one ``attn_mask`` SDPA takes, and the rows where kernels and the original differ.

SDPA takes a single mask, so keep-masks, a causal triangle and additive biases are combined here
only when more than one is present; a lone causal mask stays on the kernels' causal path. Rows in
which every key is masked are where kernels disagree (0, NaN, or, on cuDNN, unmasked); the
original model's answer for them (the mean of v for a finite fill, NaN for ``-inf``) is written
back explicitly, so the result never depends on the kernel. The same holds for rows whose every
score is ``-inf`` through a bias (NaN in the original). Which rows those are is computed from the
mask's values at every call (``attnfuse.memo`` says why nothing is memoized, and what it costs).

NaN or inf in a masked key (an uninitialised cache slot): the original replaces the masked score,
a kernel that adds its mask computes ``NaN + -inf``. ``attend`` checks such a kernel's output and
recomputes the call unfused when a non-finite value leaked in. Not reproduced, by choice of cost:
a NaN or inf *value* in a key above the causal diagonal with ``is_causal`` on a kernel that skips
masked tiles (CPU flash from a few hundred keys, GPU flash / memory-efficient / cuDNN past one tile):
the original gives NaN in every row (``0 * NaN``), the kernel only in the rows that see the key;
under a compiler or CUDA-graph capture, a NaN or inf key that some query row keeps and another
masks (only keys masked for every row are zeroed there); and an additive causal constant (``s +
triu(-inf)``, run on the causal path) over a non-finite key, where the original's ``NaN + -inf``
is NaN and the causal kernel selects (the site would need to say that its mask was added); an
infinite key that some row *keeps*, scoring ``-inf`` in a row with no other kept key (the original
gives NaN, or uniform weights over the masked keys with a finite fill; kernels give 0), since
finding it needs a pass over k at every call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.bias import causal_lower_right

from attnfuse.memo import host_bool
from attnfuse.tracing import is_traced
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

    A causal triangle alone is answered from the shapes. A keep-mask is reduced over its keys at
    every call (a pass over the mask, not over q, k or v) and, eagerly, whether any row is empty is
    read on the host (``attnfuse.memo``), so a mask with a key in every row costs no pass over the
    output. ``full_keep`` may pass ``combined_keep``'s result if built. With no key at all
    (``S == 0``) there is nothing to restore: the original sums over no key and gives 0.
    """
    if S == 0:
        return None
    if keep is None and window is None:
        if causal == "bottom_right" and L > S:
            return (torch.arange(L, device=device) < L - S).unsqueeze(-1)
        return None
    if keep is None and (causal == "bottom_right" or L <= S):
        # a window keeps the diagonal key j = i + S - L whenever that key exists
        return (torch.arange(L, device=device) < L - S).unsqueeze(-1) if L > S else None
    dead, any_dead = unread_rows_without_keys(keep, causal, L, S, device, window, full_keep)
    return None if host_bool(any_dead) is False else dead


def unread_rows_without_keys(keep: Optional[torch.Tensor], causal: Optional[str], L: int, S: int,
                             device: torch.device, window: Optional[int] = None,
                             full_keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, any_row)`` of a keep-mask, not yet read on the host, so the caller can read the flag
    together with another one (one synchronization instead of two)."""
    full = full_keep if full_keep is not None else combined_keep(keep, causal, L, S, device, window)
    dead = ~full.any(-1, keepdim=True)
    return dead, dead.any()


def rows_of_neginf(bias: torch.Tensor, full_keep: Optional[torch.Tensor], fill_is_neginf: bool,
                   zeroed: bool = False) -> Optional[torch.Tensor]:
    """Rows whose every score is ``-inf`` in the original (so its softmax gives NaN), beyond rows
    without keys: a bias of ``-inf`` at every kept key, and a ``-inf`` fill or no masked key.
    ``zeroed``: the original zeroed the masked keys' weights after the softmax (rows without keys give 0),
    so such a row is NaN only where it keeps a key.

    Kernels return 0 for such rows. Costs a pass over the bias (and mask) per call and, eagerly, a
    host read; None when no row is affected.
    """
    if not bias.is_floating_point() or bias.shape[-1] == 0:
        return None
    blocked = torch.isneginf(bias)
    if full_keep is not None:
        blocked = (blocked | ~full_keep) if fill_is_neginf or zeroed else (blocked & full_keep)
    rows = blocked.all(-1, keepdim=True)
    if zeroed and full_keep is not None:
        rows = rows & full_keep.any(-1, keepdim=True)
    return None if host_bool(rows.any()) is False else rows


def dead_key_columns(full_keep: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B|1, Hk|1, S)``: True for a key that every query row (of every query head sharing its kv
    head) masks, so its k row is never read by the original and may be zeroed."""
    full = full_keep.reshape((1,) * (4 - full_keep.dim()) + tuple(full_keep.shape))
    dead = ~full.any(-2)
    if dead.shape[1] > kv_heads:
        dead = dead.unflatten(1, (kv_heads, -1)).all(2)
    return dead


def uniform_rows_for_dropout(q: torch.Tensor, full_keep: torch.Tensor, bias: Optional[torch.Tensor],
                             dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(q, keep, bias)`` under which the kernel itself gives a row without keys uniform weights.

    With a finite fill the original computes ``dropout(uniform) @ v`` for such a row (a random
    result), which no write-back can reproduce: the row's q is zeroed, every key is kept and its
    bias set to 0, so its scores are all 0 and the kernel's own dropout applies (on the CPU, where
    SDPA's math kernel draws the same dropout mask as the original, even under the same seed).
    Costs a pass over q and over the mask; gradients reach neither q nor k from such a row, as in
    the original.
    """
    keep = full_keep | dead
    bias = None if bias is None else torch.where(dead, torch.zeros((), dtype=bias.dtype, device=bias.device), bias)
    return q.masked_fill(dead, 0), keep, bias


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

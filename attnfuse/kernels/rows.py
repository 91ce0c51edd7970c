"""Rows where kernels and the original differ: rows with every key masked, rows a bias masks.

Rows in which every key is masked are where kernels disagree (0, NaN, or, on cuDNN, unmasked);
the original model's answer for them (the mean of v for a finite fill, NaN for ``-inf``) is written
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

from typing import TYPE_CHECKING, Optional

import torch

from attnfuse.masking import combined_keep
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import MASKING_THRESHOLD, causal_offset
from attnfuse.memo import host_bool

# Fused kernels multiply the scores by log2(e) before exp2: a score below this overflows to -inf in fp32.
KERNEL_SCORE_FLOOR = -torch.finfo(torch.float32).max / 1.4426950408889634
# A fill every fused kernel keeps finite, exact in fp32 and bf16, that still absorbs every |s| below 1e30 in both.
KERNEL_SAFE_FILL = -(2.0 ** 126)

if TYPE_CHECKING:
    from attnfuse.kernels.call import AttentionCall, CallFacts


def restore_rows(out: torch.Tensor, call: "AttentionCall") -> torch.Tensor:
    """``out`` with the original's answer in the call's rows whose every key is masked, by a mask or a
    bias; rows the kernel already computed (``call.facts``) are not computed again."""
    facts, keep, causal, window, mode = call.facts, call.keep, call.causal, call.window, call.fully_masked_rows
    L, S, device = call.q.shape[-2], call.k.shape[-2], call.q.device
    dead = facts.dead if facts.dead_known else rows_without_keys(keep, causal, L, S, device, window, facts.full_keep)
    if dead is not None and not (call.dropout_p > 0 and mode == "mean"):
        # with dropout a finite fill's row is dropout(uniform) @ v, computed by the kernel or the math path
        out = restore_fully_masked_rows(out, call.v, dead, mode)
    far, exact = facts.far_rows if facts.far_rows is not None else (None, True)
    if far is not None and exact:  # rows below the fused kernels' range: the original's uniform weights
        out = restore_fully_masked_rows(out, call.v, far, "mean")
    if call.bias is not None and call.bias_fill is None:  # a finite fill's bias holds no -inf
        whole = facts.full_keep if facts.full_keep is not None else combined_keep(keep, causal, L, S, device, window)
        if not _no_neginf_rows(call.bias, whole, facts.far_rows, facts.far_rows_of):
            neginf_rows = rows_of_neginf(call.bias, whole, mode == "nan", zeroed=mode == "zero" and keep is not None)
            if neginf_rows is not None:
                out = restore_fully_masked_rows(out, call.v, neginf_rows, "nan")
    return out


def _no_neginf_rows(bias: torch.Tensor, full_keep: Optional[torch.Tensor],
                    far_rows: Optional[tuple[Optional[torch.Tensor], bool]], far_rows_of: Optional[torch.Tensor]) -> bool:
    """Whether ``rows_beyond_kernel_range`` already proved, on this very bias, that no row is ``-inf`` at every key:
    without a keep-mask such a row's maximum is ``-inf``, below the floor, and that read found no row below it."""
    return full_keep is None and far_rows is not None and far_rows[0] is None and far_rows_of is bias


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
    if full_keep is None and causal is not None and keep is not None and keep.dim() == 4 and keep.shape[-2] == 1:
        dead = _key_mask_rows_without_keys(keep, causal, L, S, window)
    else:
        full = full_keep if full_keep is not None else combined_keep(keep, causal, L, S, device, window)
        dead = ~full.any(-1, keepdim=True)
    return dead, dead.any()


def _key_mask_rows_without_keys(keep: torch.Tensor, causal: str, L: int, S: int,
                                window: Optional[int]) -> torch.Tensor:
    """Rows without keys of a key-padding mask ``(B, H, 1, S)`` under a causal (windowed) triangle, counted from a
    running sum of the kept keys: a pass over the key mask, never over the ``L x S`` triangle."""
    kept_before = torch.nn.functional.pad(keep.to(torch.int32).cumsum(-1), (1, 0))  # kept keys before j, j <= S
    last = torch.arange(L, device=keep.device) + causal_offset(causal, L, S)  # the diagonal key of each row
    first = last - window + 1 if window is not None else torch.zeros_like(last)
    upper, lower = (last + 1).clamp(0, S), first.clamp(0, S)
    count = kept_before[..., upper] - kept_before[..., lower]  # (B, H, 1, L)
    return (count <= 0).transpose(-1, -2)


def rows_beyond_kernel_range(bias: torch.Tensor, full_keep: Optional[torch.Tensor],
                             dropout_p: float) -> tuple[Optional[torch.Tensor], bool]:
    """``(rows, exact)``: rows whose every bias entry is below ``KERNEL_SCORE_FLOOR`` (a row of ``finfo.min``,
    transformers' mask over a left-padded query), where a fused kernel's row overflows to ``-inf`` and it gives
    0, while the original gives ``softmax(s + bias)``. ``exact``: each such row keeps every key and holds one
    value, so the original's answer is the mean of v (``s + bias`` rounds to ``bias`` for ``|s| < 1e30``) and
    ``rows`` may be written back; otherwise the call is computed unfused. Rows without keys are left to
    ``rows_without_keys``. A pass over the bias and, eagerly, a host read; under a tracer the rows are written
    back unconditionally (rows of distinct values that low are not reproduced there).
    """
    if not bias.is_floating_point() or bias.shape[-1] == 0:
        return None, True
    values = bias.detach()
    top = values.amax(-1, keepdim=True)
    rows = top < KERNEL_SCORE_FLOOR
    if full_keep is not None:
        rows = rows & full_keep.any(-1, keepdim=True)
    found = host_bool(rows.any())
    if found is None:
        return rows, True
    if not found:
        return None, True  # the usual case: one reduction over the bias and one host read
    uniform = values.amin(-1, keepdim=True) == top
    if full_keep is not None:
        uniform = uniform & full_keep.all(-1, keepdim=True)
    inexact = rows & ~uniform if dropout_p == 0 else rows
    return rows, not bool(inexact.any())


def within_kernel_range(bias: torch.Tensor, fill: float, facts: "CallFacts") -> tuple[torch.Tensor, float]:
    """A bias of only 0 and ``fill`` (proven by the caller; ``fill`` absorbs every score) with the fill raised to
    ``KERNEL_SAFE_FILL`` where it lay below the fused kernels' range (a pass over the bias, no host read).

    The original's rows of ``fill`` are ``softmax(s + fill) == softmax(fill)``: uniform; with the fill in range
    the kernels compute that themselves, and a row that keeps a 0 weighs a fill of either value exactly 0.
    So ``facts`` records, without reading the bias, that no row lies beyond the kernels' range. Only for calls
    without gradients: a fused backward of a uniform row is ``S`` times too large (``bias_masks_a_whole_row``).
    """
    if fill < KERNEL_SAFE_FILL:
        bias, fill = bias.clamp_min(KERNEL_SAFE_FILL), KERNEL_SAFE_FILL
    facts.far_rows, facts.far_rows_of = (None, True), bias
    return bias, fill


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


def bias_masks_a_whole_row(bias: torch.Tensor) -> bool:
    """Whether an additive bias masks every key of some query row (a reduction over the bias at every
    call and, eagerly, a host read; see ``attnfuse.memo``).

    Fused kernels recompute the probabilities in the backward pass from a log-sum-exp; for a row of
    ``finfo.min`` entries, ``min + log(S)`` rounds back to ``min`` and the gradients come out ``S``
    times too large (found by the fuzzer, CPU flash; the same recomputation is in the GPU kernels).
    Such calls run unfused, as the original did. Under a compiler the value is unknown: unfused too.
    """
    if not bias.is_floating_point() or bias.shape[-1] == 0:
        return False
    return host_bool((bias.amax(dim=-1) <= MASKING_THRESHOLD).any()) is not False

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
triu(-inf)``, or a run-time bias read as causal, run on the causal path) over a non-finite key, where the original's ``NaN + -inf``
is NaN and the causal kernel selects (the site would need to say that its mask was added); an
infinite key that some row *keeps*, scoring ``-inf`` in a row with no other kept key (the original
gives NaN, or uniform weights over the masked keys with a finite fill; kernels give 0), since
finding it needs a pass over k at every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from attnfuse.masking import combined_keep
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import MASKING_THRESHOLD, causal_offset
from attnfuse.memo import host_bool, host_bools

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
    if facts.far_rows is not None:  # rows below a fused kernel's range that its check let through
        out = restore_fully_masked_rows(out, call.v, facts.far_rows, "mean")  # the original's uniform weights
    if call.bias is not None:
        neginf = call.bias_rows().neginf  # the same read where the fused kernel's check made it on this bias
        if neginf is not None:
            out = restore_fully_masked_rows(out, call.v, neginf, "nan")
    return out


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
    dead = keep_rows_without_keys(keep, causal, L, S, device, window, full_keep)
    return dead, dead.any()


def keep_rows_without_keys(keep: Optional[torch.Tensor], causal: Optional[str], L: int, S: int,
                           device: torch.device, window: Optional[int] = None,
                           full_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rows of a keep-mask that keep no key (a boolean broadcastable to ``(B, H, L, 1)``), on the device: for
    a caller that writes them back unconditionally and needs no flag."""
    if full_keep is None and causal is not None and keep is not None and keep.dim() == 4 and keep.shape[-2] == 1:
        return _key_mask_rows_without_keys(keep, causal, L, S, window)
    full = full_keep if full_keep is not None else combined_keep(keep, causal, L, S, device, window)
    return ~full.any(-1, keepdim=True)


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


@dataclass(frozen=True)
class BiasRows:
    """What one pass over a call's bias tells, read on the host together (``bias_rows``).

    ``far``: rows whose every entry is below ``KERNEL_SCORE_FLOOR`` (a row of ``finfo.min``, transformers' mask over
    a left-padded query), where a fused kernel's row overflows to ``-inf`` and it gives 0 while the original gives
    ``softmax(s + bias)``; ``exact``: each such row keeps every key and holds one value, so the original's answer is
    the mean of v (``s + bias`` rounds to ``bias`` for ``|s| < 1e30``) and ``far`` may be written back, else the call
    runs unfused. ``neginf``: rows whose every score is ``-inf`` in the original (NaN there; kernels give 0).
    ``masks_a_row``: some row's bias is at or below the masking threshold throughout (a fused backward would give
    its gradients ``S`` times too large). ``triangle``: the bias equals the causal triangle it was compared with
    (``Triangle``). Rows without keys are left to ``rows_without_keys``.
    """

    far: Optional[torch.Tensor]
    exact: bool
    neginf: Optional[torch.Tensor]
    masks_a_row: bool
    triangle: bool = False


@dataclass(frozen=True)
class Triangle:
    """A causal triangle to compare a bias with: ``expected`` is ``(L, S)``, 0 where the triangle keeps a key and
    ``floor`` elsewhere; ``floor`` is a value of the bias's dtype at or below the fill that masks every score
    (``dominance.absorbing``). A bias equals it where each of its ``(L, S)`` slices is 0 on the kept keys and at or
    below ``floor`` (``-inf`` included, NaN not) on the others: ``max(bias, floor) == expected``, exact in any dtype."""

    expected: torch.Tensor
    floor: float

    def holds(self, values: torch.Tensor) -> torch.Tensor:
        """Whether ``values`` equals the triangle, unread (a clamp and a comparison over the bias)."""
        return (values.clamp_min(self.floor) == self.expected).all()


def bias_rows(bias: torch.Tensor, full_keep: Optional[torch.Tensor], dropout_p: float, fill_is_neginf: bool,
              zeroed: bool = False, triangle: Optional[Triangle] = None) -> BiasRows:
    """The call's ``BiasRows`` from one reduction over the bias (and, with a keep-mask, one ``-inf`` pass) and, eagerly,
    one host read of all its flags (one synchronization on CUDA). ``fill_is_neginf``: masked keys score ``-inf``;
    ``zeroed``: the original zeroed the masked keys' weights after the softmax (rows without keys give 0), so a
    ``-inf`` row is NaN only where it keeps a key. ``triangle``: also compare the bias with it (a pass over the
    bias), read in the same host read. Under a tracer nothing is read: ``far`` and ``neginf`` are written
    back unconditionally (rows of distinct values that low are not reproduced there), ``masks_a_row`` is True and
    ``triangle`` False.
    """
    if not bias.is_floating_point() or bias.shape[-1] == 0:
        return BiasRows(None, True, None, False)
    values = bias.detach()
    low, top = torch.aminmax(values, dim=-1, keepdim=True)  # one pass over the bias for both
    far = top < KERNEL_SCORE_FLOOR
    uniform = low == top
    if full_keep is not None:
        far = far & full_keep.any(-1, keepdim=True)
        uniform = uniform & full_keep.all(-1, keepdim=True)
    inexact = far & ~uniform if dropout_p == 0 else far  # under dropout a uniform row is dropout(uniform): random
    neginf = _neginf_rows(values, top, full_keep, fill_is_neginf, zeroed)
    unread = (far.any(), inexact.any(), neginf.any(), (top <= MASKING_THRESHOLD).any())
    flags = host_bools(*unread, triangle.holds(values)) if triangle is not None else host_bools(*unread)
    if flags is None:
        return BiasRows(far, True, neginf, True)
    far_found, inexact_found, neginf_found, masks_a_row = flags[:4]
    return BiasRows(far if far_found else None, not inexact_found, neginf if neginf_found else None, masks_a_row,
                    triangle=triangle is not None and flags[4])


def _neginf_rows(values: torch.Tensor, top: torch.Tensor, full_keep: Optional[torch.Tensor], fill_is_neginf: bool,
                 zeroed: bool) -> torch.Tensor:
    """Rows whose every score is ``-inf`` in the original, beyond rows without keys: a bias of ``-inf`` at every kept
    key, and a ``-inf`` fill or no masked key. Without a keep-mask that is a row whose maximum is ``-inf`` (the
    reduction already made); with one, a pass over the bias and the mask."""
    if full_keep is None:
        return top == float("-inf")
    blocked = torch.isneginf(values)
    blocked = (blocked | ~full_keep) if fill_is_neginf or zeroed else (blocked & full_keep)
    rows = blocked.all(-1, keepdim=True)
    return rows & full_keep.any(-1, keepdim=True) if zeroed else rows


_IN_RANGE = BiasRows(None, True, None, True)  # what ``within_kernel_range`` records, built once (it is immutable)


def within_kernel_range(bias: torch.Tensor, fill: float, facts: "CallFacts") -> tuple[torch.Tensor, float]:
    """A bias of only 0 and ``fill`` (proven by the caller; ``fill`` absorbs every score) with the fill raised to
    ``KERNEL_SAFE_FILL`` where it lay below the fused kernels' range (a pass over the bias, no host read).

    The original's rows of ``fill`` are ``softmax(s + fill) == softmax(fill)``: uniform; with the fill in range
    the kernels compute that themselves, and a row that keeps a 0 weighs a fill of either value exactly 0; a
    finite fill's bias holds no ``-inf``. So ``facts`` records, without reading the bias, what ``bias_rows`` would
    read. Only for calls without gradients: a fused backward of a uniform row is ``S`` times too large.
    """
    if fill < KERNEL_SAFE_FILL:
        bias, fill = bias.clamp_min(KERNEL_SAFE_FILL), KERNEL_SAFE_FILL
    facts.bias_rows, facts.bias_rows_of = _IN_RANGE, bias
    return bias, fill


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

"""``attnfuse.attend``: the fused attention op that every rewritten site calls."""
from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional

import torch

from attnfuse import dispatch
from attnfuse.masking import restore_fully_masked_rows, rows_without_keys, sdpa_mask

Causal = Optional[Literal["top_left", "bottom_right"]]
FullyMaskedRows = Literal["zero", "mean", "nan"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Causal, fully_masked: str) -> None:
    if q.dim() != 4:
        raise ValueError(f"attend: q must be (batch, heads, q_len, head_dim), got shape {tuple(q.shape)}")
    if k.dim() not in (3, 4) or v.dim() != k.dim():
        raise ValueError("attend: k and v must both be (batch, kv_heads, k_len, dim) or single-head (batch, k_len, dim)")
    if causal not in (None, "top_left", "bottom_right"):
        raise ValueError(f"attend: causal must be None, 'top_left' or 'bottom_right', got {causal!r}")
    if fully_masked not in ("zero", "mean", "nan"):
        raise ValueError(f"attend: fully_masked_rows must be 'zero', 'mean' or 'nan', got {fully_masked!r}")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    causal: Causal = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    fully_masked_rows: FullyMaskedRows = "zero",
    kernels: Optional[Iterable[str]] = None,
    on_kernel: Optional[Callable[[str], None]] = None,
) -> torch.Tensor:
    """Fused ``softmax(scale * q k^T + bias, masked) @ v`` on the fastest valid SDPA kernel.

    Args:
        q: ``(B, H, L, E)``. k, v: ``(B, Hk, S, E)`` / ``(B, Hk, S, Ev)`` with ``H % Hk == 0`` (grouped
            or multi-query heads are shared without copying), or single-head ``(B, S, E)``.
        mask: boolean keep-mask (True = attend) broadcastable to ``(B, H, L, S)``, e.g. ``(B, 1, 1, S)``.
        bias: additive float bias broadcastable to ``(B, H, L, S)``.
        causal: ``"top_left"`` keeps ``j <= i`` (SDPA's ``is_causal``); ``"bottom_right"`` keeps
            ``j <= i + S - L`` (the ``triu(j - i + 1)`` convention, right for KV caches).
        scale: multiplies ``q k^T``; None means ``1 / sqrt(E)``.
        dropout_p: dropout on the probabilities; pass 0 in eval mode.
        fully_masked_rows: output of a query row whose keys are all masked: ``"zero"`` (SDPA's),
            ``"mean"`` (the mean of v, what a finite ``masked_fill`` gives) or ``"nan"`` (a ``-inf`` fill).
        kernels: restrict to these SDPA kernels (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``).
        on_kernel: called with the name of the kernel SDPA picks (used by the audit).
    """
    _check(q, k, v, causal, fully_masked_rows)
    allowed = dispatch.validate_kernels(kernels)
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    B, H, L, _ = q.shape
    S, Hk = k.shape[-2], k.shape[1]
    if H % Hk:
        raise ValueError(f"attend: {H} query heads cannot share {Hk} kv heads evenly")
    if k.shape[0] != B:
        k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
    keep = mask if mask is None or mask.dtype == torch.bool else mask.bool()
    attn_mask, is_causal = sdpa_mask(keep, bias, causal, L, S, q)
    enable_gqa = Hk != H
    if enable_gqa and q.is_cuda and attn_mask is not None:
        # Only flash and cuDNN share kv heads natively, and flash takes no mask: repeat for the others.
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        enable_gqa = False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    order = dispatch.kernel_order(q, k, attn_mask, needs_grad, allowed)
    if on_kernel is not None:
        on_kernel(dispatch.chosen_kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order))
    out = dispatch.run_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order,
                            strict=allowed is not None)
    dead = rows_without_keys(keep, causal, L, S, q.device)
    if dead is not None:
        out = restore_fully_masked_rows(out, v, dead, fully_masked_rows)
    return out


"""The unfused path: attention computed op by op, for calls no fused kernel can run exactly.

Used when a site needs something no kernel offers for this call, e.g. a tanh softcap with
gradients on the CPU (FlexAttention has no CPU backward) or together with dropout. It computes
what the original model did, so the site stays correct, only not faster.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from attnfuse.masking import combined_keep


def index_grid(B: int, H: int, L: int, S: int, device: torch.device) -> tuple:
    """Broadcastable ``(b, h, i, j)`` index tensors over the scores ``(B, H, L, S)``."""
    return tuple(torch.arange(n, device=device).view([-1 if d == axis else 1 for d in range(4)])
                 for axis, n in enumerate((B, H, L, S)))


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], bias_fn: Optional[Callable], causal: Optional[str],
                   window: Optional[int], softcap: Optional[float], scale: float, dropout_p: float) -> torch.Tensor:
    """``softmax(mods(scale * q k^T)) @ v`` written out, in fp32 for half-precision inputs."""
    B, H, L, _ = q.shape
    S = k.shape[-2]
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute)
    if bias_fn is not None:
        scores = scores + bias_fn(index_grid(B, H, L, S, q.device)).to(compute)
    keep = combined_keep(keep, causal, L, S, q.device, window)
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return (probs @ v.to(compute)).to(q.dtype)

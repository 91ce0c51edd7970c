"""The unfused path: attention computed op by op, for calls no fused kernel can run exactly.

Used when a site needs something no kernel offers for this call, e.g. a tanh softcap with
gradients on the CPU (FlexAttention has no CPU backward) or together with dropout. It computes
what the original model did, so the site stays correct, only not faster. It refuses nothing, so it
comes last in the registry.
"""
from __future__ import annotations

from typing import Optional

import torch

from attnfuse.kernels.call import AttentionCall, Inexact, Kernel, index_grid
from attnfuse.masking import combined_keep


def math_attention(call: AttentionCall) -> torch.Tensor:
    """``softmax(mods(scale * q k^T)) @ v`` written out, in fp32 for half-precision inputs."""
    q, k, v = call.q, call.k, call.v
    B, H, L, _ = q.shape
    S = k.shape[-2]
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * call.scale_value
    if call.softcap is not None:
        scores = call.softcap * torch.tanh(scores / call.softcap)
    if call.bias is not None:
        scores = scores + call.bias.to(compute)
    if call.bias_fn is not None:
        scores = scores + call.bias_fn(index_grid(B, H, L, S, q.device)).to(compute)
    keep = combined_keep(call.keep, call.causal, L, S, q.device, call.window)
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1)
    if call.dropout_p:
        probs = torch.nn.functional.dropout(probs, call.dropout_p)
    return (probs @ v.to(compute)).to(q.dtype)


class UnfusedKernel(Kernel):
    """The unfused fallback; the audit names it ``unfused math``, with the reason a fused kernel that
    took the call could not compute it exactly (``Inexact``), if one did."""

    name = "unfused"

    def refuses(self, call: AttentionCall) -> Optional[str]:
        return None

    def run(self, call: AttentionCall) -> torch.Tensor:
        inexact = _last_inexact(call.facts.refusals)
        call.announce("unfused math" if inexact is None else f"unfused math ({inexact})")
        return math_attention(call)


def _last_inexact(refusals: tuple[tuple[str, str], ...]) -> Optional[str]:
    return next((reason for _, reason in reversed(refusals) if isinstance(reason, Inexact)), None)

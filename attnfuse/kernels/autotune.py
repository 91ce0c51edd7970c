"""Autotune (opt-in): time the valid SDPA kernels once per call signature and keep the fastest.

The default order in ``kernels.sdpa.kernel_order`` comes from figures measured on an H100; other GPUs,
head dims or mask shapes can rank kernels differently. With ``optimize(model, autotune=True)`` the
first call of each signature (device, dtype, shapes, mask kind, dropout, gradients) runs each valid
kernel a few times, forward (and backward when gradients are needed), and later calls put the winner first.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnfuse.caches import Cache

_WINNERS: Cache[SDPBackend] = Cache("kernels.autotune.winners", maxsize=1024)
_REPEATS = 5


def _signature(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, needs_grad) -> tuple:
    mask = None if attn_mask is None else (type(attn_mask).__name__, attn_mask.dtype, tuple(attn_mask.shape))
    return (q.device.type, q.device.index, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), mask,
            dropout_p > 0, is_causal, enable_gqa, needs_grad)


def _time(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(_REPEATS):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / _REPEATS


def _trial(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, needs_grad, backend):
    leaves = [t.detach().requires_grad_(needs_grad) for t in (q, k, v)]

    def run():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if needs_grad:
            out.backward(torch.ones_like(out))
    return run


def autotune_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool, needs_grad: bool,
                   order: list[SDPBackend]) -> list[SDPBackend]:
    """``order`` with the measured fastest kernel for this signature first."""
    key = _signature(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, needs_grad)
    winner = _WINNERS.get(key)
    if winner is None:
        timings = {}
        with torch.enable_grad() if needs_grad else torch.no_grad():
            for backend in order:
                trial = _trial(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, needs_grad, backend)
                try:
                    trial()
                    timings[backend] = _time(trial)
                except RuntimeError:
                    continue  # this kernel cannot take the call
        winner = min(timings, key=timings.get) if timings else order[0]
        _WINNERS[key] = winner
    return [winner] + [backend for backend in order if backend != winner]


def winners() -> dict[tuple, SDPBackend]:
    """The cached winners (for tests and the curious)."""
    return dict(_WINNERS.items())

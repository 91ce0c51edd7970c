"""Masks added to a reshaped view of the scores (Bloom: batch * heads folded for ``baddbmm``, a 4-d view for the
mask), and constant biases beside a causal mask.

A causal (or windowed) mask added to a view that regroups only the leading axes is read as causal on the folded
scores too (``patterns.layouts.REGROUPED_FROM``), where it is the site's only mask or bias. Anything that depends
on the batch or head (key padding) stays a bias, and so does the mask beside Bloom's ALiBi: SDPA then needs one
dense bias either way, and reading the causal part measured slower on an H100 (60.0 vs 47.1 ms, Bloom 8L/1024,
2048 x 8, 2026-11-27). Every case equals the unrewritten module forward and backward.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, assert_same_training_steps


class FoldedHeads(nn.Module):
    """Bloom's spelling: ``baddbmm(alibi, q, k^T)`` over ``(B * H, L, S)``, the mask added on ``(B, H, L, S)``.
    ``bias``: ``"alibi"`` (slopes times key positions, a constant), ``"keys"`` (computed from k: not a constant,
    so not provably absorbed by the fill) or ``"none"``; ``padded``: the mask also drops padded keys of batch row 0 (varies with the batch)."""

    def __init__(self, heads: int, bias: str = "none", padded: bool = False, window: int | None = None) -> None:
        super().__init__()
        self.heads, self.bias, self.padded, self.window = heads, bias, padded, window

    def forward(self, q, k, v):
        BH, L, d = q.shape
        S, H = k.shape[1], self.heads
        B = BH // H
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, H + 1))
        if self.bias == "alibi":
            bias = (slopes[:, None, None] * torch.arange(S)).repeat(B, 1, 1)
        elif self.bias == "keys":
            bias = k.sum(-1)[:, None, :] * 0.1
        else:
            bias = None
        qi, kv = torch.arange(L)[:, None] + (S - L), torch.arange(S)[None, :]
        keep = (kv <= qi)[None, None].expand(B, 1, L, S)
        if self.window is not None:
            keep = keep & (kv > qi - self.window)
        if self.padded:
            pad = torch.ones(B, S, dtype=torch.bool)
            pad[0, :2] = False
            keep = keep & pad[:, None, None, :]
        else:  # transformers 5.17 gathers a padding mask of ones it builds when none is given: keeps every key
            keep = keep & torch.ones(B, S).bool()[torch.arange(B)[:, None, None, None], kv[None, None]]
        mask = torch.where(keep, torch.zeros(()), torch.finfo(torch.float32).min)
        scores = torch.bmm(q, k.transpose(1, 2)) * d ** -0.5 if bias is None else \
            bias.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=d ** -0.5)
        scores = scores.view(B, H, L, S) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).view(BH, L, S)
        return torch.bmm(probs, v)


def _qkv(BH: int, L: int, S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(BH, n, 8, generator=g).requires_grad_() for n in (L, S, S))


@settings(max_examples=10)
@given(B=st.integers(1, 3), H=st.integers(1, 4), L=st.integers(2, 9), extra=st.integers(0, 4),
       window=st.one_of(st.none(), st.integers(1, 5)))
def test_causal_mask_on_a_folded_view_is_read(B, H, L, extra, window):
    S = L + extra
    report = assert_fused_equal(FoldedHeads(H, window=window), _qkv(B * H, L, S))
    features = report.sites[0].features
    if L < 3:  # a 2 x 2 band may stay a bias (exact either way)
        return
    assert features["causal"] == ("top_left" if S == L else "bottom_right"), features
    if window is None or window < L:  # a window as wide as the queries is no window
        assert features["window"] == window, features


@pytest.mark.parametrize("bias, padded", [("keys", False), ("alibi", False), ("alibi", True), ("none", True)])
def test_look_alikes_stay_exact(bias, padded):
    """A bias beside the mask, or a mask that varies with the batch row: kept as biases, still exact."""
    report = assert_fused_equal(FoldedHeads(2, bias=bias, padded=padded), _qkv(4, 5, 7))
    assert report.sites[0].features["causal"] is None, report.sites[0].features


def test_bloom_stays_exact():
    """transformers' Bloom (ALiBi beside the mask): logits and every parameter's gradient equal the unrewritten
    model's at two lengths in one process."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    config = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.BloomForCausalLM(config)
    reference.config.use_cache = False
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    assert_same_training_steps(reference, optimized, (12, 9))
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)


@pytest.mark.gpu
def test_bloom_training_memory_is_steady_on_cuda():
    """Repeated training steps of an optimized Bloom keep the same memory between steps, with Python's cycle
    collector off (its GELU's saved tensors once lived until a full collection: ``attnfuse.eager_ops``)."""
    transformers = pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    config = transformers.BloomConfig(vocab_size=32000, hidden_size=1024, n_layer=8, n_head=16,
                                      attn_implementation="eager")
    model = attnfuse.optimize(transformers.BloomForCausalLM(config).to("cuda", torch.bfloat16))
    model.config.use_cache = False
    ids = torch.randint(3, 32000, (8, 2048), device="cuda")
    allocated = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    finally:
        gc.enable()
    assert allocated[-1] <= allocated[1] * 1.05, allocated

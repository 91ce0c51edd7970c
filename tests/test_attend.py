"""``attnfuse.attend`` against a plain reference, on every mask, bias, causal and head-sharing form."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import attnfuse
from helpers import grads


def reference(q, k, v, mask=None, bias=None, causal=None, scale=None, fully_masked_rows="zero"):
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    L, S = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal is not None:
        keep = keep.tril(0 if causal == "top_left" else S - L)
    if mask is not None:
        keep = keep & mask
    fill = -math.inf if fully_masked_rows == "nan" else -torch.finfo(scores.dtype).max
    out = scores.masked_fill(~keep, fill).softmax(-1) @ v
    if fully_masked_rows == "zero":
        out = torch.where(~keep.any(-1, keepdim=True), torch.zeros_like(out), out)
    return out


@st.composite
def attention_case(draw):
    b, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3]))
    L, S, E, Ev = (draw(st.integers(1, 8)) for _ in range(4))
    h = kv_heads * group
    single_head = kv_heads == 1 and draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kv = (b, S) if single_head else (b, kv_heads, S)
    q = torch.randn(b, h, L, E, generator=g)
    k, v = torch.randn(*kv, E, generator=g), torch.randn(*kv, Ev, generator=g)
    mask_shape = draw(st.sampled_from([None, (b, 1, 1, S), (b, h, L, S), (L, S), (1, h, 1, S)]))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) > draw(st.sampled_from([0.3, 0.8, 1.0]))
    bias_shape = draw(st.sampled_from([None, (b, h, L, S), (h, L, S), (1, 1, 1, S)]))
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g)
    return dict(q=q, k=k, v=v, mask=mask, bias=bias, causal=draw(st.sampled_from([None, "top_left", "bottom_right"])),
                scale=draw(st.sampled_from([None, 0.1, 1.0, 2.5])),
                fully_masked_rows=draw(st.sampled_from(["zero", "mean", "nan"])))


@given(case=attention_case())
def test_attend_matches_reference(case):
    leaves = {n: case[n].clone().requires_grad_() for n in ("q", "k", "v")}
    ref_leaves = {n: case[n].clone().requires_grad_() for n in ("q", "k", "v")}
    options = {n: case[n] for n in ("mask", "bias", "causal", "scale", "fully_masked_rows")}
    out = attnfuse.attend(**leaves, **options)
    expected = reference(**ref_leaves, **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, equal_nan=True)
    if case["fully_masked_rows"] != "nan":
        for got, want in zip(grads(out, list(leaves.values())), grads(expected, list(ref_leaves.values()))):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


def test_attend_rejects_bad_shapes_with_a_clear_message():
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match="q must be"):
        attnfuse.attend(q[0], q, q)
    with pytest.raises(ValueError, match="cannot share"):
        attnfuse.attend(q, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="causal must be"):
        attnfuse.attend(q, q, q, causal="yes")
    with pytest.raises(ValueError, match="unknown kernel"):
        attnfuse.attend(q, q, q, kernels=["fastest"])


def test_forced_kernel_that_cannot_run_says_what_to_do():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(RuntimeError, match="forced kernels"):
        attnfuse.attend(q, q, q, kernels=["cudnn"])

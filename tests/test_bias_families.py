"""Issue 14, families 6 and 7: a scale applied after a grouped-query head repeat, and disentangled,
query-dependent biases (DeBERTa's content-to-position and position-to-content terms).

Family 6: ``repeat(k) * s`` scales every score, so a number there joins the scale and the fused call
reads the un-repeated k and v; a tensor there (or a factor on v) is not a scale: the site is still
fused, reading the repeated tensors as they are. Family 7: a bias computed from q or k is passed to
the fused call as a tensor computed by the original ops, so its gradient reaches q, k and the position
tables; outputs and gradients are compared with the unrewritten module.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from einops import repeat
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, grads, leaf_copies


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


gqa_sizes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "g": st.integers(1, 3), "r": st.integers(2, 3), "i": st.integers(1, 9),
    "j": st.integers(1, 9), "d": st.integers(1, 12),
})


def gqa_inputs(s: dict) -> tuple[torch.Tensor, ...]:
    """q ``(b, g * r, i, d)``; k and v ``(b, g, j, d)``, to be repeated ``r`` times per head."""
    return (_randn(s["b"], s["g"] * s["r"], s["i"], s["d"], seed=0), _randn(s["b"], s["g"], s["j"], s["d"], seed=1),
            _randn(s["b"], s["g"], s["j"], s["d"], seed=2))


def _repeat(x: torch.Tensor, r: int, how: str) -> torch.Tensor:
    if how == "einops":
        return repeat(x, "b g n d -> b (g r) n d", r=r)
    if how == "interleave":
        return x.repeat_interleave(r, dim=1)
    b, g, n, d = x.shape  # transformers' repeat_kv
    return x[:, :, None, :, :].expand(b, g, r, n, d).reshape(b, g * r, n, d)


class ScaledAfterRepeat(nn.Module):
    """``k = repeat(k); k = k * s`` (or ``/ s``, or two factors, or the scale on the transposed k)."""

    def __init__(self, r: int, how: str, spelling: str, scale: float = 0.3):
        super().__init__()
        self.r, self.how, self.spelling, self.scale = r, how, spelling, scale

    def forward(self, q, k, v):
        k, v = _repeat(k, self.r, self.how), _repeat(v, self.r, self.how)
        if self.spelling == "mul":
            scores = q @ (k * self.scale).transpose(-1, -2)
        elif self.spelling == "div":
            scores = q @ (k / math.sqrt(k.shape[-1])).transpose(-1, -2)
        elif self.spelling == "two":
            scores = q @ (2.0 * (k / 3.0)).transpose(-1, -2)
        elif self.spelling == "transposed":
            scores = q @ (k.transpose(-1, -2) * self.scale)
        else:  # a constant 0-d tensor, as ``torch.tensor(d) ** -0.5``
            scores = q @ (k * torch.tensor(float(k.shape[-1])) ** -0.5).transpose(-1, -2)
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("how", ["einops", "interleave", "expand"])
@pytest.mark.parametrize("spelling", ["mul", "div", "two", "transposed", "tensor0d"])
@given(s=gqa_sizes)
def test_scale_after_head_repeat_joins_the_scale(how, spelling, s):
    report = assert_fused_equal(ScaledAfterRepeat(s["r"], how, spelling), gqa_inputs(s))
    features = report.sites[0].features
    assert features["kv_heads"] == s["g"] and features["q_heads"] == s["g"] * s["r"], str(report)
    expected = {"mul": 0.3, "div": s["d"] ** -0.5, "two": 2 / 3, "transposed": 0.3, "tensor0d": s["d"] ** -0.5}
    assert abs(features["scale"] - expected[spelling]) < 1e-5, str(report)


class ScaleWithMaskAfterRepeat(nn.Module):
    """The repeat-then-scale of a transformers-style GQA layer, with a causal fill and an additive bias."""

    def forward(self, q, k, v, bias):
        k, v = _repeat(k, q.shape[1] // k.shape[1], "expand"), _repeat(v, q.shape[1] // v.shape[1], "expand")
        k = k * k.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) + bias
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(S - L + 1), float("-inf"))
        return scores.softmax(-1) @ v


@given(s=gqa_sizes)
def test_scale_after_repeat_leaves_the_bias_unscaled(s):
    """The number on k scales the QK product only, not the bias added after it."""
    q, k, v = gqa_inputs(s)
    bias = _randn(s["i"], s["j"], seed=3)
    assert_fused_equal(ScaleWithMaskAfterRepeat(), (q, k, v, bias))


class RunTimeScale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        k, v = _repeat(k, 2, "einops"), _repeat(v, 2, "einops")
        return (q @ (k * self.scale).transpose(-1, -2)).softmax(-1) @ v


def test_run_time_scale_after_repeat_under_dynamic_shapes():
    """Under ``dynamic=True`` the float attribute is a graph input: a run-time factor, still exact."""
    s = {"b": 2, "g": 2, "r": 2, "i": 5, "j": 7, "d": 8}
    for scale in (0.25, 0.7):
        report = assert_fused_equal(RunTimeScale(scale), gqa_inputs(s), dynamic=True)
        assert report.sites[0].features["kv_heads"] == 2, str(report)


# ----------------------------------------------------------------------------- look-alikes, fused as written

class NotAScaleAfterRepeat(nn.Module):
    """What follows the repeat is not a number on k: the repeated tensors are read as they are."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.per_head = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, q, k, v):
        k, v = _repeat(k, 3, "interleave"), _repeat(v, 3, "interleave")
        if self.what == "per_head":
            k = k * self.per_head
        elif self.what == "learned_0d":
            k = k * self.temperature
        elif self.what == "v_scaled":
            v = v * 0.5
        elif self.what == "k_only":
            v = torch.cat([v[:, :1]] * 6, dim=1)
        elif self.what == "zero":
            k = k * 0.0
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


@pytest.mark.parametrize("what", ["per_head", "learned_0d", "v_scaled", "k_only", "zero"])
@given(i=st.integers(1, 7), j=st.integers(1, 7))
def test_a_tensor_or_v_factor_after_repeat_is_not_folded(what, i, j):
    s = {"b": 2, "g": 2, "r": 3, "i": i, "j": j, "d": 4}
    model = NotAScaleAfterRepeat(what).eval()
    report = assert_fused_equal(model, gqa_inputs(s))
    features = report.sites[0].features
    assert features["kv_heads"] == features["q_heads"] == 6, str(report)  # read repeated, as written
    assert features["scale"] == 1.0, str(report)
    if what in ("per_head", "learned_0d"):  # the factor's gradient reaches the parameter
        torch._dynamo.reset()
        reference, optimized = copy.deepcopy(model), attnfuse.optimize(copy.deepcopy(model))
        args = gqa_inputs(s)
        for m in (reference, optimized):
            m(*leaf_copies(args)).square().sum().backward()
        for a, e in zip(optimized.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, e.grad, atol=1e-4, rtol=1e-3)

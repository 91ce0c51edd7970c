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


# ----------------------------------------------------------------------------- family 7: disentangled biases

class Disentangled(nn.Module):
    """DeBERTa's disentangled attention on ``(b, h, n, d)`` tensors: content-to-position
    ``gather(q @ pos_k^T, -1, c2p)`` and position-to-content ``gather(k @ pos_q^T, -1, p2c)^T`` added to
    the scores, then a padding fill with ``finfo.min``. The terms read q and k: a bias, not a score_mod."""

    def __init__(self, heads: int, d: int, span: int = 4, terms: tuple = ("c2p", "p2c"), where: str = "after"):
        super().__init__()
        self.heads, self.d, self.span, self.terms, self.where = heads, d, span, terms, where
        self.rel = nn.Parameter(torch.randn(2 * span, heads * d) * 0.5)
        self.pos_key, self.pos_query = nn.Linear(heads * d, heads * d), nn.Linear(heads * d, heads * d)

    def _table(self, proj: nn.Linear) -> torch.Tensor:
        return proj(self.rel).view(2 * self.span, self.heads, self.d).transpose(0, 1)  # (h, 2 span, d)

    def forward(self, q, k, v, keep):
        factor = 1 + len(self.terms)
        q = q / math.sqrt(self.d * factor)
        L, S = q.shape[-2], k.shape[-2]
        relative = torch.arange(L)[:, None] - torch.arange(S)[None, :]
        bias = 0
        if "c2p" in self.terms:
            index = torch.clamp(relative + self.span, 0, 2 * self.span - 1)
            c2p = q @ self._table(self.pos_key).transpose(-1, -2)
            bias = bias + torch.gather(c2p, -1, index.expand(q.shape[0], self.heads, L, S))
        if "p2c" in self.terms:
            index = torch.clamp(-relative + self.span, 0, 2 * self.span - 1).transpose(0, 1)  # (S, L)
            p2c = k @ (self._table(self.pos_query) / math.sqrt(self.d * factor)).transpose(-1, -2)
            bias = bias + torch.gather(p2c, -1, index.expand(k.shape[0], self.heads, S, L)).transpose(-1, -2)
        if self.where == "before":  # the bias first, the QK product added to it
            scores = bias + q @ k.transpose(-1, -2)
        else:
            scores = q @ k.transpose(-1, -2) + bias
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


def _keep(b: int, j: int, data: st.DataObject) -> torch.Tensor:
    """A ``(b, j)`` key-padding keep-mask; some draws mask every key of a batch row."""
    return torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=j, max_size=j), min_size=b, max_size=b)))


@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
@pytest.mark.parametrize("where", ["after", "before"])
@given(b=st.integers(1, 2), h=st.integers(1, 3), i=st.integers(1, 8), j=st.integers(1, 8), d=st.integers(1, 8),
       data=st.data())
def test_disentangled_bias_fuses_with_gradients_to_q_k_and_the_tables(terms, where, b, h, i, j, d, data):
    torch.manual_seed(0)
    model = Disentangled(h, d, terms=terms, where=where).eval()
    q, k, v = _randn(b, h, i, d, seed=0), _randn(b, h, j, d, seed=1), _randn(b, h, j, d, seed=2)
    keep = _keep(b, j, data)
    report = assert_fused_equal(model, (q, k, v, keep))  # outputs and the gradients of q, k, v
    assert report.sites[0].features["bias"] is not None, str(report)
    torch._dynamo.reset()  # the position tables' and projections' gradients flow through the bias
    reference, optimized = copy.deepcopy(model), attnfuse.optimize(copy.deepcopy(model))
    for m in (reference, optimized):
        out = m(*leaf_copies((q, k, v)), keep)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for (name, a), e in zip(optimized.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, e.grad, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


class BiasFromScores(nn.Module):
    """A look-alike: the 'bias' reads the QK product itself (``s + s.detach().relu()``): not a bias, as the
    product is the scores the fused call computes; must be left alone."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return (scores + scores.detach().relu()).softmax(-1) @ v


def test_a_bias_computed_from_the_scores_themselves_is_skipped():
    q, k, v = _randn(1, 2, 4, 8, seed=0), _randn(1, 2, 5, 8, seed=1), _randn(1, 2, 5, 8, seed=2)
    torch._dynamo.reset()
    model = attnfuse.optimize(BiasFromScores())
    torch.testing.assert_close(model(q, k, v), BiasFromScores()(q, k, v))
    report = attnfuse.report(model)
    assert report.fused == 0 and "attention scores" in report.sites[0].reason, str(report)


def test_einops_repeat_kept_in_the_graph_is_a_head_repeat():
    """torch 2.11 keeps ``einops.repeat`` as one call in the graph (einops marks it allowed there): it is
    read as the head repeat it is, with the scale after it; ``(r g)`` tiles the heads and is not. Here a
    stand-in named like einops' function is allowed in the graph, leaving einops itself as it was."""
    import einops

    def repeat(tensor, pattern, **lengths):
        return einops.repeat(tensor, pattern, **lengths)

    repeat.__module__ = "einops.einops"
    torch._dynamo.allow_in_graph(repeat)

    class KeptRepeat(nn.Module):
        def __init__(self, pattern: str) -> None:
            super().__init__()
            self.pattern = pattern

        def forward(self, q, k, v):
            k, v = (repeat(t, self.pattern, r=3) for t in (k, v))
            return (q @ (k * 0.3).transpose(-1, -2)).softmax(-1) @ v

    s = {"b": 2, "g": 2, "r": 3, "i": 5, "j": 4, "d": 8}
    report = assert_fused_equal(KeptRepeat("b g n d -> b (g r) n d"), gqa_inputs(s))
    assert report.sites[0].features["kv_heads"] == 2 and report.sites[0].features["scale"] == 0.3, str(report)
    report = assert_fused_equal(KeptRepeat("b g n d -> b (r g) n d"), gqa_inputs(s))
    assert report.sites[0].features["kv_heads"] == 6, str(report)

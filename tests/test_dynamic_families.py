"""Issue 14, families 8 and 9: masks whose causal nature survives dynamic shapes, and dropout with a
probability Dynamo made dynamic.

Family 8: under ``dynamic=True`` (or after a second sequence length) sizes are symbolic, so a mask can no
longer be evaluated; ``new_ones(L, S).tril()``, an additive ``full((L, S), -inf).triu(1)`` and a symbolic
slice of nanoGPT's registered ``tril`` buffer (guarded per call) must still be read as causal. Family 9:
with a run-time ``p`` an eval-mode dropout is a no-op and a train-mode one passes ``p`` to the fused call,
read on each call (on the CPU the kernel draws the same dropout mask as the original under one seed).
Every model runs several sizes through one compiled graph; each call is compared with the original,
forward and backward.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings, strategies as st
from torch import nn

import attnfuse
from helpers import grads, leaf_copies


def _qkv(b: int, h: int, i: int, j: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, i, d, generator=g).requires_grad_(), torch.randn(b, h, j, d, generator=g).requires_grad_(),
            torch.randn(b, h, j, d, generator=g).requires_grad_())


def _compare(optimized: nn.Module, reference: nn.Module, args: tuple, seed: int = 0) -> None:
    a_args, e_args = leaf_copies(args), leaf_copies(args)
    torch.manual_seed(seed)
    actual = optimized(*a_args)
    torch.manual_seed(seed)
    expected = reference(*e_args)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4, equal_nan=True)
    if not expected.isnan().any():
        for a, e in zip(grads(actual, list(a_args)), grads(expected, list(e_args))):
            torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)


def run_sizes(module: nn.Module, sizes: list, dynamic: bool = True, square: bool = False) -> attnfuse.FusionReport:
    """Optimize a copy of ``module`` and compare it with the original on every ``(i, j)`` of ``sizes``.
    The report's ``seen`` lists the features of the site after each call (a recompile replaces its row)."""
    torch._dynamo.reset()
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(copy.deepcopy(module), dynamic=dynamic)
    seen = []
    for n, (i, j) in enumerate(sizes):
        _compare(optimized, reference, _qkv(2, 3, i, i if square else j, 8, seed=n), seed=n)
        report = attnfuse.report(optimized)
        assert report.fused == len(report.sites) == 1, str(report)
        seen.append(dict(report.sites[0].features))
    report.seen = seen
    return report


size_lists = st.lists(st.tuples(st.integers(1, 11), st.integers(1, 11)), min_size=2, max_size=4)
# each example compiles a static and a symbolic graph: few examples, and no shrinking (minutes a step)
few = settings(max_examples=5, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def assert_read_as(report: attnfuse.FusionReport, sizes: list, **expected: object) -> None:
    """No materialized mask or bias and ``expected`` features on every call where Dynamo did not specialize a
    length to 1 (there a triangle is a mask of one row or one column, and is read as such)."""
    general = [f for f in report.seen if 1 not in (f["q_len"], f["k_len"])]
    assert general or all(1 in size for size in sizes), str(report)
    for features in general:
        assert features["mask"] is None and features["bias"] is None, (features, str(report))
        for key, value in expected.items():
            if value == "bottom_right" and features["q_len"] == features["k_len"]:
                value = "top_left"  # one corner when the lengths are the same symbol
            assert features[key] == value, (key, features, str(report))


# ----------------------------------------------------------------------------- family 8: causal at any size

class TrilOfOnes(nn.Module):
    """``new_ones(L, S).tril(d)`` and friends, used as a keep-mask."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        if self.spelling == "new_ones":
            keep = q.new_ones(L, S, dtype=torch.bool).tril()
        elif self.spelling == "torch_tril":
            keep = torch.tril(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=0)
        elif self.spelling == "bottom_right":
            keep = q.new_ones(L, S, dtype=torch.bool).tril(S - L)
        elif self.spelling == "drop_triu":  # the fill goes where triu(1) is True
            scores = (q @ k.transpose(-2, -1)).masked_fill(q.new_ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
            return scores.softmax(-1) @ v
        else:  # a window from two triangles: keys i - 2 .. i
            ones = q.new_ones(L, S, dtype=torch.bool)
            keep = ones.tril() & ~ones.tril(-3)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("spelling, causal, window", [
    ("new_ones", "top_left", None), ("torch_tril", "top_left", None), ("bottom_right", "bottom_right", None),
    ("drop_triu", "top_left", None), ("window", "top_left", 3),
])
@few
@given(sizes=size_lists)
def test_triangle_of_ones_is_causal_at_any_size(spelling, causal, window, sizes):
    assert_read_as(run_sizes(TrilOfOnes(spelling), sizes), sizes, causal=causal, window=window)


class AdditiveTriangle(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        if self.spelling == "triu":
            bias = torch.full((L, S), float("-inf")).triu(1)
        elif self.spelling == "torch_triu_min":
            bias = torch.triu(torch.full((L, S), torch.finfo(q.dtype).min, device=q.device), diagonal=1)
        else:  # bottom-right
            bias = q.new_full((L, S), float("-inf")).triu(S - L + 1)
        return ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v


@pytest.mark.parametrize("spelling, causal", [
    ("triu", "top_left"), ("torch_triu_min", "top_left"), ("bottom_right", "bottom_right"),
])
@few
@given(sizes=size_lists)
def test_additive_triangle_is_causal_at_any_size(spelling, causal, sizes):
    assert_read_as(run_sizes(AdditiveTriangle(spelling), sizes), sizes, causal=causal)


class NanoGPT(nn.Module):
    """nanoGPT's registered ``tril`` buffer, sliced to the sequence length (or to a KV-cache window)."""

    def __init__(self, spelling: str = "nano", block: int = 16):
        super().__init__()
        self.spelling = spelling
        triangle = torch.tril(torch.ones(block, block))
        if spelling == "anti":  # keys after the query instead: not causal
            triangle = torch.triu(torch.ones(block, block))
        self.register_buffer("bias", triangle.view(1, 1, block, block))

    def forward(self, q, k, v):
        L, S = q.size(-2), k.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.spelling == "gpt2":  # transformers' GPT-2 of old: rows S - L .. S
            keep = self.bias[:, :, S - L:S, :S].bool()
            att = torch.where(keep, att, torch.tensor(torch.finfo(att.dtype).min))
        elif self.spelling == "shifted":  # rows 1 .. L: keeps one key more than causal
            att = att.masked_fill(self.bias[:, :, 1:L + 1, :S] == 0, float("-inf"))
        elif self.spelling == "flipped":  # not elementwise: the columns reversed
            att = att.masked_fill(self.bias[:, :, :L, :S].flip(-1) == 0, float("-inf"))
        else:
            att = att.masked_fill(self.bias[:, :, :L, :S] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("spelling, causal", [("nano", "top_left"), ("gpt2", "bottom_right")])
@few
@given(sizes=st.lists(st.tuples(st.integers(1, 15), st.integers(1, 15)), min_size=2, max_size=4))
def test_sliced_tril_buffer_stays_causal_under_dynamic_shapes(spelling, causal, sizes):
    sizes = [(min(i, j), j) for i, j in sizes] if spelling == "gpt2" else [(i, i) for i, _ in sizes]
    assert_read_as(run_sizes(NanoGPT(spelling), sizes), sizes, causal=causal, causal_guarded_by_buffer=True)


def test_sliced_buffer_after_a_second_length_and_a_write_behind_the_guard():
    """Automatic dynamic shapes (a second length recompiles with symbolic sizes), then a write through
    ``.data`` that the version counter does not see: the guard reads the buffer on each call."""
    torch._dynamo.reset()
    model, reference = NanoGPT(), NanoGPT()
    attnfuse.optimize(model)
    for T in (5, 7, 9):
        _compare(model, reference, _qkv(2, 3, T, T, 8, seed=T))
    report = attnfuse.report(model)
    assert all(s.features["causal"] == "top_left" for s in report.sites), str(report)
    assert any(s.features["q_len"] != 5 for s in report.sites), str(report)  # the symbolic graph ran
    for buffer in (model.bias, reference.bias):
        buffer.data[..., 3, 1] = 0.0
    for T in (5, 9):
        _compare(model, reference, _qkv(2, 3, T, T, 8, seed=T))
    for buffer in (model.bias, reference.bias):
        buffer.data[..., 3, 1] = 1.0
    _compare(model, reference, _qkv(2, 3, 6, 6, 8))


@pytest.mark.parametrize("spelling", ["anti", "shifted", "flipped"])
def test_buffer_slices_that_are_not_causal_stay_masks(spelling):
    report = run_sizes(NanoGPT(spelling), [(4, 4), (7, 7), (9, 9)], square=True)
    assert report.fused == 1 and report.sites[0].features["causal"] is None, str(report)


class NotCausalTriangles(nn.Module):
    """Triangles that are not the causal one: above the diagonal, shifted, or a fill that does not mask."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(-2, -1)
        if self.spelling == "tril_plus_one":
            scores = scores.masked_fill(~q.new_ones(L, S, dtype=torch.bool).tril(1), float("-inf"))
        elif self.spelling == "additive_lower":
            scores = scores + torch.full((L, S), float("-inf")).tril(-1)
        elif self.spelling == "small_fill":
            scores = scores + torch.full((L, S), -1.0).triu(1)
        else:  # a triangle of a broadcast row: a key mask, not causal
            scores = scores.masked_fill(~q.new_ones(1, S, dtype=torch.bool).tril(2), float("-inf"))
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("spelling", ["tril_plus_one", "additive_lower", "small_fill", "row"])
def test_triangles_that_are_not_causal_are_not_read_as_causal(spelling):
    report = run_sizes(NotCausalTriangles(spelling), [(5, 5), (8, 8), (3, 3)], square=True)
    assert report.fused == 1 and report.sites[0].features["causal"] is None, str(report)


# ----------------------------------------------------------------------------- family 9: run-time dropout p

class ViTAttention(nn.Module):
    """timm's ``Attention``: ``attn_drop`` as ``nn.Dropout`` (or ``F.dropout`` with the module's flag)."""

    def __init__(self, p: float = 0.1, functional: bool = False):
        super().__init__()
        self.functional, self.p = functional, p
        self.attn_drop = nn.Dropout(p)

    def forward(self, q, k, v):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, self.p, self.training) if self.functional else self.attn_drop(attn)
        return attn @ v


@pytest.mark.parametrize("functional", [False, True])
@few
@given(sizes=size_lists, p=st.sampled_from([0.0, 0.1, 0.5]))
def test_eval_dropout_with_a_run_time_p_is_a_no_op(functional, p, sizes):
    report = run_sizes(ViTAttention(p, functional).eval(), sizes)
    assert report.fused == 1 and report.sites[0].features["dropout"] == 0.0, str(report)


def test_a_second_instance_with_another_p_fuses_too():
    """Without ``dynamic=True`` the second p makes Dynamo recompile with p as a graph input."""
    torch._dynamo.reset()
    for p in (0.1, 0.2, 0.3):
        model, reference = ViTAttention(p).eval(), ViTAttention(p).eval()
        attnfuse.optimize(model)
        _compare(model, reference, _qkv(2, 3, 5, 6, 8))
        assert attnfuse.report(model).fused == 1, str(attnfuse.report(model))


@pytest.mark.parametrize("p", [0.0, 0.2, 0.6, 1.0])
def test_train_dropout_under_dynamic_shapes_draws_the_original_mask(p):
    """``optimize`` specializes Python floats, so p stays a number under ``dynamic=True``; on the CPU under
    one seed the fused call equals the original."""
    report = run_sizes(ViTAttention(p).train(), [(5, 7), (9, 4), (6, 6)])
    assert report.fused == 1 and report.sites[0].features["dropout"] == p, str(report)


@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_train_dropout_with_a_run_time_p_draws_the_original_mask(p):
    """Through ``torch.compile(backend=...)`` Dynamo may make p a run-time input (a SymFloat): the fused call
    reads it on each call; on the CPU under one seed it equals the original."""
    from attnfuse.capture import backend_for
    from attnfuse.options import Options

    torch._dynamo.reset()
    module, reference = ViTAttention(p).train(), ViTAttention(p).train()
    seen = {}
    backend = backend_for(Options())

    def spy(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        seen["sites"] = compiled.sites.sites
        return compiled

    compiled = torch.compile(module, backend=spy, dynamic=True)
    for n, (i, j) in enumerate([(5, 7), (9, 4)]):
        _compare(compiled, reference, _qkv(2, 3, i, j, 8, seed=n), seed=n)
    features = seen["sites"][0].features
    assert seen["sites"][0].status == "fused" and features["dropout"] == "run-time p", features


def test_train_dropout_p_out_of_range_raises_like_the_original():
    torch._dynamo.reset()
    model, reference = ViTAttention(0.1).train(), ViTAttention(0.1).train()
    attnfuse.optimize(model, dynamic=True)
    _compare(model, reference, _qkv(1, 2, 4, 4, 8))
    model.attn_drop.p = reference.attn_drop.p = 1.5
    with pytest.raises(ValueError, match="between 0 and 1"):
        reference(*_qkv(1, 2, 4, 4, 8))
    with pytest.raises(Exception, match="between 0 and 1"):  # Dynamo's own check, or the fused call's
        model(*_qkv(1, 2, 4, 4, 8))


class TwoDropouts(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return F.dropout(F.dropout(attn, self.p, self.training), self.p, self.training) @ v


class DropoutOnScores(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        return F.dropout(q @ k.transpose(-2, -1), self.p, self.training).softmax(-1) @ v


@pytest.mark.parametrize("module, reason", [
    (TwoDropouts, "two active dropouts"), (DropoutOnScores, "`dropout` between the QK product and the softmax"),
])
def test_dropouts_the_fused_call_cannot_apply_are_skipped_with_the_op(module, reason):
    torch._dynamo.reset()
    model = attnfuse.optimize(module(0.3).train(), dynamic=True)
    model(*_qkv(1, 2, 4, 4, 8))
    report = attnfuse.report(model)
    assert report.fused == 0 and reason in report.sites[0].reason, str(report)
    if module is TwoDropouts:  # in eval both are no-ops: fused
        assert run_sizes(module(0.3).eval(), [(4, 5), (6, 3)]).fused == 1


class FloatAttributes(nn.Module):
    """A scale, a softcap and a fill kept as float attributes (Gemma 2, Bloom's ``inv_norm_factor``)."""

    def __init__(self, scale: float, cap: float, fill: float) -> None:
        super().__init__()
        self.scale, self.cap, self.fill = scale, cap, fill

    def forward(self, q, k, v):
        s = torch.tanh(q @ k.transpose(-1, -2) * self.scale / self.cap) * self.cap
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), self.fill)
        return s.softmax(-1) @ v


def test_float_attributes_stay_numbers_under_dynamic_shapes():
    """Unspecialized, Dynamo would pass the floats as run-time inputs and the softcap could not be read."""
    report = run_sizes(FloatAttributes(0.3, 20.0, float("-inf")), [(5, 5), (7, 7), (4, 4)], square=True)
    features = report.sites[0].features
    assert features["softcap"] == 20.0 and features["causal"] == "top_left", features

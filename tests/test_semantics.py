"""Programs written against the promise: in-place construction, fills of every magnitude combined by
replace and by add, score magnitudes, position masks in every dtype. Each drawn program must give the
original's outputs and gradients, fused or skipped, and never crash (issue 13, families 1, 2 and 6)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import grads, run_both

FILLS = {"-inf": float("-inf"), "min": torch.finfo(torch.float32).min, "-1e9": -1e9, "-1e4": -1e4}


@dataclass(frozen=True)
class Program:
    L: int
    S: int
    build: str  # how the causal keep-mask is built
    combine: str  # "replace" (masked_fill) or "add" (an additive 0 / fill bias)
    fill: str
    magnitude: float  # multiplies the scores: large values make a finite fill stop masking
    padding: bool  # a key-padding mask too, written in place
    scores_inplace: bool  # the fill written into the scores with masked_fill_


def _causal_keep(p: Program) -> torch.Tensor:
    """A bottom-right causal keep-mask of shape (L, S), built the way ``p.build`` says."""
    L, S = p.L, p.S
    if p.build == "tril_":
        m = torch.ones(L, S, dtype=torch.bool)
        m.tril_(S - L)
        return m
    if p.build == "setitem":
        m = torch.zeros(L, S, dtype=torch.bool)
        m[:, :] = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        return m
    if p.build == "arange_end":
        i = torch.arange(end=L)[:, None] + (S - L)
        return torch.arange(end=S)[None, :] <= i
    if p.build == "arange_uint8":  # wraps above 255: not a causal triangle for long sequences
        i = torch.arange(L).to(torch.uint8)[:, None].long() + (S - L)
        return torch.arange(S).to(torch.uint8)[None, :].long() <= i
    return torch.ones(L, S, dtype=torch.bool).tril(S - L)


class Drawn(nn.Module):
    def __init__(self, p: Program):
        super().__init__()
        self.p = p

    def forward(self, q, k, v, pad):
        p = self.p
        keep = _causal_keep(p)
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 * p.magnitude)
        fill = FILLS[p.fill]
        if p.padding:
            s = s.masked_fill(~pad[:, None, None, :], fill)
        if p.combine == "add":
            bias = torch.zeros(p.L, p.S)
            bias[~keep] = fill
            return (s + bias).softmax(-1) @ v
        if p.scores_inplace:
            s.masked_fill_(~keep, fill)
            return s.softmax(-1) @ v
        return s.masked_fill(~keep, fill).softmax(-1) @ v


@st.composite
def programs(draw):
    L, S = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    combine = draw(st.sampled_from(["replace", "add"]))
    fill = draw(st.sampled_from(list(FILLS)))
    if combine == "add" and fill == "-inf":
        fill = "min"
    return Program(L=L, S=S, build=draw(st.sampled_from(["tril", "tril_", "setitem", "arange_end", "arange_uint8"])),
                   combine=combine, fill=fill, magnitude=draw(st.sampled_from([1.0, 1e3, 1e5])),
                   padding=draw(st.booleans()) and combine == "replace", scores_inplace=draw(st.booleans()))


def _same_as_original(module: nn.Module, args: tuple, grad_scale: float = 1.0) -> attnfuse.FusionReport:
    """Optimize ``module``; outputs and q/k/v gradients must be the original's (gradients scale with the
    scores' magnitude, so their tolerance does too)."""
    torch._dynamo.reset()
    expected, actual, report, ref_args, opt_args = run_both(module, args)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, equal_nan=True, msg=lambda m: f"{m}\n{report}")
    if not expected.isnan().any() and all(a.requires_grad for a in args[:3]):
        for e, a in zip(grads(expected, ref_args[:3]), grads(actual, opt_args[:3])):
            torch.testing.assert_close(a, e, atol=1e-4 * grad_scale, rtol=1e-3, msg=lambda m: f"gradient: {m}\n{report}")
    return report


@given(programs(), st.integers(0, 2 ** 16))
def test_drawn_programs_keep_the_original_answer(program, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, program.L, 4, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, program.S, 4, generator=g, requires_grad=True) for _ in range(2))
    pad = torch.rand(2, program.S, generator=g) > 0.4
    pad[:, 0] = True
    _same_as_original(Drawn(program), (q, k, v, pad), grad_scale=program.magnitude)


def test_inplace_tril_is_read_as_causal():
    p = Program(L=5, S=5, build="tril_", combine="replace", fill="-inf", magnitude=1.0, padding=False,
                scores_inplace=True)
    args = tuple(torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3)) + (torch.ones(1, 5, dtype=torch.bool),)
    report = _same_as_original(Drawn(p), args)
    assert report.fused == 1 and report.sites[0].features["causal"] == "top_left", str(report)


def test_a_write_to_k_between_the_products_is_not_fused():
    class CacheWrite(nn.Module):
        def forward(self, q, kcache, v, new):
            p = (q @ kcache.transpose(-1, -2)).softmax(-1)
            kcache[:, :, 0] = new  # after the scores were computed from the old keys
            return p @ v

    args = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 4))
    torch._dynamo.reset()
    expected = CacheWrite()(*[a.clone() for a in args])
    optimized = attnfuse.optimize(CacheWrite())
    torch.testing.assert_close(optimized(*[a.clone() for a in args]), expected)
    report = attnfuse.report(optimized)
    assert report.fused == 0 and "written in place" in report.sites[0].reason, str(report)


def test_a_fill_that_stops_masking_runs_the_original_ops():
    p = Program(L=4, S=4, build="tril", combine="replace", fill="-1e4", magnitude=1e5, padding=False,
                scores_inplace=False)
    args = tuple(torch.randn(1, 2, 4, 4, requires_grad=True) for _ in range(3)) + (torch.ones(1, 4, dtype=torch.bool),)
    report = _same_as_original(Drawn(p), args, grad_scale=p.magnitude)
    assert report.fused == 1 and "original ops" in report.sites[0].backend, str(report)


def test_many_programs_in_one_process():
    """A sweep as a notebook runs it: one Dynamo cache for every program, shape and call."""
    for n, build in enumerate(["tril", "tril_", "setitem", "arange_end"] * 3):
        L, S = 3 + n % 3, 5
        p = Program(L=L, S=S, build=build, combine="replace", fill="-1e9", magnitude=1.0, padding=True,
                    scores_inplace=n % 2 == 0)
        module = Drawn(p)
        optimized = attnfuse.optimize(copy.deepcopy(module))
        for _ in range(2):
            q, k, v = torch.randn(2, 2, L, 4), torch.randn(2, 2, S, 4), torch.randn(2, 2, S, 4)
            pad = torch.rand(2, S) > 0.3
            torch.testing.assert_close(optimized(q, k, v, pad), module(q, k, v, pad), equal_nan=True)


class PositionMask(nn.Module):
    """A keep-mask from position comparisons; ``spelling`` picks one that is easy to misread."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
        if self.spelling == "bool_positions":  # positions as bool are 0/1, not indices
            keep = j.bool() <= i.bool()
        elif self.spelling == "fp16_positions":  # fp16 rounds positions above 2048
            keep = j.half() <= i.half()
        elif self.spelling == "expanded_single":  # every query at position 0
            keep = j <= torch.arange(1).expand(L)[:, None]
        elif self.spelling == "float_window":
            keep = (j <= i) & (j > i - 2.5)
        elif self.spelling == "empty_window":
            keep = (j <= i) & (j > i)
        else:
            keep = j <= i
        s = (q @ k.transpose(-1, -2)) * 0.5
        return s.masked_fill(~keep, -1e9).softmax(-1) @ v


@given(st.sampled_from(["plain", "bool_positions", "fp16_positions", "expanded_single", "float_window",
                        "empty_window"]), st.integers(1, 9), st.integers(1, 9))
def test_position_masks_are_read_for_what_they_compute(spelling, L, S):
    args = (torch.randn(1, 2, L, 4, requires_grad=True), torch.randn(1, 2, S, 4, requires_grad=True),
            torch.randn(1, 2, S, 4, requires_grad=True))
    _same_as_original(PositionMask(spelling), args)


class SummedMasks(nn.Module):
    """Boolean and int8 tensors added to the scores are numbers (0/1, or values that overflow int8)."""

    def forward(self, q, k, v, m1, m2):
        s = q @ k.transpose(-1, -2)
        return (s + m1 + m2).softmax(-1) @ v


def test_boolean_and_int8_biases_add_as_numbers():
    L, S = 4, 6
    args = (torch.randn(1, 2, L, 4), torch.randn(1, 2, S, 4), torch.randn(1, 2, S, 4))
    both = torch.rand(L, S) > 0.5
    _same_as_original(SummedMasks(), args + (both, both))
    big = torch.full((L, S), 100, dtype=torch.int8)
    _same_as_original(SummedMasks(), args + (big * both, big))


class InPlaceWiderAdd(nn.Module):
    """``s += bias`` with an fp32 bias on bf16 scores computes in fp32 and rounds into bf16."""

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-1, -2)
        s += bias
        s.mul_(0.5)
        return s.softmax(-1) @ v


def test_inplace_add_of_a_wider_bias_keeps_the_scores_dtype():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    bias = torch.randn(9, 9, generator=g) * 3
    truth = InPlaceWiderAdd()(q.double(), k.double(), v.double(), bias.double())
    low = [t.bfloat16() for t in (q, k, v)]
    torch._dynamo.reset()
    optimized = attnfuse.optimize(InPlaceWiderAdd())
    fused, original = optimized(*low, bias), InPlaceWiderAdd()(*low, bias)
    assert attnfuse.report(optimized).fused == 1, str(attnfuse.report(optimized))
    assert fused.dtype == original.dtype == torch.bfloat16
    assert (fused.double() - truth).abs().max() <= 1.25 * (original.double() - truth).abs().max() + 1e-2


class WindowUnderDynamicShapes(nn.Module):
    """An additive sliding-window causal mask built with ``&``: under dynamic shapes ``q_len <= k_len``
    is checked per call, so the site keeps its own ops beside the fused call (``&`` writes nothing)."""

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        q_pos, k_pos = torch.arange(j - i, j)[:, None], torch.arange(j)[None, :]
        keep = (k_pos <= q_pos) & (k_pos > q_pos - 3)
        s = q @ k.transpose(-1, -2) * 0.3 + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        return s.softmax(-1) @ v


def test_windowed_additive_mask_fuses_under_dynamic_shapes():
    torch._dynamo.reset()
    optimized = attnfuse.optimize(WindowUnderDynamicShapes(), dynamic=True)
    for L, S in ((6, 9), (7, 11), (9, 4)):  # the last: rows without keys, run by the site's own ops
        q, k, v = torch.randn(1, 2, L, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
        torch.testing.assert_close(optimized(q, k, v), WindowUnderDynamicShapes()(q, k, v), equal_nan=True)
    report = attnfuse.report(optimized)
    assert report.fused == 1 and str(report.sites[0].features["window"]) == "3", str(report)

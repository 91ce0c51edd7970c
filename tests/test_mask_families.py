"""Issue 14, families 2, 3, 5 and 10: masks written as in-place slice writes, as products with a 0/1
mask, as a clamp at ``finfo.min``, as a bias added after a finite fill, and as a zeroing of the weights
after the softmax. Each spelling must fuse with the original's outputs and input gradients (fp32, CPU),
rows without keys included; each look-alike that would change the math must be skipped with a reason
that names what was seen."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, grads, run_both

FMIN = torch.finfo(torch.float32).min


def qkv(b: int = 2, h: int = 2, L: int = 5, S: int = 5, d: int = 8, seed: int = 0, grad: bool = True) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).requires_grad_(grad) for n in (L, S, S))


def padding(b: int, S: int, pads: list[int], left: bool = False) -> torch.Tensor:
    """A ``(b, S)`` keep-mask with ``pads[i]`` padded keys in batch row ``i`` (at the end, or the start)."""
    keep = torch.ones(b, S, dtype=torch.bool)
    for i, n in enumerate(pads[:b]):
        if n:
            keep[i, :n] = False if left else keep[i, :n]
            keep[i, S - n:] = keep[i, S - n:] if left else False
    return keep


def assert_skipped(module: nn.Module, args: tuple, *words: str) -> attnfuse.FusionReport:
    """One site, skipped with a reason naming ``words``; outputs and gradients are the original's."""
    torch._dynamo.reset()
    expected, actual, report, ref_args, opt_args = run_both(module, args)
    assert report.fused == 0 and report.skipped == 1, str(report)
    reason = report.sites[0].reason or ""
    assert all(w in reason for w in words), reason
    torch.testing.assert_close(actual, expected, equal_nan=True)
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for e, a in zip(grads(expected, [ref_args[i] for i in differentiable]),
                    grads(actual, [opt_args[i] for i in differentiable])):
        torch.testing.assert_close(a, e, equal_nan=True)
    return report


# ----------------------------------------------------------------------------- family 3: products with 0/1 masks

class GPTProductMask(nn.Module):
    """The original GPT: ``w * b + -1e4 * (1 - b)`` with ``b`` a float ``tril`` built in the graph."""

    def __init__(self, spelling: str = "gpt"):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        w = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        b = torch.tril(torch.ones(L, S)).view(1, 1, L, S)
        if self.spelling == "gpt":
            w = w * b + -1e4 * (1 - b)
        elif self.spelling == "swapped":
            w = b * w - 1e9 * (1.0 - b)
        elif self.spelling == "minus_one":
            w = w * b + (b - 1) * 1e4
        elif self.spelling == "masked_fill":
            w = (w * b).masked_fill(b == 0, FMIN)
        return torch.softmax(w, -1) @ v


@pytest.mark.parametrize("spelling", ["gpt", "swapped", "minus_one", "masked_fill"])
@given(L=st.integers(1, 9), extra=st.integers(0, 3))
def test_a_constant_product_mask_is_the_causal_flag(spelling, L, extra):
    report = assert_fused_equal(GPTProductMask(spelling), qkv(L=L, S=L + extra))
    assert report.sites[0].features["causal"] == ("top_left" if L > 1 or extra else None), report


class BufferProductMask(nn.Module):
    """OpenAI GPT: the float ``tril`` is a registered buffer, sliced to the sizes of the call."""

    def __init__(self, n: int = 16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, q, k, v, additive=None):
        w = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        b = self.bias[:, :, : w.size(-2), : w.size(-1)]
        w = w * b + -1e4 * (1 - b)
        if additive is not None:
            w = w + additive
        return nn.functional.softmax(w, dim=-1) @ v


@given(L=st.integers(1, 9), pad=st.integers(0, 4))
def test_a_buffer_product_mask_fuses_with_a_padding_bias_after_it(L, pad):
    keep = padding(2, L, [0, min(pad, L)])
    additive = torch.where(keep, 0.0, FMIN)[:, None, None, :]
    assert_fused_equal(BufferProductMask(), (*qkv(L=L, S=L), additive))


def test_a_buffer_product_mask_that_stops_being_0_1_runs_the_original_ops():
    module = BufferProductMask()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    q, k, v = qkv(L=6, S=6, grad=False)
    torch.testing.assert_close(optimized(q, k, v), module(q, k, v))
    for m in (module, optimized):
        m.bias.mul_(0.5)  # now 0 / 0.5: s * 0.5 - 5000 is no mask
    torch.testing.assert_close(optimized(q, k, v), module(q, k, v))  # a causal kernel would differ


class InputProductMask(nn.Module):
    """A float 0/1 mask passed in by the caller, completed by ``+ c * (1 - m)``."""

    def forward(self, q, k, v, m):
        w = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        w = w * m + -1e9 * (1 - m)
        return w.softmax(-1) @ v


@given(S=st.integers(1, 8), pads=st.lists(st.integers(0, 8), min_size=2, max_size=2), L=st.integers(1, 6))
def test_an_input_product_mask_is_checked_on_each_call(S, pads, L):
    """Rows without keys (a whole batch row padded) are uniform in the original: the mean of v."""
    m = padding(2, S, [min(p, S) for p in pads]).float()[:, None, None, :]
    assert_fused_equal(InputProductMask(), (*qkv(L=L, S=S), m))


def test_a_product_mask_over_an_infinite_score_gives_the_original_nan():
    q, k, v = qkv(L=4, S=4, grad=False)
    q[0, 0, 1, 0] = math.inf  # inf * 0 is NaN in the original: the fused call must not hide it
    m = torch.tensor([1.0, 1.0, 0.0, 1.0])[None, None, None, :].expand(2, 1, 1, 4)
    expected, actual, report, _, _ = run_both(InputProductMask(), (q, k, v, m))
    assert report.fused == 1
    torch.testing.assert_close(actual, expected, equal_nan=True)


class ProductMaskLookalike(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, m, m2):
        w = q @ k.transpose(-1, -2)
        if self.kind == "alone":
            w = w * m
        elif self.kind == "other_mask":
            w = w * m + -1e4 * (1 - m2)
        elif self.kind == "infinite":
            w = w * m + float("-inf") * (1 - m)
        elif self.kind == "weak_fill":
            w = w * m + -10.0 * (1 - m)
        elif self.kind == "fill_elsewhere":
            w = (w * m).masked_fill(m2 == 0, -1e9)
        return w.softmax(-1) @ v


@pytest.mark.parametrize("kind,words", [
    ("alone", ["0/1 mask", "c * (1 - m)"]),
    ("other_mask", ["0/1 mask", "c * (1 - m)"]),
    ("infinite", ["infinite c"]),
    ("weak_fill", ["-10", "does not act as a mask"]),
    ("fill_elsewhere", ["0/1 mask"]),
])
def test_product_mask_lookalikes_are_skipped(kind, words):
    m = padding(2, 5, [0, 2]).float()[:, None, None, :]
    m2 = padding(2, 5, [1, 0]).float()[:, None, None, :]
    assert_skipped(ProductMaskLookalike(kind), (*qkv(), m, m2), *words)


def test_a_scale_that_varies_along_keys_is_still_no_mask():
    class Temperature(nn.Module):
        def forward(self, q, k, v, t):
            return ((q @ k.transpose(-1, -2)) * t).softmax(-1) @ v

    assert_skipped(Temperature(), (*qkv(), torch.rand(5) + 0.5), "0/1 mask")


# ----------------------------------------------------------------------------- family 3: clamps at finfo.min

class ClampedScores(nn.Module):
    """XGLM (on 4-d scores): an additive 0 / finfo.min mask, then ``torch.max(w, finfo.min)``."""

    def __init__(self, spelling: str = "max", fill: bool = False):
        super().__init__()
        self.spelling, self.fill = spelling, fill

    def forward(self, q, k, v, mask, keep):
        w = q @ k.transpose(-1, -2)
        if self.fill:
            w = w.masked_fill(~keep[:, None, None, :], float("-inf"))
        w = w + mask
        low = torch.finfo(w.dtype).min
        if self.spelling == "max":
            w = torch.max(w, torch.tensor(low))
        elif self.spelling == "maximum":
            w = torch.maximum(torch.full((), low), w)
        else:
            w = w.clamp(min=low)
        return w.softmax(-1) @ v


@pytest.mark.parametrize("spelling", ["max", "maximum", "clamp"])
@pytest.mark.parametrize("fill", [False, True])
@given(S=st.integers(1, 8), pads=st.lists(st.integers(0, 8), min_size=2, max_size=2), left=st.booleans())
def test_a_clamp_at_finfo_min_fuses(spelling, fill, S, pads, left):
    """The causal mask plus padding, summed as in older transformers (fmin + fmin is -inf, which the clamp
    makes finite): rows with no live key run the original ops, the others the fused kernel."""
    L = S
    keep = padding(2, S, [min(p, S) for p in pads], left=left)
    causal = torch.ones(L, S, dtype=torch.bool).tril()
    mask = torch.where(causal, 0.0, FMIN) + torch.where(keep, 0.0, FMIN)[:, None, None, :]
    assert_fused_equal(ClampedScores(spelling, fill), (*qkv(L=L, S=S), mask, keep))


def test_a_clamp_above_finfo_min_is_skipped():
    class Clamp(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-1, -2)).clamp(min=-1e4).softmax(-1) @ v

    assert_skipped(Clamp(), qkv(), "clamped from below at -10000")


# ----------------------------------------------------------------------------- family 5: a bias after a finite fill

class FillThenBias(nn.Module):
    """GPT-Neo: ``where(causal, s, finfo.min)`` then ``+ attention_mask`` (causal and padding, 0 / finfo.min)."""

    def __init__(self, window: int = 0, fill: float = FMIN):
        super().__init__()
        self.window, self.fill = window, fill
        n = 16
        bias = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if window:
            bias = torch.bitwise_xor(bias, torch.tril(bias, -window))
        self.register_buffer("bias", bias.view(1, 1, n, n), persistent=False)

    def forward(self, q, k, v, attention_mask):
        L, S = q.size(-2), k.size(-2)
        w = torch.matmul(q, k.transpose(-1, -2))
        causal = self.bias[:, :, S - L: S, :S]
        w = torch.where(causal, w, torch.tensor(self.fill, dtype=w.dtype))
        w = w + attention_mask
        return nn.functional.softmax(w, dim=-1) @ v


@pytest.mark.parametrize("window", [0, 3])
@given(S=st.integers(1, 9), pads=st.lists(st.integers(0, 9), min_size=2, max_size=2), left=st.booleans())
def test_gpt_neo_fill_then_padding_mask(window, S, pads, left):
    keep = padding(2, S, [min(p, S) for p in pads], left=left)
    mask = torch.where(keep[:, None, None, :] & torch.ones(S, S, dtype=torch.bool).tril(), 0.0, FMIN)
    assert_fused_equal(FillThenBias(window), (*qkv(L=S, S=S), mask))


@given(L=st.integers(1, 6), S=st.integers(1, 8), seed=st.integers(0, 3))
def test_a_real_bias_after_a_finite_fill(L, S, seed):
    """An ALiBi-like bias added after ``masked_fill(-1e9)``: masked entries hold ``-1e9 + bias``."""

    class FillThenAlibi(nn.Module):
        def forward(self, q, k, v, keep, bias):
            w = (q @ k.transpose(-1, -2)).masked_fill(~keep, -1e9)
            return (w + bias).softmax(-1) @ v

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, L, S, generator=g) > 0.3
    bias = -torch.rand(1, 2, L, S, generator=g) * 4
    assert_fused_equal(FillThenAlibi(), (*qkv(L=L, S=S, seed=seed), keep, bias))


def test_a_scale_after_a_fill_and_a_bias_is_skipped():
    class FillBiasScale(nn.Module):
        def forward(self, q, k, v, keep, bias):
            w = (q @ k.transpose(-1, -2)).masked_fill(~keep, -1e9) + bias
            return (w * 0.5).softmax(-1) @ v

    keep = torch.rand(2, 1, 5, 5) > 0.3
    assert_skipped(FillBiasScale(), (*qkv(), keep, torch.randn(5, 5)), "after a finite mask fill")


# ----------------------------------------------------------------------------- family 10: weights zeroed by the mask

class ZeroedWeights(nn.Module):
    """CPM-Ant: the mask is spelled twice, once to fill the scores and once to zero the weights."""

    def __init__(self, spelling: str = "cpmant", fill: float = float("-inf"), p: float = 0.0):
        super().__init__()
        self.spelling, self.fill = spelling, fill
        self.dropout = nn.Dropout(p)

    def forward(self, q, k, v, mask, bias):
        b, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        score = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        score = torch.masked_fill(score, mask.view(b, 1, L, S) == torch.tensor(False),
                                  torch.scalar_tensor(self.fill, dtype=score.dtype))
        score = torch.softmax(score, -1)
        if self.spelling == "cpmant":
            score = torch.masked_fill(score, mask.view(b, 1, L, S) == torch.tensor(False),
                                      torch.scalar_tensor(0, dtype=score.dtype))
        elif self.spelling == "where":
            score = torch.where(mask.view(b, 1, L, S) == torch.tensor(False), 0.0, score)
        elif self.spelling == "product":
            score = score * (mask.view(b, 1, L, S) == torch.tensor(False)).logical_not()
        return self.dropout(score) @ v


@pytest.mark.parametrize("spelling,fill", [("cpmant", float("-inf")), ("cpmant", FMIN), ("where", -1e9),
                                           ("product", FMIN), ("product", float("-inf"))])
@given(L=st.integers(1, 6), S=st.integers(1, 7), seed=st.integers(0, 5), empty_row=st.booleans())
def test_weights_zeroed_by_the_site_mask(spelling, fill, L, S, seed, empty_row):
    """Rows without keys give 0 after a replacing zeroing (NaN for a product after a -inf fill)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, L, S, generator=g) > 0.4
    if empty_row:
        mask[1, 0] = False
    bias = torch.randn(2, L, S, generator=g)
    assert_fused_equal(ZeroedWeights(spelling, fill), (*qkv(L=L, S=S, seed=seed), mask, bias))


def test_weights_zeroed_in_eval_mode_with_dropout_after():
    mask = torch.rand(2, 4, 6) > 0.4
    mask[0, 1] = False
    assert_fused_equal(ZeroedWeights(p=0.3).eval(), (*qkv(L=4, S=6), mask, torch.zeros(4, 6)))


class ZeroedLookalike(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, keep, other):
        w = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        if self.kind == "two_masks":
            w = w.masked_fill(~other, float("-inf"))
        p = w.softmax(-1)
        if self.kind in ("other_mask", "two_masks"):
            p = p.masked_fill(~other if self.kind == "other_mask" else ~keep, 0.0)
        elif self.kind == "one":
            p = p.masked_fill(~keep, 1.0)
        return p @ v


@pytest.mark.parametrize("kind,words", [
    ("other_mask", ["zeroed", "not one the scores were masked with"]),
    ("two_masks", ["zeroed", "not all of them"]),
    ("one", ["`masked_fill`", "before the value product"]),
])
def test_zeroing_lookalikes_are_skipped(kind, words):
    keep = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    other = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[0, 0, 0] = True
    assert_skipped(ZeroedLookalike(kind), (*qkv(), keep, other), *words)


# ----------------------------------------------------------------------------- family 2: in-place writes into the scores

class RegionWrites(nn.Module):
    """Relative-position terms added into a slice of the scores (MViTv2 keeps the class token out of
    them), masks written into a slice, and ``masked_fill_`` on the scores or a slice of them."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, rel, keep):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if self.kind == "add":
            attn[:, :, 1:, 1:] += rel
        elif self.kind == "add_twice":
            attn[:, :, 1:, 1:] += rel
            attn[:, :, 1:, 1:] -= 0.5 * rel
        elif self.kind == "assign_sum":
            attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + rel
        elif self.kind == "row":
            attn[:, :, 0] += rel[..., 0, :1]
        elif self.kind == "set_neginf":
            attn[..., : keep.shape[-1] // 2] = float("-inf")
        elif self.kind == "set_min":
            attn[:, :, :, -1:] = torch.finfo(attn.dtype).min
        elif self.kind == "fill_slice":
            attn[:, :, :, 1:].masked_fill_(~keep[..., 1:], float("-inf"))
        elif self.kind == "fill_whole":
            attn.masked_fill_(~keep, -torch.finfo(attn.dtype).max)
        elif self.kind == "bool_index":
            attn[~keep.expand(attn.shape)] = float("-inf")
        return attn.softmax(-1) @ v


@pytest.mark.parametrize("kind", ["add", "add_twice", "assign_sum", "row", "set_neginf", "set_min", "fill_slice",
                                  "fill_whole", "bool_index"])
@given(L=st.integers(2, 7), S=st.integers(2, 7), heads=st.sampled_from([1, 2]), seed=st.integers(0, 5))
def test_region_writes_fuse(kind, L, S, heads, seed):
    g = torch.Generator().manual_seed(seed)
    rel = torch.randn(2, heads, L - 1, S - 1, generator=g).requires_grad_(True)
    keep = torch.rand(2, 1, L, S, generator=g) > 0.3
    if kind in ("fill_slice", "bool_index", "fill_whole"):
        keep[0, 0, 0] = kind == "fill_slice"  # a row without keys (NaN / mean) and one with only the first key
    assert_fused_equal(RegionWrites(kind), (*qkv(L=L, S=S, seed=seed), rel, keep))


class RegionLookalike(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, rel):
        attn = q @ k.transpose(-2, -1)
        if self.kind == "scale":
            attn[:, :, 1:, 1:] *= 2.0
        elif self.kind == "set_tensor":
            attn[:, :, 1:, 1:] = rel
        elif self.kind == "set_weak":
            attn[..., :1] = -5.0
        elif self.kind == "region_reused":
            region = attn[:, :, 1:, 1:]
            region += rel
            return attn.softmax(-1) @ v, region.sum()
        return attn.softmax(-1) @ v


@pytest.mark.parametrize("kind,words", [
    ("scale", ["region of the scores", "`mul`"]),
    ("set_tensor", ["overwritten with a tensor"]),
    ("set_weak", ["-5", "does not act as a mask"]),
])
def test_region_lookalikes_are_skipped(kind, words):
    rel = torch.randn(2, 2, 4, 4, requires_grad=True)
    assert_skipped(RegionLookalike(kind), (*qkv(), rel), *words)


def test_a_region_that_is_read_again_is_not_fused():
    rel = torch.randn(2, 2, 4, 4)
    torch._dynamo.reset()
    expected, actual, report, _, _ = run_both(RegionLookalike("region_reused"), (*qkv(grad=False), rel))
    assert report.fused == 0, str(report)
    torch.testing.assert_close(actual, expected)

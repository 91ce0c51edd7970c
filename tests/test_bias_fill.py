"""Issue 16, item 1: a bias filled under a mask before it is added to the scores (Falcon's ALiBi,
``s + alibi.masked_fill(causal_mask < -1, finfo.min)``) is read as the bias and the mask, so the mask rules find the
causal triangle or padding and the bias stays a ``(B, H, 1, S)`` tensor instead of a dense ``(B, H, L, S)`` one.

Each spelling must fuse with the original's outputs and gradients (q, k, v and the bias), rows without keys, bias
gradients and ``q_len != k_len`` included; each look-alike whose split would change the function (a fill that does not
absorb the scores, a bias subtracted) must be added whole, with the reason in the report."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from attnfuse.match import Skip, find_sites
from helpers import assert_fused_equal, assert_same_step, grads, leaf_copies, run_both

FMIN = torch.finfo(torch.float32).min
SPELLINGS = ["masked_fill", "torch_masked_fill", "where_fill_first", "where_keep_first", "in_place"]
MASK_SOURCES = ["bool", "float_lt", "float_eq_fill", "float_ne_zero", "float_to_bool"]


def qkv(b=2, h=3, L=5, S=5, d=8, dtype=torch.float32, seed=0, grad=True) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(grad) for n in (L, S, S))


def alibi(b: int, h: int, S: int, dtype=torch.float32, grad: bool = False, seed: int = 1) -> torch.Tensor:
    """A ``(B, H, 1, S)`` bias: ALiBi-like slopes times positions, plus noise so no two entries tie."""
    g = torch.Generator().manual_seed(seed)
    slopes = 2.0 ** -torch.arange(1, h + 1, dtype=torch.float32)
    bias = slopes.view(1, h, 1, 1) * torch.arange(S, dtype=torch.float32) + 0.1 * torch.randn(b, h, 1, S, generator=g)
    return bias.to(dtype).requires_grad_(grad)


def padding(b: int, S: int, pads: list[int], left: bool = True) -> torch.Tensor:
    """A ``(b, 1, 1, S)`` key keep-mask with ``pads[i]`` padded keys in batch row ``i``."""
    keep = torch.ones(b, 1, 1, S, dtype=torch.bool)
    for i, n in enumerate(pads[:b]):
        if n:
            keep[i, ..., :n] = False if left else keep[i, ..., :n]
            keep[i, ..., S - n:] = keep[i, ..., S - n:] if left else False
    return keep


class FilledBias(nn.Module):
    """``s + fill(bias, mask)`` in one of ``SPELLINGS``; the mask is a causal triangle built in the graph (aligned
    bottom-right, as ``triu(j - i + 1)``) or a keep-mask handed in, boolean or read from a ``0 / fill`` float mask
    by a comparison (``MASK_SOURCES``); optionally the filled tensor is expanded or cast, the scores are added
    second, or computed in ``dtype`` and upcast (Falcon's fp32 softmax over bf16 scores)."""

    def __init__(self, spelling="masked_fill", source="bool", fill=FMIN, after=None, bias_first=False,
                 upcast=False):
        super().__init__()
        self.spelling, self.source, self.fill, self.after = spelling, source, fill, after
        self.bias_first, self.upcast = bias_first, upcast

    def drop_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """True where the fill goes, from a boolean keep-mask, in the spelling ``source``."""
        if self.source == "bool":
            return ~keep
        zero = torch.zeros((), dtype=torch.float32, device=keep.device)
        additive = torch.where(keep, zero, FMIN)
        return {"float_lt": lambda: additive < -1, "float_eq_fill": lambda: additive == FMIN,
                "float_ne_zero": lambda: additive != 0, "float_to_bool": lambda: additive.to(torch.bool)}[self.source]()

    def filled(self, bias: torch.Tensor, drop: torch.Tensor, scores: tuple) -> torch.Tensor:
        if self.spelling == "masked_fill":
            out = bias.masked_fill(drop, self.fill)
        elif self.spelling == "torch_masked_fill":
            out = torch.masked_fill(bias, drop, self.fill)
        elif self.spelling == "where_fill_first":
            out = torch.where(drop, self.fill, bias)
        elif self.spelling == "where_keep_first":
            out = torch.where(~drop, bias, torch.tensor(self.fill, dtype=bias.dtype))
        else:
            out = bias.expand(torch.broadcast_shapes(bias.shape, drop.shape)) * 1.0  # room for every filled entry
            out.masked_fill_(drop, self.fill)
        if self.after == "expand":
            out = out.expand(scores)
        elif self.after == "float":
            out = out.float()
        return out

    def forward(self, q, k, v, bias, keep=None):
        L, S = q.shape[-2], k.shape[-2]
        if keep is None:
            keep = ~torch.ones(L, S, dtype=torch.bool, device=q.device).triu(S - L + 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if self.upcast:
            s = s.float()
        filled = self.filled(bias, self.drop_mask(keep), s.shape)
        s = filled + s if self.bias_first else s + filled
        return torch.softmax(s, dim=-1).to(v.dtype) @ v


def split_read(report: attnfuse.FusionReport) -> dict:
    features = report.sites[0].features
    assert features["filled_bias_kept_whole"] is None, features
    return features


# ----------------------------------------------------------------------------- the spellings, fp32

@given(spelling=st.sampled_from(SPELLINGS), source=st.sampled_from(MASK_SOURCES),
       after=st.sampled_from([None, "expand", "float"]), bias_first=st.booleans(),
       L=st.integers(1, 7), extra=st.integers(-2, 3), bias_grad=st.booleans(), fill=st.sampled_from([FMIN, -math.inf]))
@settings(max_examples=30)
def test_a_filled_bias_with_a_causal_mask_reads_the_triangle(spelling, source, after, bias_first, L, extra, bias_grad,
                                                             fill):
    S = max(1, L + extra)
    q, k, v = qkv(L=L, S=S)
    module = FilledBias(spelling, source, fill=fill, after=after, bias_first=bias_first)
    report = assert_fused_equal(module, (q, k, v, alibi(2, 3, S, grad=bias_grad)))
    features = split_read(report)
    expected = "top_left" if L == S else "bottom_right"
    assert features["causal"] == expected or (L == 1 and features["causal"] is None), features  # one query: all keys
    rows = L if spelling == "in_place" else 1  # written in place, the bias was first expanded to every query
    assert features["bias"] == "(2, 3, %d, %d)" % (rows, S), features


@given(spelling=st.sampled_from(SPELLINGS), source=st.sampled_from(MASK_SOURCES),
       pads=st.lists(st.integers(0, 6), min_size=2, max_size=2), left=st.booleans(), bias_grad=st.booleans(),
       grad=st.booleans())
@settings(max_examples=25)
def test_a_filled_bias_with_a_key_padding_mask(spelling, source, pads, left, bias_grad, grad):
    """A padding mask handed in; a batch row may lose every key (then the original attends uniformly, and with
    gradients its scores get a gradient that only its own ops give: they run for that call)."""
    S = 6
    q, k, v = qkv(L=4, S=S, grad=grad)
    keep = padding(2, S, pads, left)
    report = assert_fused_equal(FilledBias(spelling, source), (q, k, v, alibi(2, 3, S, grad=bias_grad), keep))
    features = split_read(report)
    assert features["mask"] == "key padding (2, 1, 1, 6)", features


def test_rows_without_keys_with_gradients_run_the_original_ops(monkeypatch):
    """Without the per-call check the fused call gives the scores of a keyless row no gradient, where the original
    (``s + fill`` there) gives one: the check is what keeps q's and k's gradients the original's."""
    q, k, v = qkv(L=4, S=6)
    args = (q, k, v, alibi(2, 3, 6, grad=True), padding(2, 6, [6, 1]))
    report = assert_fused_equal(FilledBias(), args)
    assert report.sites[0].backend.startswith("original ops (a row keeps no key"), report.sites[0].backend
    monkeypatch.setattr("attnfuse.lower._gradients_under_fill", lambda tensors: False)
    torch._dynamo.reset()
    expected, actual, _, ref_args, opt_args = run_both(FilledBias(), args)
    torch.testing.assert_close(actual, expected)  # the forward is the original's either way
    g_expected, g_actual = grads(expected, list(ref_args[:2])), grads(actual, list(opt_args[:2]))
    assert not all(torch.allclose(a, e, atol=1e-5) for a, e in zip(g_actual, g_expected))


def test_rows_without_keys_without_gradients_stay_fused():
    q, k, v = qkv(L=4, S=6, grad=False)
    report = assert_fused_equal(FilledBias(), (q, k, v, alibi(2, 3, 6), padding(2, 6, [6, 1])))
    assert not report.sites[0].backend.startswith("original ops"), report.sites[0].backend


@pytest.mark.parametrize("keyless", [False, True])
def test_a_mask_that_depends_on_the_bias(keyless):
    """``b.masked_fill(b < t, fill)``: the mask reads the bias's values; the split is the same function (the
    bias's gradient is 0 where it was filled in both), also where a head loses every key."""

    class SelfMasked(nn.Module):
        def forward(self, q, k, v, bias):
            s = q @ k.transpose(-1, -2) * 0.3
            return torch.softmax(s + bias.masked_fill(bias < -1.0, FMIN), -1) @ v

    q, k, v = qkv(L=5, S=6)
    bias = 2 * torch.randn(2, 3, 1, 6, generator=torch.Generator().manual_seed(3))
    if keyless:
        bias[0, 1] = -5.0
    report = assert_fused_equal(SelfMasked(), (q, k, v, bias.requires_grad_(True)))
    assert split_read(report)["mask"] == "key padding (2, 3, 1, 6)", report.sites[0].features


# ----------------------------------------------------------------------------- look-alikes: added whole

@pytest.mark.parametrize("fill, dtype, words", [
    (-1e9, torch.float32, "does not absorb"),
    (-1e30, torch.bfloat16, "does not absorb"),
    (torch.finfo(torch.float16).min, torch.float16, "float16"),
])
@pytest.mark.parametrize("grad", [False, True])
def test_a_fill_that_does_not_absorb_the_scores_is_added_whole(fill, dtype, words, grad):
    """``s + fill`` is not ``fill`` (fp16's -65504 absorbs only |s| < 16): a row without keys would not be uniform
    as in the original; the filled bias is added whole, as before."""
    q, k, v = qkv(L=4, S=6, dtype=dtype, grad=grad)
    if dtype != torch.bfloat16:  # scores of a magnitude at which `s + fill` is not `fill` (bf16's is 1e27)
        q = (q.detach() * 30).requires_grad_(grad)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    report = assert_fused_equal(FilledBias(fill=fill), (q, k, v, alibi(2, 3, 6, dtype=dtype), padding(2, 6, [6, 1])),
                                atol=tol, rtol=tol)
    reason = report.sites[0].features["filled_bias_kept_whole"]
    assert reason is not None and words in reason, reason
    assert report.sites[0].features["mask"] is None, report.sites[0].features


def test_a_subtracted_filled_bias_is_added_whole():
    class Subtracted(nn.Module):
        def forward(self, q, k, v, bias, keep):
            s = q @ k.transpose(-1, -2)
            return torch.softmax(s - bias.masked_fill(~keep, 1e4), -1) @ v

    q, k, v = qkv(L=4, S=6)
    report = assert_fused_equal(Subtracted(), (q, k, v, alibi(2, 3, 6), padding(2, 6, [2, 1])))
    assert "coefficient -1" in report.sites[0].features["filled_bias_kept_whole"], report.sites[0].features


def test_a_filled_bias_read_elsewhere_is_added_whole():
    class Returned(nn.Module):
        def forward(self, q, k, v, bias, keep):
            filled = bias.masked_fill(~keep, FMIN)
            return torch.softmax(q @ k.transpose(-1, -2) + filled, -1) @ v, filled.exp().sum()

    q, k, v = qkv(L=4, S=6)
    module, args = Returned(), (q, k, v, alibi(2, 3, 6), padding(2, 6, [2, 1]))
    expected, actual, report, _, _ = run_both(module, args)
    torch.testing.assert_close(actual, expected)
    assert report.fused == 1
    assert "other than additions" in report.sites[0].features["filled_bias_kept_whole"], report.sites[0].features


class InvertedMask(nn.Module):
    """transformers' older ``_expand_mask``: ``1 - m`` filled where it is not 0, a ``0 / min`` mask built from a 0/1
    padding mask (all ones when none is given)."""

    def forward(self, q, k, v, padding=None):
        L, S = q.shape[-2], k.shape[-2]
        padding = torch.ones(q.shape[0], S) if padding is None else padding
        inverted = 1.0 - padding[:, None, None, :].expand(-1, 1, L, S)
        mask = inverted.masked_fill(inverted.to(torch.bool), FMIN)
        return torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v


class PaddingUnderTriangle(nn.Module):
    """A ``0 / min`` padding mask filled again under a causal triangle: one added mask."""

    def forward(self, q, k, v, keep):
        L, S = q.shape[-2], k.shape[-2]
        added = torch.where(keep, 0.0, FMIN)[:, None, None, :]
        mask = added.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), FMIN)
        return torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v


def test_an_added_mask_filled_again_stays_one_mask():
    """A filled tensor that holds only 0 and its fill, or whose bias is a ``0 / fill`` mask, is read whole by the mask
    rules (a constant one as nothing at all), as before; split, its bias would stay a tensor beside the mask."""
    q, k, v = qkv(L=5, S=5)
    features = assert_fused_equal(InvertedMask(), (q, k, v)).sites[0].features
    assert (features["bias"], features["mask"], features["causal"]) == (None, None, None), features
    padded = padding(2, 5, [2, 0]).view(2, 5)
    features = assert_fused_equal(InvertedMask(), (q, k, v, padded.float())).sites[0].features
    assert "stays a tensor" in features["filled_bias_kept_whole"], features
    features = assert_fused_equal(PaddingUnderTriangle(), (q, k, v, padded)).sites[0].features
    assert (features["causal"], features["filled_bias_kept_whole"]) == (None, None), features


def test_a_mask_that_stays_a_tensor_keeps_the_bias_whole():
    """A mask varying by query with no triangle in it: the kernels would have to combine it with the bias at every
    call, where the model filled the bias once; the filled bias is added whole."""
    q, k, v = qkv(L=5, S=6)
    keep = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    report = assert_fused_equal(FilledBias(), (q, k, v, alibi(2, 3, 6, grad=True), keep))
    assert "stays a tensor" in report.sites[0].features["filled_bias_kept_whole"], report.sites[0].features


def test_under_inductor_a_split_that_needs_value_checks_is_not_made():
    """A compiled graph cannot read values per call (a site needing it runs its original ops there): the matcher
    keeps the filled bias whole when the split would need such a check (a finite fill beside a bias tensor)."""
    found = {}

    def backend(gm, example_inputs):
        for reads_values in (False, True):
            sites = list(find_sites(gm.graph, reads_values=reads_values))
            assert len(sites) == 1 and not isinstance(sites[0], Skip), sites
            found[reads_values] = sites[0].scores
        return gm

    q, k, v = qkv(L=5, S=5, grad=False)
    torch.compile(FilledBias(), backend=backend)(q, k, v, alibi(2, 3, 5))
    assert found[True].causal == "top_left" and found[True].filled_bias_kept is None
    assert found[False].causal is None and "Inductor" in found[False].filled_bias_kept


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype, bias_dtype, upcast", [
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False),  # an fp32 bias on a bf16 model: added in fp32
    (torch.bfloat16, torch.bfloat16, True),  # Falcon: bf16 scores upcast, a bf16 filled bias added in fp32
    (torch.float16, torch.float32, False),   # fp32's lowest value absorbs fp32 additions
    (torch.float16, torch.float16, True),
])
@pytest.mark.parametrize("grad", [False, True])
def test_dtypes(dtype, bias_dtype, upcast, grad):
    q, k, v = qkv(L=6, S=6, dtype=dtype, grad=grad)
    fill = torch.finfo(bias_dtype).min
    module = FilledBias(fill=fill, upcast=upcast)
    tol = 2e-2 if torch.bfloat16 in (dtype, bias_dtype) else 2e-3
    report = assert_fused_equal(module, (q, k, v, alibi(2, 3, 6, dtype=bias_dtype, grad=grad), padding(2, 6, [0, 2])),
                                atol=tol, rtol=tol)
    absorbs = bias_dtype != torch.float16  # fp16's lowest value (-65504) absorbs no score of magnitude 16 or more
    assert (report.sites[0].features["filled_bias_kept_whole"] is None) == absorbs, report.sites[0].features


# ----------------------------------------------------------------------------- transformers' Falcon with ALiBi

def falcon(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                       alibi=True, new_decoder_architecture=False, attn_implementation="eager")
    model = transformers.FalconForCausalLM(config)
    model.config.use_cache = False
    return model


def test_falcon_alibi_reads_causal_and_alibi():
    reference = falcon()
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_same_step(reference, optimized, ids)
    report = attnfuse.report(optimized)
    assert (report.fused, report.skipped) == (2, 0), str(report)
    for site in report.sites:
        assert site.features["causal"] == "top_left", str(report)
        assert site.features["bias"] == "(2, 4, 1, 12), (2, 4, 1, 12)", str(report)  # ALiBi, added twice by Falcon
        assert site.features["filled_bias_kept_whole"] is None, str(report)
    with torch.no_grad():
        torch.testing.assert_close(optimized(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("left", [True, False])
def test_falcon_alibi_with_padding(left):
    """With a padding mask the ALiBi depends on it and the mask is a causal triangle with padding, which SDPA sites
    take whole: the filled bias is added whole, and the model is the original (a left-padded query keeps no key)."""
    reference = falcon()
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0 if left else 1
    mask[0, 7:] = 1 if left else 0
    assert_same_step(reference, optimized, ids, mask)
    report = attnfuse.report(optimized)
    assert report.fused == 2, str(report)
    assert "causal triangle with padding" in report.sites[0].features["filled_bias_kept_whole"], str(report)


def test_falcon_alibi_dynamic_shapes():
    """Under dynamic shapes the mask cannot be evaluated: the comparison ``where(keep, 0, min) < -1`` is read as
    ``~keep``, whose index comparisons give the causal triangle."""
    reference = falcon()
    optimized = attnfuse.optimize(copy.deepcopy(reference), dynamic=True)
    for length in (9, 13):
        ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(length))
        assert_same_step(reference, optimized, ids)
    report = attnfuse.report(optimized)
    assert all(site.features["causal"] == "top_left" for site in report.sites if site.status == "fused"), str(report)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_falcon_alibi_on_cuda(dtype):
    """On the GPU the causal triangle and the ``(B, H, 1, S)`` ALiBi run on a fused kernel (bf16: finfo.min absorbs
    the fp32 scores), forward and backward equal to the original within the dtype's rounding; in fp16 Falcon fills
    with -65504, which does not absorb the scores, and the filled bias is added whole."""
    reference = falcon(layers=2).to("cuda", dtype)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for model in (reference, optimized):
        model.zero_grad()
        logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.float() for p in model.parameters()]))
    (expected, expected_grads), (actual, actual_grads) = results
    assert relative_error(actual, expected) < 2e-2
    assert max(relative_error(a, e) for a, e in zip(actual_grads, expected_grads)) < 5e-2
    report = attnfuse.report(optimized)
    split = dtype == torch.bfloat16
    for site in report.sites:
        assert site.features["causal"] == ("top_left" if split else None), str(report)
        assert (site.features["filled_bias_kept_whole"] is None) == split, str(report)
        assert not (site.backend or "").startswith("original ops"), str(report)

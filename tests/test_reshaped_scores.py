"""Issue 14, families 1 and 4: scores reshaped between the two products, and weights read transposed.

Family 1: heads or windows folded into the batch for the products and split out with a view for a mask
or bias (Swin's shifted windows, Bloom and Falcon's ALiBi, XGLM, fair-esm), or the query and key axes
split for a decomposed relative-position bias (SAM), then folded back. Family 4: ``v @ attn.transpose(-2,
-1)`` (YOLO area attention, C2PSA): the output axes in another order. Each spelling must fuse with the
original's outputs and input gradients; look-alikes whose reshape or transpose changes the math must be
skipped with a reason that names what was seen.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, grads, run_both

MIN = torch.finfo(torch.float32).min


def randn(*shape: int, seed: int = 0, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def padding(b: int, s: int, seed: int = 0, every_key: bool = False) -> torch.Tensor:
    """A ``(b, s)`` boolean, True at padded keys; with ``every_key`` the last row pads every key."""
    pad = torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < 0.3
    if every_key:
        pad[-1] = True
    return pad


def assert_skipped(module: nn.Module, args: tuple, reason: str) -> None:
    """One site, skipped with ``reason`` in its text; outputs and gradients unchanged."""
    torch._dynamo.reset()
    expected, actual, report, ref_args, opt_args = run_both(module, args)
    assert report.fused == 0 and report.skipped == 1, str(report)
    assert reason in report.sites[0].reason, report.sites[0].reason
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for e, a in zip(grads(expected, [ref_args[i] for i in inputs]), grads(actual, [opt_args[i] for i in inputs])):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- family 1: spellings that fuse

class SwinWindows(nn.Module):
    """Swin's shifted windows: a per-head relative bias on the product, the window mask on a 5-d view."""

    def forward(self, q, k, v, rel, mask):  # q: (B*nw, H, N, d), rel (H, N, N), mask (nw, N, N)
        heads, n = q.shape[1], q.shape[2]
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn + rel.unsqueeze(0)
        nw = mask.shape[0]
        attn = attn.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
        return attn.softmax(dim=-1) @ v


class SwinWindowsMaskedFill(nn.Module):
    """A boolean window mask filled on the view (windows split from the batch), softmax on the view."""

    def forward(self, q, k, v, keep):  # keep (nw, N, N) bool
        nw, heads = keep.shape[0], q.shape[1]
        attn = torch.einsum("bhid,bhjd->bhij", q, k)
        attn = attn.reshape(q.shape[0] // nw, nw, heads, q.shape[2], k.shape[2])
        attn = attn.masked_fill(~keep[None, :, None], -1e9)
        attn = attn.softmax(-1).flatten(0, 1)
        return torch.einsum("bhij,bhjd->bhid", attn, v)


class BloomAlibi(nn.Module):
    """Bloom: ``baddbmm`` over ``batch * heads`` with ALiBi, mask on the 4-d view, softmax there, view back."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, q, k, v, alibi, pad):  # q (B, H, L, d), k, v (B, H, S, d), alibi (B*H, 1, S)
        b, h, L, d = q.shape
        q, k, v = (t.reshape(b * self.heads, -1, d) for t in (q, k, v))
        # alpha is a literal: under dynamic=True Dynamo lifts a float attribute to a run-time number
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=8 ** -0.5)
        weights = scores.view(b, self.heads, L, -1)
        weights = weights.masked_fill(pad[:, None, None, :], torch.finfo(weights.dtype).min)
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, 0.1, self.training)
        out = torch.bmm(probs.view(b * self.heads, L, -1), v)
        return out.view(b, self.heads, L, d)


class XglmLike(nn.Module):
    """XGLM without its clamp: ``bmm``, an additive mask on the 4-d view, view back, softmax, ``bmm``."""

    def __init__(self, heads: int, clamp: bool = False) -> None:
        super().__init__()
        self.heads, self.clamp = heads, clamp

    def forward(self, q, k, v, mask):  # q (B*H, L, d), mask (B, 1, L, S) additive
        bh, L, _ = q.shape
        S = k.shape[1]
        w = torch.bmm(q, k.transpose(1, 2))
        w = w.view(bh // self.heads, self.heads, L, S) + mask
        if self.clamp:
            w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min))
        w = w.view(bh, L, S)
        return torch.bmm(F.softmax(w, dim=-1), v)


class FairEsmLike(nn.Module):
    """fair-esm's MultiheadAttention: key padding filled with -inf on the 4-d view (rows may be all padding)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, q, k, v, pad):  # q, k, v (B*H, N, d), pad (B, N)
        bh, n, _ = q.shape
        w = torch.bmm(q * 0.5, k.transpose(1, 2))
        w = w.view(bh // self.heads, self.heads, n, n)
        w = w.masked_fill(pad.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
        w = w.view(bh, n, n)
        w_float = F.softmax(w, dim=-1, dtype=torch.float32)
        w = w_float.type_as(w)
        return torch.bmm(F.dropout(w_float.type_as(w), 0.0, self.training), v)


class FalconAlibi(nn.Module):
    """Falcon with ALiBi: 4-d product, an identity view, the bias viewed itself, an in-place scale."""

    def forward(self, q, k, v, alibi, mask):  # q (B, H, L, d), alibi (B*H, 1, S), mask (B, 1, L, S) additive
        b, h, L, d = q.shape
        S = k.shape[2]
        scores = (q @ k.transpose(-1, -2)).view(b, h, L, S)
        logits = scores + alibi.view(b, h, 1, -1)
        logits *= d ** -0.5
        probs = F.softmax(logits + mask, dim=-1)
        return (probs.view(b, h, L, S) @ v).flatten(0, 1)


class MergedForMask(nn.Module):
    """4-d product, merged to ``(B*H, L, S)`` for a mask given per batch-head, split back for the softmax."""

    def forward(self, q, k, v, bias):  # bias (B*H, L, S)
        b, h, L, _ = q.shape
        s = q @ k.transpose(-1, -2)
        s = s.reshape(b * h, L, -1) + bias
        return s.view(b, h, L, -1).softmax(-1) @ v


class SamRelPos(nn.Module):
    """SAM's decomposed relative positions: the query and key axes split into (height, width)."""

    def __init__(self, size: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.size = size
        self.rel_h = nn.Parameter(torch.randn(2 * size[0] - 1, dim, generator=torch.Generator().manual_seed(1)))
        self.rel_w = nn.Parameter(torch.randn(2 * size[1] - 1, dim, generator=torch.Generator().manual_seed(2)))

    def forward(self, q, k, v):  # q, k, v (B*heads, h*w, d)
        (h, w), (bh, _, d) = self.size, q.shape
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)
        coords_h = torch.arange(h)[:, None] - torch.arange(h)[None, :] + (h - 1)
        coords_w = torch.arange(w)[:, None] - torch.arange(w)[None, :] + (w - 1)
        r_q = q.reshape(bh, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_h[coords_h])
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_w[coords_w])
        attn = (attn.view(bh, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(bh, h * w, h * w)
        return attn.softmax(dim=-1) @ v


sizes = st.integers(1, 5)


@given(b=sizes, nw=st.integers(1, 4), h=st.integers(1, 3), n=st.integers(2, 7), d=st.sampled_from([4, 8]))
def test_swin_window_mask_fuses(b, nw, h, n, d):
    qkv = [randn(b * nw, h, n, d, seed=i) for i in range(3)]
    mask = torch.where(torch.rand(nw, n, n, generator=torch.Generator().manual_seed(5)) < 0.3, -100.0, 0.0)
    assert_fused_equal(SwinWindows(), (*qkv, randn(h, n, n, seed=4), mask))


@given(b=sizes, nw=st.integers(1, 4), h=st.integers(1, 3), L=st.integers(1, 6), S=st.integers(1, 6))
def test_windows_masked_fill_on_the_view_fuses(b, nw, h, L, S):
    keep = torch.rand(nw, L, S, generator=torch.Generator().manual_seed(7)) < 0.7
    q, k, v = randn(b * nw, h, L, 8), randn(b * nw, h, S, 8, seed=1), randn(b * nw, h, S, 8, seed=2)
    assert_fused_equal(SwinWindowsMaskedFill(), (q, k, v, keep))


@given(b=sizes, h=st.integers(1, 4), L=st.integers(1, 7), S=st.integers(1, 7))
def test_bloom_alibi_baddbmm_fuses(b, h, L, S):
    q, k, v = randn(b, h, L, 8), randn(b, h, S, 8, seed=1), randn(b, h, S, 8, seed=2)
    report = assert_fused_equal(BloomAlibi(h).eval(), (q, k, v, randn(b * h, 1, S, seed=3), padding(b, S)))
    assert report.sites[0].features["dropout"] == 0.0


@given(b=sizes, h=st.integers(1, 4), L=st.integers(1, 7), S=st.integers(1, 7))
def test_xglm_view_for_the_mask_fuses(b, h, L, S):
    mask = torch.where(padding(b, S)[:, None, None, :], MIN, 0.0).expand(b, 1, L, S)
    qkv = randn(b * h, L, 8), randn(b * h, S, 8, seed=1), randn(b * h, S, 8, seed=2)
    assert_fused_equal(XglmLike(h), (*qkv, mask))


def test_xglm_with_its_clamp_fuses():
    mask = torch.where(padding(2, 5)[:, None, None, :], MIN, 0.0).expand(2, 1, 5, 5)
    assert_fused_equal(XglmLike(3, clamp=True), (randn(6, 5, 8), randn(6, 5, 8, seed=1), randn(6, 5, 8, seed=2), mask))


@given(b=sizes, h=st.integers(1, 3), n=st.integers(1, 6), every_key=st.booleans())
def test_fair_esm_key_padding_fuses(b, h, n, every_key):
    qkv = [randn(b * h, n, 8, seed=i) for i in range(3)]
    assert_fused_equal(FairEsmLike(h).eval(), (*qkv, padding(b, n, every_key=every_key)))


@given(b=sizes, h=st.integers(1, 3), L=st.integers(1, 6), S=st.integers(1, 6))
def test_falcon_identity_views_fuse(b, h, L, S):
    q, k, v = randn(b, h, L, 8), randn(b, h, S, 8, seed=1), randn(b, h, S, 8, seed=2)
    mask = torch.where(padding(b, S)[:, None, None, :], MIN, 0.0).expand(b, 1, L, S)
    assert_fused_equal(FalconAlibi(), (q, k, v, randn(b * h, 1, S, seed=3), mask))


@given(b=sizes, h=st.integers(1, 3), L=st.integers(1, 6), S=st.integers(1, 6))
def test_merge_for_a_per_head_bias_fuses(b, h, L, S):
    q, k, v = randn(b, h, L, 8), randn(b, h, S, 8, seed=1), randn(b, h, S, 8, seed=2)
    assert_fused_equal(MergedForMask(), (q, k, v, randn(b * h, L, S, seed=3)))


@given(bh=st.integers(1, 4), hw=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_sam_decomposed_rel_pos_fuses(bh, hw):
    n = hw[0] * hw[1]
    qkv = [randn(bh, n, 8, seed=i) for i in range(3)]
    module = SamRelPos(hw, 8)
    assert_fused_equal(module, tuple(qkv), atol=5e-5)


def test_bloom_under_dynamic_shapes():
    """Batch, heads and lengths symbolic: the split sizes are read from q and the mask at run time."""
    module = BloomAlibi(3).eval()
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(module, dynamic=True)
    for b, L, S in ((2, 3, 5), (3, 6, 4), (4, 2, 7)):
        args = (randn(b, 3, L, 8), randn(b, 3, S, 8, seed=1), randn(b, 3, S, 8, seed=2), randn(b * 3, 1, S, seed=3),
                padding(b, S, seed=b))
        torch.testing.assert_close(optimized(*args), reference(*args), atol=2e-5, rtol=1e-4)
    report = attnfuse.report(optimized)
    assert report.fused >= 1 and report.skipped == 0, str(report)


def test_swin_under_dynamic_shapes():
    module = SwinWindows()
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(module, dynamic=True)
    for b, nw, n in ((2, 3, 4), (3, 2, 6), (2, 4, 5)):
        args = (*[randn(b * nw, 2, n, 8, seed=i) for i in range(3)], randn(2, n, n, seed=3), randn(nw, n, n, seed=4))
        torch.testing.assert_close(optimized(*args), reference(*args), atol=2e-5, rtol=1e-4)
    report = attnfuse.report(optimized)
    assert report.fused >= 1 and report.skipped == 0, str(report)


# ----------------------------------------------------------------------------- family 1: look-alikes

class MixingReshape(nn.Module):
    """``(B, L, S)`` read as ``(B, S, L)`` for a bias: elements move between rows."""

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-1, -2)
        b, L, S = s.shape
        s = (s.reshape(b, S, L) + bias).reshape(b, L, S)
        return s.softmax(-1) @ v


class SoftmaxOverMergedRows(nn.Module):
    """The softmax runs over queries and keys together (a view merges them)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        b, L, S = s.shape
        return s.reshape(b, L * S).softmax(-1).reshape(b, L, S) @ v


class WeightsStaySplit(nn.Module):
    """The weights reach the value product on the 4-d view while the product was 3-d."""

    def forward(self, q, k, v):  # q, k (B*H, N, d), v (B, H, N, d)
        b, h = v.shape[:2]
        s = torch.bmm(q, k.transpose(1, 2)).view(b, h, q.shape[1], k.shape[1])
        return s.softmax(-1) @ v


def test_reshape_that_mixes_axes_is_skipped():
    q, k, v = randn(2, 3, 8), randn(2, 5, 8, seed=1), randn(2, 5, 8, seed=2)
    assert_skipped(MixingReshape(), (q, k, v, randn(2, 5, 3, seed=3)), "does not only split or merge whole axes")


def test_softmax_over_merged_query_and_key_axes_is_skipped():
    q, k, v = randn(2, 3, 8), randn(2, 5, 8, seed=1), randn(2, 5, 8, seed=2)
    assert_skipped(SoftmaxOverMergedRows(), (q, k, v), "not over the 5 keys of the QK product")


def test_weights_left_on_the_view_are_skipped():
    q, k, v = randn(6, 4, 8), randn(6, 4, 8, seed=1), randn(2, 3, 4, 8, seed=2)
    assert_skipped(WeightsStaySplit(), (q, k, v), "reshaped to (2, 3, 4, 4)")


# ----------------------------------------------------------------------------- family 4: weights read transposed

class AreaAttention(nn.Module):
    """ultralytics PSA / C2PSA: q, k, v as ``(B, H, d, N)``, output ``v @ attn^T`` viewed as an image."""

    def forward(self, q, k, v):
        b, h, d, n = v.shape
        attn = (q.transpose(-2, -1) @ k) * (q.shape[2] ** -0.5)
        attn = attn.softmax(dim=-1)
        return (v @ attn.transpose(-2, -1)).view(b, h * d, 1, n)


class TransposedSpellings(nn.Module):
    """``.mT`` / ``permute`` spellings, a key padding mask, no head axis."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, pad):  # q (B, d, L), k (B, d, S), v (B, e, S), pad (B, S)
        attn = torch.einsum("bdi,bdj->bij", q, k).masked_fill(pad[:, None, :], float("-inf")).softmax(-1)
        if self.spelling == "mT":
            return v @ attn.mT
        if self.spelling == "permute":
            return torch.matmul(v, attn.permute(0, 2, 1))
        return v.bmm(attn.transpose(1, 2).transpose(-1, -2).transpose(-2, -1))


@given(b=sizes, h=st.integers(1, 3), d=st.sampled_from([4, 8]), n=st.integers(1, 9))
def test_area_attention_fuses(b, h, d, n):
    assert_fused_equal(AreaAttention(), tuple(randn(b, h, d, n, seed=i) for i in range(3)))


@pytest.mark.parametrize("spelling", ["mT", "permute", "transposes"])
@given(b=sizes, L=st.integers(1, 6), S=st.integers(1, 6))
def test_transposed_weights_spellings_fuse(spelling, b, L, S):
    args = randn(b, 8, L), randn(b, 8, S, seed=1), randn(b, 5, S, seed=2), padding(b, S, every_key=True)
    assert_fused_equal(TransposedSpellings(spelling), args)


class HeadsSwappedWithQueries(nn.Module):
    """The weights' head and query axes swapped before the value product (heads mixed with queries)."""

    def forward(self, q, k, v):  # all (B, N, N, d): heads == queries in size
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        return attn.transpose(1, 2) @ v


class QueriesSwappedWithKeys(nn.Module):
    """``attn.transpose(-2, -1) @ v``: the value product sums over the queries."""

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        return attn.transpose(-2, -1) @ v


def test_transpose_mixing_heads_and_queries_is_skipped():
    assert_skipped(HeadsSwappedWithQueries(), tuple(randn(2, 4, 4, 8, seed=i) for i in range(3)), "v has a query axis")


def test_transpose_swapping_queries_and_keys_is_skipped():
    assert_skipped(QueriesSwappedWithKeys(), tuple(randn(2, 3, 4, 8, seed=i) for i in range(3)),
                   "does not sum over the keys")


# ----------------------------------------------------------------------------- real models (tiny, CPU)

def _sam_image_encoder():
    if "segment_anything" not in sys.modules:  # its package __init__ imports torchvision (not needed here)
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            pytest.skip("segment-anything is not installed")
        package = types.ModuleType("segment_anything")
        package.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["segment_anything"] = package
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    torch.manual_seed(0)
    model = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=16,
                            use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    with torch.no_grad():  # SAM starts its relative-position tables at zero whatever rel_pos_zero_init says
        for name, parameter in model.named_parameters():
            if "rel_pos" in name:
                parameter.normal_()
    return model.eval(), (torch.randn(1, 3, 64, 64),)


def _bloom():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, attn_implementation="eager")
    return transformers.BloomModel(config).eval()


@pytest.mark.parametrize("name", ["sam", "bloom"])
def test_real_models_fuse_every_site(name):
    if name == "sam":
        model, args = _sam_image_encoder()
        kwargs = {}
    else:
        model, args = _bloom(), ()
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        kwargs = {"input_ids": ids, "attention_mask": mask}
    reference, optimized = copy.deepcopy(model), attnfuse.optimize(model)
    expected, actual = reference(*args, **kwargs), optimized(*args, **kwargs)
    if name == "bloom":
        expected, actual = expected.last_hidden_state, actual.last_hidden_state
    torch.testing.assert_close(actual, expected, atol=5e-5, rtol=1e-4)
    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected * weight).sum().backward()
    (actual * weight).sum().backward()
    reference_grads = dict(reference.named_parameters())
    compared = 0
    for name, parameter in optimized.named_parameters():
        if reference_grads[name].grad is not None:
            torch.testing.assert_close(parameter.grad, reference_grads[name].grad, atol=2e-4, rtol=1e-3, msg=name)
            compared += 1
    assert compared > 0
    report = attnfuse.report(optimized)
    assert report.fused == 2 and report.skipped == 0, str(report)


def test_fill_tied_with_the_kept_scores_stays_exact():
    """A Bloom ALiBi row at ``finfo.min`` makes the ``finfo.min`` fill tie with the kept scores (the original
    spreads that row over the padded keys too): the per-call fill check reads the regrouped mask and bias."""
    alibi = torch.randn(6, 1, 5, generator=torch.Generator().manual_seed(3))
    alibi[1] = MIN
    args = (randn(2, 3, 4, 8), randn(2, 3, 5, 8, seed=1), randn(2, 3, 5, 8, seed=2), alibi.requires_grad_(),
            padding(2, 5, seed=1))
    assert args[-1][0].any()
    assert_fused_equal(BloomAlibi(3).eval(), args)


class WeightsReturned(nn.Module):
    """XGLM-like, the weights also returned: skipped after its mask was regrouped."""

    def forward(self, q, k, v, mask):
        w = torch.bmm(q, k.transpose(1, 2))
        w = (w.view(2, 3, q.shape[1], k.shape[1]) + mask).view(6, q.shape[1], k.shape[1]).softmax(-1)
        return torch.bmm(w, v), w


def test_a_skipped_site_leaves_no_regroup_node():
    from attnfuse.match import Skip, find_sites
    from attnfuse.patterns.layouts import regroup

    seen = {}

    def backend(gm, example_inputs):
        seen["results"] = list(find_sites(gm.graph))
        seen["regroups"] = [n for n in gm.graph.nodes if n.target is regroup]
        return gm.forward

    args = randn(6, 4, 8), randn(6, 5, 8, seed=1), randn(6, 5, 8, seed=2), randn(2, 1, 4, 5, seed=3)
    torch.compile(WeightsReturned(), backend=backend)(*args)
    assert [type(r) for r in seen["results"]] == [Skip], seen["results"]
    assert "the attention weights: returned by the graph" in seen["results"][0].reason
    assert seen["regroups"] == []


def test_a_rolled_back_site_leaves_no_built_node():
    """verify rolls a site back by rewriting the graph without it: the nodes built to match it go too."""
    from attnfuse.capture import backend_for
    from attnfuse.match import BUILT_FOR
    from attnfuse.options import Options

    seen = {}

    def backend(gm, example_inputs):
        seen["reports"] = backend_for(Options()).rewrite(gm, only=set())
        seen["built"] = [n for n in gm.graph.nodes if n.meta.get(BUILT_FOR)]
        return gm.forward

    torch._dynamo.reset()
    args = (randn(2, 3, 4, 8), randn(2, 3, 5, 8, seed=1), randn(2, 3, 5, 8, seed=2), randn(6, 1, 5, seed=3),
            padding(2, 5))
    torch.compile(BloomAlibi(3).eval(), backend=backend)(*args)
    assert [r.reason for r in seen["reports"]] == ["rolled back"] and seen["built"] == []

"""NaN and inf in masked-out keys and values (an uninitialised KV cache, padded slots).

The original replaces a masked score (``masked_fill``), so a NaN or inf key it masks never reaches
its output; a kernel that adds the mask to ``q.k`` (every kernel with a mask tensor, SDPA's math
kernel with ``is_causal``) turns it into NaN. A NaN value in a masked slot is NaN in the original
too (``0 * NaN`` in the value product) and must stay NaN. An additive float mask adds in both.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, leaf_copies

FILLS = [float("-inf"), -1e9, torch.finfo(torch.float32).min, -torch.finfo(torch.float32).max]
BAD = [float("nan"), float("inf"), float("-inf")]


class MaskedAttention(nn.Module):
    """``softmax(q k^T * scale, masked by a keep-mask with a fill) @ v``; the mask is handed in."""

    def __init__(self, fill: float, causal: str = "none"):
        super().__init__()
        self.fill, self.causal = fill, causal

    def forward(self, q, k, v, keep):
        L, S = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.causal == "top_left":
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), self.fill)
        elif self.causal == "bottom_right":
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(S - L + 1), self.fill)
        scores = scores.masked_fill(~keep, self.fill)
        return scores.softmax(-1) @ v


def _qkv(L: int, S: int, dtype=torch.float32, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, L, 4, generator=g, dtype=dtype), torch.randn(2, 2, S, 4, generator=g, dtype=dtype),
            torch.randn(2, 2, S, 4, generator=g, dtype=dtype))


@st.composite
def masked_programs(draw):
    L, S = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    layout = draw(st.sampled_from(["padding", "full", "per_head"]))
    causal = draw(st.sampled_from(["none", "top_left", "bottom_right"]))
    shape = {"padding": (2, 1, 1, S), "full": (2, 1, L, S), "per_head": (2, 2, L, S)}[layout]
    keep = torch.tensor(draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)))).view(shape)
    slots = draw(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, S - 1)), min_size=1, max_size=3))
    return dict(L=L, S=S, keep=keep, causal=causal, fill=draw(st.sampled_from(FILLS)), bad=draw(st.sampled_from(BAD)),
                where=draw(st.sampled_from(["k", "v", "k_masked_only"])), slots=slots,
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


@given(p=masked_programs())
def test_nonfinite_values_in_masked_slots_give_what_the_original_gives(p):
    q, k, v = _qkv(p["L"], p["S"], p["dtype"])
    keep = p["keep"]
    for b, h, j in p["slots"]:
        if p["where"] == "k_masked_only" or (p["where"] == "k" and math.isinf(p["bad"])):
            # every query row masks an infinite key (one that some row keeps can score -inf for a row
            # keeping nothing else: NaN in the original, 0 from kernels; documented in attnfuse.masking)
            keep = keep.clone()
            keep[b, h % keep.shape[1], :, j] = False
        (v if p["where"] == "v" else k)[b, h, j, 0] = p["bad"]
    for t in (q, k, v):
        t.requires_grad_()
    assert_fused_equal(MaskedAttention(p["fill"], p["causal"]), (q, k, v, keep))


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("bad", BAD)
def test_uninitialised_cache_slots_behind_a_padding_mask(fill, bad):
    """The issue's example: the last two cache slots of batch 0 hold garbage, masked for every query."""
    q, k, v = _qkv(5, 6)
    k[0, :, -2:] = bad
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., -2:] = False
    for t in (q, k, v):
        t.requires_grad_()
    # a key-padding mask zeroes the masked k rows before the kernel (no rerun); a fill above -1e30 is
    # checked per call from the q/k norms, which a non-finite key fails first (the original ops run)
    assert_fused_equal(MaskedAttention(fill), (q, k, v, keep))


@pytest.mark.parametrize("zeroing_limit", [None, 0])
@pytest.mark.parametrize("bad", BAD)
def test_decode_step_over_a_padded_cache_without_gradients(monkeypatch, bad, zeroing_limit):
    """A decode step (q_len 1) over a left-padded cache whose padded slots hold garbage, without gradients: a
    small k is copied with its masked rows zeroed; a k past the zeroing limit (a long cache) is not copied, and
    the leaked value is caught by the output's check instead. Both give the original's output."""
    import attnfuse.kernels.sdpa as sdpa

    if zeroing_limit is not None:
        monkeypatch.setattr(sdpa, "ZEROING_LIMIT_BYTES", zeroing_limit)
    q, k, v = _qkv(1, 9)
    k[1, :, :3] = bad
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., :3] = False
    with torch.no_grad():
        assert_fused_equal(MaskedAttention(torch.finfo(torch.float32).min), (q, k, v, keep))


def test_nan_value_in_a_masked_slot_stays_nan_as_in_the_original():
    q, k, v = _qkv(5, 6)
    v[0, :, -1] = float("nan")
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., -1] = False
    model = MaskedAttention(float("-inf"))
    expected = model(q, k, v, keep)
    assert expected[0].isnan().all() and not expected[1].isnan().any()
    assert_fused_equal(model, (q, k, v, keep))


class Causal(nn.Module):
    def __init__(self, fill: float = float("-inf")):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(-2, -1) / 2
        return scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(S - L + 1),
                                  self.fill).softmax(-1) @ v


@pytest.mark.parametrize("L,S", [(5, 5), (300, 300), (3, 7), (7, 3)])
@pytest.mark.parametrize("fill", [float("-inf"), -1e9])
def test_causal_nan_keys_above_the_diagonal(L, S, fill):
    """``is_causal`` on the CPU flash kernel selects; a lower-right triangle (L < S) is materialized and
    added on the CPU: both give the original's rows (those before the NaN key finite)."""
    q, k, v = _qkv(L, S)
    k[:, :, S - 2] = float("nan")
    report = assert_fused_equal(Causal(fill), (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()))
    assert report.sites[0].features["causal"] is not None


class CausalDropout(nn.Module):
    def forward(self, q, k, v):
        L = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1),
                                                       float("-inf"))
        return torch.nn.functional.dropout(scores.softmax(-1), 0.3, training=self.training) @ v


def test_causal_dropout_on_the_math_kernel_with_nan_keys_matches_under_the_same_seed():
    """On the CPU, dropout runs SDPA's math kernel, which adds the causal mask: the call reruns unfused,
    drawing the dropout mask the original draws."""
    q, k, v = _qkv(6, 6)
    k[:, :, -1] = float("nan")
    model = CausalDropout().train()
    optimized = attnfuse.optimize(copy.deepcopy(model))
    torch.manual_seed(3)
    expected = model(q, k, v)
    torch.manual_seed(3)
    actual = optimized(q, k, v)
    assert attnfuse.report(optimized).fused == 1
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert not actual[:, :, :-1].isnan().any()


class AdditiveMask(nn.Module):
    """An additive float mask handed in (``nn.MultiheadAttention`` style): NaN + -inf is NaN in the original too."""

    def forward(self, q, k, v, additive):
        return ((q @ k.transpose(-2, -1)) / 2 + additive).softmax(-1) @ v


def test_additive_float_mask_keeps_the_originals_nan():
    q, k, v = _qkv(4, 5)
    k[0, :, -1] = float("nan")
    additive = torch.zeros(2, 1, 1, 5)
    additive[0, ..., -1] = float("-inf")
    expected = AdditiveMask()(q, k, v, additive)
    assert expected[0].isnan().all()
    assert_fused_equal(AdditiveMask(), (q, k, v, additive))


def test_dead_key_columns_are_zeroed_under_a_compiler():
    """Under a tracer nothing can be read on the host: the keys every query row masks are zeroed."""
    q, k, v = _qkv(3, 6)
    k[0, :, -2:] = float("nan")
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., -2:] = False
    compiled = torch.compile(lambda q, k, v, keep: attnfuse.attend(q, k, v, mask=keep, fully_masked_rows="nan"),
                             backend="aot_eager", fullgraph=True)
    expected = MaskedAttention(float("-inf"))(*leaf_copies((q, k, v, keep)))
    torch.testing.assert_close(compiled(q, k, v, keep), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["padding", "causal", "lower_right"])
def test_nonfinite_masked_keys_on_the_gpu(dtype, case):
    """Measured on an H100 (torch 2.11): every kernel adds a mask tensor (padding leaks), ``is_causal``
    selects on flash / memory-efficient / cuDNN, a lower-right ``CausalBias`` on flash / memory-efficient."""
    L, S = (64, 1024) if case == "lower_right" else (1024, 1024)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, L, 64, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(2, 4, S, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    keep = torch.ones(2, 1, 1, S, dtype=torch.bool, device="cuda")
    if case == "padding":
        keep[0, ..., -S // 4:] = False
        k[0, :, -S // 4:] = float("nan")
        model, args = MaskedAttention(float("-inf")), (q, k, v, keep)
    else:
        k[:, :, S - 2] = float("nan")  # above the diagonal of every row but the last ones
        model, args = Causal(), (q, k, v)
    expected = model(*(a.float() if a.is_floating_point() else a for a in args))
    optimized = attnfuse.optimize(copy.deepcopy(model))
    actual = optimized(*args).float()
    assert attnfuse.report(optimized).fused == 1
    assert (actual.isnan() == expected.isnan()).all()
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)

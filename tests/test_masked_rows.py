"""Rows where kernels and the original disagree: every key masked under train-mode dropout, a run-time
bias that is ``-inf`` on a whole row, no key at all (``k_len = 0``), and non-positive scales."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, count_host_reads

FINITE_FILLS = [-1e9, torch.finfo(torch.float32).min, -torch.finfo(torch.float32).max]


def _qkv(L: int, S: int, seed: int = 0, grad: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, n, 8, generator=g).requires_grad_(grad) for n in (L, S, S))


class PaddedDropout(nn.Module):
    """Key padding with a finite fill, dropout on the probabilities (BERT-style), optional softcap."""

    def __init__(self, fill: float, p: float = 0.5, softcap: bool = False, causal: bool = False):
        super().__init__()
        self.fill, self.softcap, self.causal = fill, softcap, causal
        self.dropout = nn.Dropout(p)

    def forward(self, q, k, v, keep):
        L, S = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.softcap:
            scores = torch.tanh(scores / 5.0) * 5.0
        if self.causal:  # bottom-right: with L > S the first L - S rows keep no key
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(S - L + 1), self.fill)
        scores = scores.masked_fill(~keep[:, None, None, :], self.fill)
        return self.dropout(scores.softmax(-1)) @ v


def _train_pair(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    reference = copy.deepcopy(module).train()
    optimized = attnfuse.optimize(copy.deepcopy(module).train())
    return reference, optimized


@pytest.mark.parametrize("fill", FINITE_FILLS)
@pytest.mark.parametrize("softcap", [False, True])
def test_dropout_on_a_row_without_keys_is_dropout_of_uniform_weights(fill, softcap):
    """The original computes dropout(uniform) @ v there; on the CPU the fused call draws the same
    dropout mask as the original, so under the same seed the results are equal (forward and backward)."""
    q, k, v = _qkv(4, 6, grad=True)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False  # batch 1 keeps no key at all
    keep[0, -2:] = False
    reference, optimized = _train_pair(PaddedDropout(fill, softcap=softcap))
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(q, k, v, keep)
        torch.manual_seed(seed)
        actual = optimized(q, k, v, keep)
        torch.testing.assert_close(actual, expected)
        g_e = torch.autograd.grad(expected.square().sum(), (q, k, v))
        g_a = torch.autograd.grad(actual.square().sum(), (q, k, v))
        for a, e in zip(g_a, g_e):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    assert attnfuse.report(optimized).fused == 1
    assert not torch.allclose(actual[1], v[1].mean(-2, keepdim=True).expand_as(actual[1]))  # random, not the mean


class BiasedPaddedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.4)

    def forward(self, q, k, v, bias, keep):
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias).masked_fill(~keep[:, None, None, :], -1e9)
        return self.dropout(scores.softmax(-1)) @ v


def test_dropout_on_a_row_without_keys_ignores_its_bias_as_the_original():
    q, k, v = _qkv(5, 5, grad=True)
    bias = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1] = False
    reference, optimized = _train_pair(BiasedPaddedDropout())
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(q, k, v, bias, keep)
        torch.manual_seed(seed)
        torch.testing.assert_close(optimized(q, k, v, bias, keep), expected)


def test_dropout_on_causal_rows_without_keys_averages_to_the_mean_of_v():
    """Bottom-right causal with more queries than keys: the first rows keep no key. Their dropout
    output is random, with the mean of v as its expectation (a statistic, checked over many draws)."""
    q, k, v = _qkv(5, 3)
    keep = torch.ones(2, 3, dtype=torch.bool)
    _, optimized = _train_pair(PaddedDropout(-1e9, p=0.3, causal=True))
    torch.manual_seed(0)
    draws = torch.stack([optimized(q, k, v, keep) for _ in range(2000)])
    dead_rows = draws[:, :, :, :2]  # L - S = 2 rows without keys
    assert dead_rows.std(0).min() > 0.01
    torch.testing.assert_close(dead_rows.mean(0), v.mean(-2, keepdim=True).expand(2, 2, 2, 8), atol=0.08, rtol=0)


class RuntimeBias(nn.Module):
    """A bias handed in at run time, then optionally a keep-mask with a fill."""

    def __init__(self, fill=None):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, bias, keep):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
        if self.fill is not None:
            scores = scores.masked_fill(~keep, self.fill)
        return scores.softmax(-1) @ v


@given(fill=st.sampled_from([None, float("-inf"), -1e9, torch.finfo(torch.float32).min]),
       bias_shape=st.sampled_from([(2, 1, 4, 5), (1, 2, 4, 5), (2, 2, 4, 5), (4, 5)]),
       neginf=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=12),
       whole_rows=st.lists(st.integers(0, 3), min_size=1, max_size=2),
       masked=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=6),
       grad=st.booleans())
def test_runtime_bias_with_neginf_rows_gives_the_originals_nan(fill, bias_shape, neginf, whole_rows, masked, grad):
    q, k, v = _qkv(4, 5, grad=grad)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(bias_shape, generator=g)
    for i, j in neginf:
        bias[..., i, j] = float("-inf")
    for i in whole_rows:
        bias[..., i, :] = float("-inf")
    keep = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    for i, j in masked:
        keep[..., i, j] = False
    assert_fused_equal(RuntimeBias(fill), (q, k, v, bias, keep))


class Padded(nn.Module):
    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        return scores.masked_fill(~keep[:, None, None, :], self.fill).softmax(-1) @ v


@pytest.mark.parametrize("fill", [float("-inf"), *FINITE_FILLS])
def test_no_key_at_all_gives_zero_as_the_original(fill):
    q, k, v = _qkv(3, 0, grad=True)
    keep = torch.ones(2, 0, dtype=torch.bool)
    expected = Padded(fill)(q, k, v, keep)
    assert expected.shape == (2, 2, 3, 8) and not expected.any()
    assert_fused_equal(Padded(fill), (q, k, v, keep))


class ScaledCausal(nn.Module):
    """A causal ``-inf`` fill after a scale that may be negative or zero, on the scores or on q."""

    def __init__(self, scale: float, on_q: bool):
        super().__init__()
        self.scale, self.on_q = scale, on_q

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        scores = (q * self.scale) @ k.transpose(-2, -1) if self.on_q else (q @ k.transpose(-2, -1)) * self.scale
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(S - L + 1), float("-inf"))
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("scale", [-0.3, -2.0, -1e-3, 0.0])
@pytest.mark.parametrize("on_q", [False, True])
@pytest.mark.parametrize("L,S", [(10, 10), (4, 9), (300, 300)])
def test_nonpositive_scale_with_a_causal_fill(scale, on_q, L, S):
    q, k, v = _qkv(L, S, grad=True)
    assert_fused_equal(ScaledCausal(scale, on_q), (q, k, v))


# ----------------------------------------------------------------------------- bias rows beyond the kernels' range

def _low_rows_bias(dtype: torch.dtype, distinct: bool = False) -> torch.Tensor:
    """transformers' additive mask for a left-padded batch: the first query rows of batch row 1 are ``finfo.min``
    throughout (or, with ``distinct``, two values that low)."""
    bias = torch.zeros(2, 1, 6, 6, dtype=dtype)
    low = torch.finfo(dtype).min
    bias[1, :, :2] = low
    if distinct:
        bias[1, :, 0, :3] = low * 0.9
    return bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_beyond_the_kernels_range_are_found(dtype):
    """Rows of ``finfo.min`` (fp32's or bf16's) overflow a fused kernel's ``exp2`` scaling: found and exact."""
    from attnfuse.kernels.rows import bias_rows

    def rows_beyond_kernel_range(bias, full_keep, dropout_p):
        found = bias_rows(bias, full_keep, dropout_p, fill_is_neginf=False)
        return found.far, found.exact

    rows, exact = rows_beyond_kernel_range(_low_rows_bias(dtype), None, 0.0)
    assert exact and rows is not None
    assert rows[1, 0, :2].all() and not rows[1, 0, 2:].any() and not rows[0].any()
    assert rows_beyond_kernel_range(_low_rows_bias(dtype, distinct=True), None, 0.0)[1] is False
    assert rows_beyond_kernel_range(_low_rows_bias(dtype), None, 0.1)[1] is False  # dropout(uniform) is random
    assert rows_beyond_kernel_range(torch.full((1, 1, 2, 3), -65504.0, dtype=torch.float16), None, 0.0) == (None, True)


@pytest.mark.parametrize("distinct", [False, True])
def test_low_bias_rows_give_the_original(distinct):
    """A row of one value below the range is the mean of v (as the original's absorbed softmax); a row of distinct
    values that low runs unfused and says so."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    bias = _low_rows_bias(torch.float32, distinct)
    kernels = []
    with torch.no_grad():
        out = attnfuse.attend(q, k, v, bias=bias, scale=0.3, on_kernel=kernels.append)
    expected = ((q @ k.transpose(-1, -2)) * 0.3 + bias).softmax(-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (kernels[-1] == "unfused math (a bias row beyond the kernels' range)") == distinct, kernels


# ----------------------------------------------------------------------------- an added mask of 0 and a fill

class AddedMaskBuiltInGraph(nn.Module):
    """transformers' eager mask: a boolean keep built from a padding mask (and causal), turned into ``0 / fill``
    with ``where`` (or ``masked_fill`` on zeros), sliced to the keys and added to the scores."""

    def __init__(self, fill_of, spelling: str, causal: bool):
        super().__init__()
        self.fill_of, self.spelling, self.causal = fill_of, spelling, causal

    def forward(self, q, k, v, padding):
        L, S = q.shape[-2], k.shape[-2]
        keep = padding[:, None, None, :].bool()
        if self.causal:
            keep = keep & (torch.arange(S)[None, :] <= torch.arange(L)[:, None] + S - L)
        fill = self.fill_of(q.dtype)
        if self.spelling == "where":
            mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), fill)
        else:
            mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, fill)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + mask[..., :S]
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


@given(L=st.integers(1, 9), S=st.integers(1, 12), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       spelling=st.sampled_from(["where", "masked_fill"]), causal=st.booleans(),
       padded=st.lists(st.integers(0, 11), max_size=3), scale=st.sampled_from([1.0, 30.0]))
def test_added_mask_rows_of_fill_are_computed_by_the_kernel_without_a_host_read(L, S, dtype, spelling, causal,
                                                                               padded, scale):
    """A ``0 / finfo.min`` mask built in the graph is proven two-valued: its rows of fill (a left-padded query, a
    fully padded sequence) are the original's uniform rows, which the kernel computes once the fill is raised into
    its range; inference reads nothing of the bias on the host. Outputs equal the original's; with gradients too."""
    from _pytest.monkeypatch import MonkeyPatch

    g = torch.Generator().manual_seed(L * 31 + S)
    scale = scale if dtype == torch.float32 else 1.0  # bf16 rounds the original's sharp scores too coarsely
    q, k, v = (torch.randn(3, 2, n, 8, generator=g).mul(scale if i == 0 else 1).to(dtype)
               for i, n in enumerate((L, S, S)))
    padding = torch.ones(3, S, dtype=torch.long)
    for j in padded:
        padding[1, : j % (S + 1)] = 0  # left padding of sequence 1
    padding[2] = 0  # a sequence of padding only: every row of it is all fill
    module = AddedMaskBuiltInGraph(lambda dt: torch.finfo(dt).min, spelling, causal)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    with MonkeyPatch.context() as patch:
        # (its padding alone may be read, once a graph call, to leave an all-ones padding out: ``attnfuse.unpadded``)
        reads = count_host_reads(patch, of=("dominance", "guards", "rows", "sdpa"))
        with torch.no_grad():
            report = assert_fused_equal(module, (q, k, v, padding), atol=atol, rtol=atol)
        assert reads == [], f"{len(reads)} host reads of the bias in inference"
    assert report.sites[0].status == "fused"
    assert_fused_equal(module, (q.float().requires_grad_(), k.float(), v.float().requires_grad_(), padding))


def test_a_mask_of_fill_alone_is_a_fill_only_where_proven():
    """Look-alikes keep the per-call reads: a fill that does not absorb every score (fp16's lowest, -1e9), a ``-inf``
    fill, a mask whose other value is not 0, and a mask handed in at run time."""
    from attnfuse.capture import backend_for
    from attnfuse.options import Options

    def fills_of(module, *args):
        plans = []

        def grab(gm, example_inputs):
            compiled = backend_for(Options())(gm, example_inputs).graph_module
            plans.extend(node.target.plan for node in compiled.graph.nodes if hasattr(node.target, "plan"))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(module, backend=grab, dynamic=False)(*args)
        return [plan.bias_fill for plan in plans]

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    padding = torch.ones(2, 5, dtype=torch.long)
    fp32_min = torch.finfo(torch.float32).min
    assert fills_of(AddedMaskBuiltInGraph(lambda dt: torch.finfo(dt).min, "where", True), q, k, v, padding) == [fp32_min]
    assert fills_of(AddedMaskBuiltInGraph(lambda dt: torch.finfo(dt).min, "masked_fill", False), q, k, v, padding) \
        == [fp32_min]
    for fill in (-1e9, float("-inf")):
        assert fills_of(AddedMaskBuiltInGraph(lambda dt, f=fill: f, "where", True), q, k, v, padding) == [None]

    class NotZero(nn.Module):
        def forward(self, q, k, v, padding):
            mask = torch.where(padding[:, None, None, :].bool(), 1.0, torch.finfo(q.dtype).min)
            return (q @ k.transpose(-2, -1) + mask).softmax(-1) @ v

    assert fills_of(NotZero(), q, k, v, padding) == [None]
    bias = torch.zeros(2, 1, 5, 5)
    assert fills_of(RuntimeBias(), q, k, v, bias, None) == [None]


class AddedMaskBesideAKeepMask(nn.Module):
    """An added ``0 / finfo.min`` mask and a ``masked_fill`` with a milder fill on the same scores: a row whose kept
    keys all hold ``finfo.min`` weighs the masked keys (filled with -1e9) instead, as the original computes."""

    def forward(self, q, k, v, padding, keep):
        mask = torch.where(padding[:, None, None, :].bool(), torch.tensor(0.0), torch.finfo(q.dtype).min)
        scores = (q @ k.transpose(-2, -1) + mask).masked_fill(~keep, -1e9)
        return scores.softmax(-1) @ v


def test_an_added_mask_beside_a_keep_mask_keeps_the_per_call_reads():
    q, k, v = _qkv(3, 5)
    padding = torch.ones(2, 5, dtype=torch.long)
    padding[1, :3] = 0
    keep = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    keep[1, :, 0, 3:] = False  # row 0 of sequence 1 keeps only padded keys (bias finfo.min), masks the others
    with torch.no_grad():
        assert_fused_equal(AddedMaskBesideAKeepMask(), (q, k, v, padding, keep))

"""Crashes in the rewrite (issue 13, family 9): chained sites, q broadcast over batch or heads, and
models that use ``torch.vmap``. Each must fuse with equal outputs and gradients, or be skipped with a
reason; ``audit`` and ``optimize`` must never raise where the model runs.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from attnfuse import lower
from helpers import assert_fused_equal


def _randn(*shape, seed=0, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def attention(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def einsum_attention(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhij,bhjd->bhid", s.softmax(dim=-1), v)


# ----------------------------------------------------------------------------- chained sites

class Chained(nn.Module):
    """``attn(attn(q, k, v), k, v)``: the second site's q is the first site's output."""

    def forward(self, q, k, v):
        return attention(attention(q, k, v), k, v)


class ChainedThroughTransposes(nn.Module):
    def forward(self, q, k, v):
        first = attention(q, k, v).transpose(1, 2)  # (b, n, h, d), as a model would keep it
        return einsum_attention(first.transpose(1, 2), k, v)


class ChainedAsKeysAndValues(nn.Module):
    """The first output is the second site's k and v (and a third site reads both)."""

    def forward(self, q, k, v):
        first = attention(q, k, v)
        second = attention(q, first, first)
        return attention(second, first, second)


class ChainedWithCausalMask(nn.Module):
    def forward(self, q, k, v):
        L = q.shape[-2]
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        first = (q @ k.transpose(-2, -1) * 0.3).masked_fill(mask, float("-inf")).softmax(-1) @ v
        return (first @ k.transpose(-2, -1) * 0.3).masked_fill(mask, float("-inf")).softmax(-1) @ first


class ThreeDeep(nn.Module):
    def forward(self, q, k, v):
        return attention(attention(attention(q, k, v), k, v).transpose(-2, -1).transpose(-2, -1), k, v)


CHAINED = [(Chained, 2), (ChainedThroughTransposes, 2), (ChainedAsKeysAndValues, 3), (ChainedWithCausalMask, 2),
           (ThreeDeep, 3)]


@pytest.mark.parametrize("cls,sites", CHAINED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_chained_sites_fuse(cls, sites, monkeypatch):
    q, k, v = _randn(2, 3, 6, 8), _randn(2, 3, 6, 8, seed=1), _randn(2, 3, 6, 8, seed=2)
    calls = []
    real = lower.run_site
    monkeypatch.setattr(lower, "run_site", lambda plan, *t: calls.append(plan) or real(plan, *t))
    assert_fused_equal(cls(), (q, k, v), fused=sites)  # one report row per site, also on one source line
    assert len(calls) == sites  # every site ran fused in the one forward call


@pytest.mark.parametrize("cls", [Chained, ChainedAsKeysAndValues, ThreeDeep], ids=lambda c: c.__name__)
def test_chained_sites_audit(cls):
    q, k, v = (_randn(2, 3, 6, 8, seed=seed, grad=False) for seed in range(3))
    report = attnfuse.audit(cls(), q, k, v)
    sites = dict(CHAINED)[cls]
    assert report.fused == sites and report.skipped == 0, str(report)


# ----------------------------------------------------------------------------- q broadcast over batch or heads

class LatentQueries(nn.Module):
    """Perceiver / Q-Former style: learned queries ``(1, H, L, d)`` against keys ``(B, H, S, d)``."""

    def __init__(self, heads=4, latents=5, d=8, leading=(1,)):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(*leading, heads, latents, d))

    def forward(self, k, v):
        return attention(self.latents, k, v)


class OneQueryHead(nn.Module):
    """q ``(B, 1, L, d)`` against several kv heads: the scores broadcast q over the heads."""

    def forward(self, q, k, v):
        return attention(q, k, v)


class OneQueryHeadGrouped(nn.Module):
    """q with one head, k/v repeat-interleaved from 2 to 4 heads."""

    def forward(self, q, k, v):
        return attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))


class LatentBmm(nn.Module):
    """3-d ``bmm``-style latents ``(1, L, d)`` against ``(B, S, d)`` (matmul broadcasts the batch)."""

    def __init__(self, latents=5, d=8):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, latents, d))

    def forward(self, k, v):
        return torch.softmax(torch.matmul(self.latents, k.transpose(1, 2)) * 0.25, dim=-1) @ v


class SharedKeysAcrossBatch(nn.Module):
    """k, v ``(1, H, S, d)`` shared by a batch of queries, one of them with a leading extra axis."""

    def forward(self, q, k, v):
        return attention(q, k, v)


def test_latent_queries_against_a_batch():
    assert_fused_equal(LatentQueries(), (_randn(3, 4, 7, 8), _randn(3, 4, 7, 8, seed=1)))


def test_latent_queries_with_an_extra_batch_axis():
    module = LatentQueries(leading=(1, 1))
    assert_fused_equal(module, (_randn(2, 3, 4, 7, 8), _randn(2, 3, 4, 7, 8, seed=1)))


def test_one_query_head_against_four_kv_heads():
    assert_fused_equal(OneQueryHead(), (_randn(3, 1, 5, 8), _randn(3, 4, 6, 8, seed=1), _randn(3, 4, 6, 8, seed=2)))


def test_one_query_head_against_grouped_kv_heads():
    assert_fused_equal(OneQueryHeadGrouped(),
                       (_randn(3, 1, 5, 8), _randn(3, 2, 6, 8, seed=1), _randn(3, 2, 6, 8, seed=2)))


def test_latent_bmm():
    assert_fused_equal(LatentBmm(), (_randn(3, 6, 8), _randn(3, 6, 8, seed=1)))


def test_keys_shared_across_the_batch():
    q, k, v = _randn(3, 4, 5, 8), _randn(1, 4, 6, 8, seed=1), _randn(1, 4, 6, 8, seed=2)
    assert_fused_equal(SharedKeysAcrossBatch(), (q, k, v))


@given(q_batch=st.sampled_from([1, 3]), q_heads=st.sampled_from([1, 4]), kv_batch=st.sampled_from([1, 3]),
       kv_heads=st.sampled_from([1, 2, 4]), v_batch=st.sampled_from([1, 3]), L=st.integers(1, 5), S=st.integers(1, 5))
def test_broadcast_shapes(q_batch, q_heads, kv_batch, kv_heads, v_batch, L, S):
    """Every broadcast of q, k and v over batch and heads the original accepts fuses exactly."""
    q = _randn(q_batch, q_heads, L, 8)
    k, v = _randn(kv_batch, kv_heads, S, 8, seed=1), _randn(v_batch, kv_heads, S, 8, seed=2)
    if q_heads == 1 and kv_heads == 1:
        q = _randn(q_batch, 4, L, 8)  # at least one side has the heads
    torch._dynamo.reset()
    try:
        OneQueryHead()(q, k, v)
    except RuntimeError:
        return  # shapes the original rejects (4 query heads against 2 kv heads without a repeat)
    assert_fused_equal(OneQueryHead(), (q, k, v))


# ----------------------------------------------------------------------------- torch.vmap

class VmappedAttention(nn.Module):
    """Attention written per example and batched with ``torch.vmap`` (as streaming encoders do)."""

    def forward(self, q, k, v):
        return torch.vmap(attention)(q, k, v)


class VmapBesideAttention(nn.Module):
    """A vmapped non-attention function next to ordinary attention: the attention still fuses."""

    def forward(self, q, k, v):
        scaled = torch.vmap(lambda x: x * x.norm())(q)
        return attention(scaled, k, v)


def test_vmapped_attention_is_skipped_with_a_reason():
    q, k, v = _randn(3, 4, 6, 8), _randn(3, 4, 6, 8, seed=1), _randn(3, 4, 6, 8, seed=2)
    report = attnfuse.audit(VmappedAttention(), q, k, v)
    assert report.fused == 0 and report.skipped == 1
    assert "torch.vmap" in report.sites[0].reason
    assert_fused_equal(VmappedAttention(), (q, k, v), fused=0)


def test_vmap_beside_attention():
    q, k, v = _randn(3, 4, 6, 8), _randn(3, 4, 6, 8, seed=1), _randn(3, 4, 6, 8, seed=2)
    assert_fused_equal(VmapBesideAttention(), (q, k, v), fused=1)
    torch._dynamo.reset()
    assert attnfuse.audit(VmapBesideAttention(), q, k, v).fused == 1


def test_grad_transform_inside_the_model():
    """``torch.func.grad`` inside a forward: the graph keeps its transform bookkeeping."""

    class Energy(nn.Module):
        def forward(self, q, k, v):
            force = torch.func.grad(lambda x: attention(x, k, v).square().sum())(q)
            return attention(q + force, k, v)

    q, k, v = (_randn(2, 2, 4, 8, seed=s, grad=False) for s in range(3))
    expected = Energy()(q, k, v)
    torch._dynamo.reset()
    optimized = attnfuse.optimize(Energy())
    torch.testing.assert_close(optimized(q, k, v), expected)
    torch._dynamo.reset()
    attnfuse.audit(Energy(), q, k, v)


class VmapBuiltMask(nn.Module):
    """A mask built per (query, key) pair with nested ``torch.vmap`` (transformers' ``use_vmap`` mask
    functions), used by ordinary attention outside the vmap."""

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        rule = lambda i, j: (j // self.chunk) <= (i // self.chunk)  # noqa: E731
        keep = torch.vmap(torch.vmap(rule, in_dims=(None, 0)), in_dims=(0, None))(torch.arange(L), torch.arange(S))
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return s.masked_fill(~keep, torch.finfo(s.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("chunk", [1, 3])
def test_mask_built_with_vmap(chunk):
    q, k, v = _randn(2, 3, 6, 8), _randn(2, 3, 6, 8, seed=1), _randn(2, 3, 6, 8, seed=2)
    assert_fused_equal(VmapBuiltMask(chunk), (q, k, v))
    torch._dynamo.reset()
    assert attnfuse.audit(VmapBuiltMask(chunk), q, k, v).fused == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["latent", "one_head", "shared_kv"])
def test_gpu_broadcast_q(case, dtype):
    """Expanded (stride-0) q, k or v on every CUDA kernel the dispatcher picks."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"latent": ((1, 8, 64, 64), (4, 8, 256, 64)), "one_head": ((4, 1, 128, 64), (4, 8, 256, 64)),
              "shared_kv": ((4, 8, 128, 64), (1, 8, 256, 64))}[case]
    q = torch.randn(*shapes[0], device="cuda", generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(*shapes[1], device="cuda", generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    torch._dynamo.reset()
    optimized = attnfuse.optimize(OneQueryHead())
    out = optimized(q, k, v)
    assert attnfuse.report(optimized).fused == 1
    high = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = OneQueryHead()(*high)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    expected.square().sum().backward()
    for low, ref in zip((q, k, v), high):
        tolerance = 5e-2 * (1 + ref.grad.abs().max().item())
        torch.testing.assert_close(low.grad.double(), ref.grad, atol=tolerance, rtol=5e-2)

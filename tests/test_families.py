"""Common hand-written attention spellings from well-known code bases, reproduced as small modules.

Each module is written for this test from the spelling it is named after (nanoGPT/minGPT, timm,
diffusers, lucidrains-style cross-attention, ALiBi, KV-cache decoding, ...), not copied. The spellings
must fuse with equal outputs and input gradients (fp32, CPU); the look-alikes at the end change the
math between the softmax and the value product and must be reported as skipped, never fused.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import einsum, nn

import attnfuse
from helpers import assert_fused_equal, grads, run_both


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(grad)


def bhnd(b: int = 2, h: int = 3, i: int = 5, j: int = 5, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q ``(b, h, i, d)``, k and v ``(b, h, j, d)``, all requiring grad."""
    return randn(b, h, i, d, seed=seed), randn(b, h, j, d, seed=seed + 1), randn(b, h, j, d, seed=seed + 2)


def _seeded(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


# ----------------------------------------------------------------------------- nanoGPT / minGPT

class NanoGPTSelfAttention(nn.Module):
    """Causal self-attention with a registered ``tril`` buffer named ``bias``, filled with ``-inf``."""

    def __init__(self, n_embd: int = 32, n_head: int = 4, block_size: int = 16, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


@pytest.mark.parametrize("T", [1, 7, 16])
def test_nanogpt(T):
    assert_fused_equal(_seeded(NanoGPTSelfAttention), (randn(2, T, 32),))


# ----------------------------------------------------------------------------- timm vision attention

class TimmAttention(nn.Module):
    """timm ``Attention`` with fused attention off: qkv linear, permute(2, 0, 3, 1, 4), scale on q."""

    def __init__(self, dim: int = 32, num_heads: int = 4, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


@pytest.mark.parametrize("N", [1, 5, 17])
def test_timm_vision_attention(N):
    report = assert_fused_equal(_seeded(TimmAttention), (randn(2, N, 32),))
    features = report.sites[0].features
    assert not features["causal"] and not features["mask"], features


# ----------------------------------------------------------------------------- diffusers AttnProcessor

class DiffusersAttention(nn.Module):
    """diffusers' classic ``AttnProcessor``: heads folded into the batch, ``baddbmm`` scores, ``bmm`` output.

    Without a mask the ``baddbmm`` input is ``torch.empty`` with ``beta=0``; with an additive mask
    ``(b*h, 1, j)`` it is the mask with ``beta=1``, as ``get_attention_scores`` does.
    """

    def __init__(self, query_dim: int = 32, cross_dim: int | None = None, heads: int = 4, dim_head: int = 8):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(cross_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(cross_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def head_to_batch_dim(self, tensor):
        batch_size, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_size, seq_len, self.heads, dim // self.heads)
        return tensor.permute(0, 2, 1, 3).reshape(batch_size * self.heads, seq_len, dim // self.heads)

    def batch_to_head_dim(self, tensor):
        batch_size, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_size // self.heads, self.heads, seq_len, dim)
        return tensor.permute(0, 2, 1, 3).reshape(batch_size // self.heads, seq_len, dim * self.heads)

    def get_attention_scores(self, query, key, attention_mask=None):
        if attention_mask is None:
            baddbmm_input = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                        device=query.device)
            beta = 0
        else:
            baddbmm_input = attention_mask
            beta = 1
        attention_scores = torch.baddbmm(baddbmm_input, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        return attention_scores.softmax(dim=-1)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:  # (b, j) keep-mask -> additive (b*h, 1, j)
            additive = (1.0 - attention_mask.to(hidden_states.dtype)) * -10000.0
            attention_mask = additive.repeat_interleave(self.heads, dim=0)[:, None, :]
        query = self.head_to_batch_dim(self.to_q(hidden_states))
        key = self.head_to_batch_dim(self.to_k(context))
        value = self.head_to_batch_dim(self.to_v(context))
        probs = self.get_attention_scores(query, key, attention_mask)
        out = self.batch_to_head_dim(torch.bmm(probs, value))
        return self.to_out[1](self.to_out[0](out))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_diffusers_baddbmm(cross):
    module = _seeded(DiffusersAttention, cross_dim=24 if cross else None)
    args = (randn(2, 6, 32), randn(2, 9, 24, seed=1) if cross else None)
    report = assert_fused_equal(module, args)
    assert abs(report.sites[0].features["scale"] - 8 ** -0.5) < 1e-6, report.sites[0].features


def test_diffusers_baddbmm_with_additive_mask():
    module = _seeded(DiffusersAttention, cross_dim=24)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False
    assert_fused_equal(module, (randn(2, 6, 32), randn(2, 9, 24, seed=1), keep))


# ----------------------------------------------------------------------------- cross-attention, torch.where padding

class WhereMaskCrossAttention(nn.Module):
    """Cross-attention (q_len != k_len) with key padding by ``torch.where(mask, sim, finfo.min)``."""

    def __init__(self, dim: int = 32, context_dim: int = 24, heads: int = 4, dim_head: int = 8):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, context, mask):
        b, i, _ = x.shape
        j, h = context.shape[1], self.heads
        q = self.to_q(x).view(b, i, h, -1).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k, v = (t.view(b, j, h, -1).transpose(1, 2) for t in (k, v))
        sim = einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        sim = torch.where(mask[:, None, None, :], sim, torch.finfo(sim.dtype).min)
        attn = sim.softmax(dim=-1)
        out = einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, i, -1))


def test_cross_attention_where_padding_with_fully_masked_row():
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # every key of this row is masked: the original attends uniformly
    report = assert_fused_equal(_seeded(WhereMaskCrossAttention), (randn(3, 5, 32), randn(3, 7, 24, seed=1), mask))
    features = report.sites[0].features
    assert (features["q_len"], features["k_len"]) == (5, 7), features


# ----------------------------------------------------------------------------- ALiBi

class AlibiCausalAttention(nn.Module):
    """ALiBi: ``-|j - i| * slope[h]`` from ``arange`` differences, added to the scores, then causal."""

    def __init__(self, heads: int = 4):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (n + 1) / heads) for n in range(heads)])
        self.register_buffer("slopes", slopes.view(heads, 1, 1), persistent=False)

    def forward(self, q, k, v):
        sim = einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        i, j = sim.shape[-2:]
        i_arange = torch.arange(j - i, j, device=q.device)
        j_arange = torch.arange(j, device=q.device)
        bias = -torch.abs(j_arange[None, None, :] - i_arange[None, :, None])
        sim = sim + bias * self.slopes
        causal_mask = torch.ones((i, j), dtype=torch.bool, device=q.device).triu(j - i + 1)
        sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        return einsum("b h i j, b h j d -> b h i d", attn, v)


@pytest.mark.parametrize("i,j", [(6, 6), (3, 8)])
def test_alibi_causal(i, j):
    report = assert_fused_equal(AlibiCausalAttention().eval(), bhnd(h=4, i=i, j=j))
    assert report.sites[0].features["causal"], report.sites[0].features


# ----------------------------------------------------------------------------- KV-cache decoding

class KVCacheAttention(nn.Module):
    """Decoding step: new k/v appended to a cache, ``i`` queries against ``j > i`` keys, bottom-right causal."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, k_cache, v_cache):
        b, i, dim = x.shape
        q, k, v = (t.view(b, i, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        k = torch.cat((k_cache, k), dim=-2)
        v = torch.cat((v_cache, v), dim=-2)
        j = k.shape[-2]
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        causal = torch.triu(torch.ones(i, j, dtype=torch.bool, device=x.device), j - i + 1)
        scores = scores.masked_fill(causal, float("-inf"))
        attn = scores.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, i, dim)
        return self.to_out(out)


@pytest.mark.parametrize("new", [1, 3])
def test_kv_cache_decoding(new):
    cached = 9
    args = (randn(2, new, 32), randn(2, 4, cached, 8, seed=1), randn(2, 4, cached, 8, seed=2))
    report = assert_fused_equal(_seeded(KVCacheAttention), args)
    features = report.sites[0].features
    assert (features["q_len"], features["k_len"]) == (new, cached + new), features
    if new > 1:
        assert features["causal"] == "bottom_right", features


# ----------------------------------------------------------------------------- softmax spellings and casts

SOFTMAXES = {
    "float_then_to": lambda s, q: s.float().softmax(-1).to(q.dtype),
    "F_dtype_float32_type_as": lambda s, q: F.softmax(s, dim=-1, dtype=torch.float32).type_as(s),
    "F_softmax_-1": lambda s, q: F.softmax(s, dim=-1),
    "F_softmax_3": lambda s, q: F.softmax(s, dim=3),
    "torch_softmax_-1": lambda s, q: torch.softmax(s, -1),
    "torch_softmax_3": lambda s, q: torch.softmax(s, dim=3),
    "Tensor_softmax_-1": lambda s, q: s.softmax(dim=-1),
    "Tensor_softmax_3": lambda s, q: s.softmax(3),
}


class SoftmaxSpelling(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.softmax = SOFTMAXES[spelling]

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        attn = self.softmax(scores, q)
        return torch.matmul(attn, v)


@pytest.mark.parametrize("spelling", list(SOFTMAXES))
def test_softmax_spellings(spelling):
    assert_fused_equal(SoftmaxSpelling(spelling).eval(), bhnd(i=4, j=6))


# ----------------------------------------------------------------------------- BSHD einsum layout

class BSHDEinsumAttention(nn.Module):
    """q, k, v laid out ``(batch, seq, heads, dim)``; the output stays in that layout."""

    def forward(self, q, k, v):
        sim = einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        attn = sim.softmax(dim=-1)
        return einsum("bhij,bjhd->bihd", attn, v)


@pytest.mark.parametrize("i,j", [(5, 5), (4, 7)])
def test_bshd_einsum(i, j):
    args = (randn(2, i, 3, 8), randn(2, j, 3, 8, seed=1), randn(2, j, 3, 8, seed=2))
    report = assert_fused_equal(BSHDEinsumAttention().eval(), args)
    features = report.sites[0].features
    assert features["q_heads"] == 3 and (features["q_len"], features["k_len"]) == (i, j), features


# ----------------------------------------------------------------------------- look-alikes: never fused

class MixHeadsAfterSoftmax(nn.Module):
    """Talking heads: the probabilities are mixed across heads before the value product."""

    def __init__(self, heads: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Parameter(torch.randn(heads, heads))

    def forward(self, q, k, v):
        attn = (einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = einsum("bhij,hg->bgij", attn, self.mix)
        return einsum("bhij,bhjd->bhid", attn, v)


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-2)
        return attn @ v


class RescaledProbabilities(nn.Module):
    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = attn * 2
        return attn @ v


class ZeroedProbabilities(nn.Module):
    """Probabilities zeroed after the softmax (no renormalization): not an attention mask."""

    def forward(self, q, k, v, mask):
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = attn.masked_fill(mask[:, None, None, :], 0.0)
        return attn @ v


class ReturnsWeights(nn.Module):
    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return attn @ v, attn


def _flat(out) -> torch.Tensor:
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out


def assert_skipped_equal(module: nn.Module, args: tuple) -> attnfuse.FusionReport:
    """Optimize a copy of ``module``: exactly one site, skipped with a reason; outputs and gradients unchanged."""
    torch._dynamo.reset()
    expected, actual, report, ref_args, opt_args = run_both(module, args)
    assert report.fused == 0 and report.skipped == 1, str(report)
    assert report.sites[0].reason, str(report)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    g_expected = grads(_flat(expected), [ref_args[i] for i in differentiable])
    g_actual = grads(_flat(actual), [opt_args[i] for i in differentiable])
    for e, a in zip(g_expected, g_actual):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)
    return report


def _padding(b: int = 2, j: int = 6) -> torch.Tensor:
    mask = torch.zeros(b, j, dtype=torch.bool)
    mask[1, 4:] = True
    return mask


LOOKALIKES = {
    "mix_heads_after_softmax": lambda: (MixHeadsAfterSoftmax().eval(), bhnd(i=4, j=6)),
    "softmax_over_queries": lambda: (SoftmaxOverQueries().eval(), bhnd(i=4, j=6)),
    "probabilities_times_2": lambda: (RescaledProbabilities().eval(), bhnd(i=4, j=6)),
    "probabilities_masked_fill_0": lambda: (ZeroedProbabilities().eval(), (*bhnd(i=4, j=6), _padding())),
    "returns_weights": lambda: (ReturnsWeights().eval(), bhnd(i=4, j=6)),
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_lookalike_is_not_fused(name):
    module, args = LOOKALIKES[name]()
    assert_skipped_equal(module, args)

"""Mixed dtypes (issue 13, family 3): the fused site computes in the precision the original did.

Each spelling runs in bf16/fp16 and is compared with an fp64 computation of the same math: the fused
model's error must be no worse than the unrewritten model's (up to a little rounding noise), and it
must run where the original runs. Biases added in fp32 to half-precision scores stay fp32.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from attnfuse.precision import bias_dtype, site_dtype
from helpers import assert_fused_equal

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def _qkv(b=2, h=4, L=16, S=16, d=8, dtype=bf16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(grad) for n in (L, S, S))


def _truth(q, k, v, scale, bias=None):
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.double()
    return s.softmax(-1) @ v.double()


def _errors(module, args, truth, **options):
    """(fused error, original error) against ``truth``, and the fused report."""
    torch._dynamo.reset()
    reference = copy.deepcopy(module)
    optimized = attnfuse.optimize(copy.deepcopy(module), **options)
    expected, actual = reference(*args), optimized(*args)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    return ((actual.double() - truth).abs().max().item(), (expected.double() - truth).abs().max().item(),
            attnfuse.report(optimized))


def _assert_no_worse(fused_error, original_error, dtype):
    slack = {bf16: 4e-3, fp16: 5e-4, fp32: 1e-6, fp64: 1e-12}[dtype]
    assert fused_error <= 1.25 * original_error + slack, (fused_error, original_error)


# ----------------------------------------------------------------------------- mixed-dtype spellings

class TutorialScale(nn.Module):
    """``/ torch.sqrt(torch.tensor(d_k, dtype=torch.float32))``: a 0-d fp32 tensor does not promote bf16."""

    def forward(self, q, k, v):
        d_k = q.size(-1)
        s = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(torch.tensor(d_k, dtype=torch.float32))
        return torch.softmax(s, dim=-1) @ v


class Float64Temperature(nn.Module):
    """A 0-d fp64 temperature buffer dividing bf16 scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(8.0 ** 0.5, dtype=fp64))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) / self.temperature).softmax(-1) @ v


class DoubleValueProduct(nn.Module):
    """``softmax(...).double() @ v.double()`` in a half model: the output is fp64."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1).double() @ v.double()


class FloatValueProduct(nn.Module):
    """bf16 q/k, ``@ v.float()``: the value product (and output) in fp32."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1).float() @ v.float()


class GPTJStyle(nn.Module):
    """transformers' GPT-J: q and k upcast to fp32, softmax in fp32, ``.to(v.dtype)`` before ``@ v``."""

    def forward(self, q, k, v):
        q, k = q.to(torch.float32), k.to(torch.float32)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        return torch.softmax(s, dim=-1).to(v.dtype) @ v


class PerHeadFloatTemperature(nn.Module):
    """An fp32 ``(h, 1, 1)`` learned temperature: promotes the bf16 scores to fp32."""

    def __init__(self, h=4):
        super().__init__()
        self.scale = nn.Parameter(torch.full((h, 1, 1), 8 ** -0.5, dtype=fp32))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1).type_as(v) @ v


class Float32Softmax(nn.Module):
    """``softmax(..., dtype=torch.float32).to(q.dtype)`` (transformers' eager attention)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 8 ** -0.5
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


MIXED = [TutorialScale, Float64Temperature, DoubleValueProduct, FloatValueProduct, GPTJStyle,
         PerHeadFloatTemperature, Float32Softmax]


@pytest.mark.parametrize("dtype", [bf16, fp16])
@pytest.mark.parametrize("cls", MIXED, ids=lambda c: c.__name__)
def test_mixed_dtype_spellings_fuse_and_stay_as_accurate(cls, dtype):
    q, k, v = _qkv(dtype=dtype, L=40, S=48)
    fused_error, original_error, report = _errors(cls(), (q, k, v), _truth(q, k, v, 8 ** -0.5))
    assert report.fused == 1, str(report)
    output_dtype = {DoubleValueProduct: fp64, FloatValueProduct: fp32}.get(cls, dtype)
    _assert_no_worse(fused_error, original_error, output_dtype)


@pytest.mark.parametrize("cls", [GPTJStyle, PerHeadFloatTemperature, FloatValueProduct], ids=lambda c: c.__name__)
def test_mixed_dtype_gradients_stay_as_accurate(cls):
    """Input gradients against fp64 gradients of the same math: no worse than the original's."""
    module = cls()
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(copy.deepcopy(module))
    base = _qkv(dtype=bf16, L=24, S=24, seed=3)
    truth_inputs = [t.double().requires_grad_() for t in base]
    out = _truth(*truth_inputs, 8 ** -0.5)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=fp64)
    truth = torch.autograd.grad((out * weight).sum(), truth_inputs)
    errors = []
    for model in (optimized, reference):
        inputs = [t.detach().clone().requires_grad_() for t in base]
        result = model(*inputs)
        found = torch.autograd.grad((result.double() * weight).sum(), inputs)
        errors.append(max((f.double() - t).abs().max().item() for f, t in zip(found, truth)))
    assert attnfuse.report(optimized).fused == 1
    _assert_no_worse(errors[0], errors[1], bf16)


def test_fp16_and_bf16_operands_compute_in_fp32():
    """bf16 q/k with an fp16 v promote to fp32 in the original; so does the fused site."""

    class Mixed(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1).to(v.dtype).float() @ v.float()

    q, k, _ = _qkv(dtype=bf16, L=8, S=8)
    v = _qkv(dtype=fp16, L=8, S=8, seed=1)[2]
    fused_error, original_error, report = _errors(Mixed(), (q, k, v), _truth(q, k, v, 8 ** -0.5))
    assert report.fused == 1
    _assert_no_worse(fused_error, original_error, fp32)


# ----------------------------------------------------------------------------- fp32 biases on half scores

class RuntimeBias(nn.Module):
    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
        return s.softmax(-1).to(q.dtype) @ v


class Float32Alibi(nn.Module):
    """ALiBi from fp32 slopes computed in the forward: an fp32 bias on bf16 scores."""

    def forward(self, q, k, v):
        h, L, S = q.shape[1], q.shape[-2], k.shape[-2]
        slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=q.device)
        position = torch.arange(S, device=q.device)[None, :] - torch.arange(L, device=q.device)[:, None]
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + slopes[:, None, None] * position
        return s.softmax(-1).to(q.dtype) @ v


class Float32RelativeTable(nn.Module):
    """A learned fp32 relative-position table gathered by position difference (a bf16 model that
    kept its table in fp32)."""

    def __init__(self, h=4, max_distance=96):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.randn(h, 2 * max_distance + 1, generator=g) * 3)

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        relative = torch.arange(S)[None, :] - torch.arange(L)[:, None] + self.max_distance
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + self.table[:, relative]
        return s.softmax(-1).to(q.dtype) @ v


def _alibi_truth_bias(h, L, S):
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float32)
    return slopes[:, None, None] * (torch.arange(S)[None, :] - torch.arange(L)[:, None])


def test_fp32_alibi_at_600_tokens_is_as_accurate_as_the_original():
    """The issue's case: rounding the bias to bf16 gave error 1.01 (fused) vs 0.023 (original)."""
    q, k, v = _qkv(b=1, L=600, S=600, dtype=bf16, seed=2)
    truth = _truth(q, k, v, 8 ** -0.5, _alibi_truth_bias(4, 600, 600))
    fused_error, original_error, report = _errors(Float32Alibi(), (q, k, v), truth)
    assert report.fused == 1
    _assert_no_worse(fused_error, original_error, bf16)


@given(dtype=st.sampled_from([bf16, fp16]), L=st.integers(1, 96), S=st.integers(1, 96),
       magnitude=st.sampled_from([0.1, 3.0, 30.0, 300.0]), kind=st.sampled_from(["runtime", "alibi", "table"]),
       with_mask=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fp32_biases_on_half_scores(dtype, L, S, magnitude, kind, with_mask, seed):
    q, k, v = _qkv(b=2, L=L, S=S, dtype=dtype, seed=seed)
    if kind == "runtime":
        g = torch.Generator().manual_seed(seed + 1)
        bias = torch.randn(1, 4, L, S, generator=g) * magnitude
        if with_mask:
            bias = bias.masked_fill(torch.rand(1, 1, 1, S, generator=g) > 0.7, torch.finfo(torch.float32).min)
            bias[..., 0] = 0.0  # every row keeps a key (a fully masked row is family 5's)
        module, args, truth_bias = RuntimeBias(), (q, k, v, bias), bias
    elif kind == "alibi":
        module, args, truth_bias = Float32Alibi(), (q, k, v), _alibi_truth_bias(4, L, S)
    else:
        module = Float32RelativeTable()
        with torch.no_grad():
            module.table.mul_(magnitude / 3)
        relative = torch.arange(S)[None, :] - torch.arange(L)[:, None] + module.max_distance
        module, args, truth_bias = module, (q, k, v), module.table.detach()[:, relative]
    fused_error, original_error, report = _errors(module, args, _truth(q, k, v, 8 ** -0.5, truth_bias))
    assert report.fused == 1, str(report)
    _assert_no_worse(fused_error, original_error, dtype)


def test_attend_adds_an_fp32_bias_in_fp32():
    """``attnfuse.attend`` with bf16 q/k/v and an fp32 bias: as accurate as adding it in fp32 by hand."""
    q, k, v = _qkv(b=1, L=300, S=300, dtype=bf16, seed=4)
    bias = torch.randn(1, 4, 300, 300, generator=torch.Generator().manual_seed(1)) * 50
    truth = _truth(q, k, v, 8 ** -0.5, bias)
    out = attnfuse.attend(q, k, v, bias=bias)
    by_hand = ((q @ k.transpose(-2, -1) * 8 ** -0.5) + bias).softmax(-1).to(bf16) @ v
    _assert_no_worse((out.double() - truth).abs().max().item(), (by_hand.double() - truth).abs().max().item(), bf16)
    rounded = attnfuse.attend(q, k, v, bias=bias.to(bf16))  # the old behaviour, to show the test can fail
    assert (rounded.double() - truth).abs().max().item() > 10 * (out.double() - truth).abs().max().item()


# ----------------------------------------------------------------------------- the precision rules

def test_site_dtype_rules():
    # GPT-J: bf16 operands (the upcasts peeled), fp32 scores: bf16 kernels compute scores in fp32
    assert site_dtype([bf16, bf16, bf16], bf16, [fp32, fp32, bf16]) == bf16
    # an fp32 bias on bf16 scores: bf16 kernels add it in fp32
    assert site_dtype([bf16, bf16, bf16], bf16, [bf16, fp32, fp32, bf16]) == bf16
    # the value product in fp32: the output must not be rounded to bf16
    assert site_dtype([bf16, bf16, fp32], fp32, [bf16, bf16]) == fp32
    # fp64 scores need fp64 kernels
    assert site_dtype([fp32, fp32, fp32], fp32, [fp32, fp64]) == fp64
    assert site_dtype([bf16, fp16, fp16], fp16, [fp32]) == fp32
    assert bias_dtype(bf16, fp32) == fp32 and bias_dtype(bf16, bf16) == bf16
    assert bias_dtype(bf16, fp64) == fp32 and bias_dtype(fp32, bf16) == fp32 and bias_dtype(fp16, bf16) == fp32


# ----------------------------------------------------------------------------- GPU (run with -m gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["runtime", "alibi"])
@pytest.mark.parametrize("grad", [False, True])
def test_gpu_fp32_bias_on_bf16_is_as_accurate_as_the_original(kind, grad):
    """cuDNN gives NaN for an fp32 mask with bf16 q/k/v and the other fused kernels round it: the call
    must run on FlexAttention or unfused, adding the bias in fp32."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    L = 600
    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", generator=g).to(bf16).requires_grad_(grad) for _ in range(3))
    if kind == "runtime":
        bias = torch.randn(1, 4, L, L, device="cuda", generator=g) * 30
        module, args = RuntimeBias(), (q, k, v, bias)
    else:
        bias = _alibi_truth_bias(4, L, L).cuda()
        module, args = Float32Alibi().cuda(), (q, k, v)
    truth = _truth(q, k, v, 64 ** -0.5, bias)
    optimized = attnfuse.optimize(copy.deepcopy(module))
    fused, original = optimized(*args), module(*args)
    assert attnfuse.report(optimized).fused == 1
    assert not fused.isnan().any()
    _assert_no_worse((fused.double() - truth).abs().max().item(), (original.double() - truth).abs().max().item(), bf16)


@pytest.mark.gpu
def test_gpu_exactly_representable_fp32_bias_stays_on_sdpa():
    """An fp32 0 / -inf padding bias loses nothing in bf16: it runs fused (narrowed on SDPA, or on Flex)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", generator=g).to(bf16) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 256, device="cuda")
    bias[0, ..., 200:] = float("-inf")
    ran: list[str] = []
    out = attnfuse.attend(q, k, v, bias=bias, on_kernel=ran.append)
    assert ran and "unfused" not in ran[0], ran
    truth = _truth(q, k, v, 64 ** -0.5, bias)
    assert (out.double() - truth).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("cls", MIXED, ids=lambda c: c.__name__)
def test_gpu_mixed_dtype_spellings(cls):
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 8, device="cuda", generator=g).to(bf16) for _ in range(3))
    module = cls().cuda()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    fused, original = optimized(q, k, v), module(q, k, v)
    assert attnfuse.report(optimized).fused == 1
    truth = _truth(q, k, v, 8 ** -0.5)
    dtype = {DoubleValueProduct: fp64, FloatValueProduct: fp32}.get(cls, bf16)
    _assert_no_worse((fused.double() - truth).abs().max().item(), (original.double() - truth).abs().max().item(), dtype)


def test_a_wide_bias_is_narrowed_only_when_nothing_changes():
    """The rule that lets the CUDA kernels take an fp32 bias in bf16 (CPU kernels take fp32 as it is)."""
    from attnfuse.kernels.sdpa import narrowed_exactly

    padding = torch.zeros(2, 1, 1, 8)
    padding[0, ..., 5:] = float("-inf")
    padding[1, ..., 6:] = torch.finfo(torch.float32).min
    narrow = narrowed_exactly(padding, bf16)
    assert narrow is not None and narrow.dtype == bf16
    assert narrow[1, 0, 0, 7] == torch.finfo(bf16).min and narrow[0, 0, 0, 7] == float("-inf")
    assert narrowed_exactly(torch.arange(-64.0, 64.0) * 0.5, bf16) is not None  # ALiBi offsets at slope 1/2
    assert narrowed_exactly(torch.full((4,), -10000.0), bf16) is None  # -10000 is -9984 in bf16
    assert narrowed_exactly(torch.tensor([0.1, 0.0]), bf16) is None
    assert narrowed_exactly(torch.tensor([float("nan")]), bf16) is None


class LearnedFloat32Bias(nn.Module):
    """A learned fp32 ``(h, L, S)`` bias on bf16 scores: its gradient is computed in fp32 by the original."""

    def __init__(self, h=4, L=24, S=24):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(h, L, S, generator=torch.Generator().manual_seed(2)) * 4)

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 8 ** -0.5 + self.bias).softmax(-1).to(q.dtype) @ v


def test_fp32_learned_bias_gradient_on_bf16():
    module = LearnedFloat32Bias()
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(copy.deepcopy(module))
    q, k, v = _qkv(L=24, S=24, seed=6)
    truth_bias = module.bias.detach().double().requires_grad_()
    out = _truth(q, k, v, 8 ** -0.5, truth_bias)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=fp64)
    truth = torch.autograd.grad((out * weight).sum(), truth_bias)[0]
    errors = []
    for model in (optimized, reference):
        result = model(q, k, v)
        (result.double() * weight).sum().backward()
        assert model.bias.grad.dtype == fp32
        errors.append((model.bias.grad.double() - truth).abs().max().item())
    assert attnfuse.report(optimized).fused == 1
    _assert_no_worse(errors[0], errors[1], bf16)


def test_fp64_bias_on_an_fp32_model_computes_in_fp64():
    """An fp64 bias promotes fp32 scores to fp64; fp32 kernels would round it (large offsets lose digits)."""
    q, k, v = _qkv(dtype=fp32, L=32, S=32, seed=7)
    bias = (torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(8), dtype=fp64) + 1e7)
    truth = _truth(q, k, v, 8 ** -0.5, bias)
    fused_error, original_error, report = _errors(RuntimeBias(), (q, k, v, bias), truth)
    assert report.fused == 1
    _assert_no_worse(fused_error, original_error, fp32)


# ----------------------------------------------------------------------------- a small grammar of casts

class CastProgram(nn.Module):
    """One attention with a cast, scale, bias or softmax dtype chosen at each point of the computation."""

    def __init__(self, qk_cast, factor, bias, softmax_dtype, probs_cast, v_cast):
        super().__init__()
        self.qk_cast, self.factor, self.bias_kind = qk_cast, factor, bias
        self.softmax_dtype, self.probs_cast, self.v_cast = softmax_dtype, probs_cast, v_cast
        self.register_buffer("temperature", torch.tensor(8 ** 0.5, dtype=fp64))
        self.register_buffer("head_scale", torch.full((4, 1, 1), 8 ** -0.5))
        self.register_buffer("bias", torch.randn(4, 1, 12, generator=torch.Generator().manual_seed(4)) * 5)

    def forward(self, q, k, v):
        if self.qk_cast is not None:
            q, k = q.to(self.qk_cast), k.to(self.qk_cast)
        s = q @ k.transpose(-2, -1)
        if self.factor == "float":
            s = s * 8 ** -0.5
        elif self.factor == "tensor_fp32":
            s = s / torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float32))
        elif self.factor == "buffer_fp64_0d":
            s = s / self.temperature
        else:
            s = s * self.head_scale
        if self.bias_kind == "fp32":
            s = s + self.bias
        elif self.bias_kind == "cast_to_scores":
            s = s + self.bias.to(s.dtype)
        p = torch.softmax(s, dim=-1, dtype=self.softmax_dtype)
        if self.probs_cast is not None:
            p = p.to(self.probs_cast)
        v = v if self.v_cast is None else v.to(self.v_cast)
        if p.dtype != v.dtype:
            p = p.to(v.dtype)
        return p @ v


@given(model=st.sampled_from([bf16, fp16, fp32]), qk_cast=st.sampled_from([None, fp32, fp64]),
       factor=st.sampled_from(["float", "tensor_fp32", "buffer_fp64_0d", "head_fp32"]),
       bias=st.sampled_from([None, "fp32", "cast_to_scores"]), softmax_dtype=st.sampled_from([None, fp32, fp64]),
       probs_cast=st.sampled_from([None, fp32, bf16]), v_cast=st.sampled_from([None, fp32, fp64]))
def test_cast_grammar(model, qk_cast, factor, bias, softmax_dtype, probs_cast, v_cast):
    """Every combination runs where the original runs, and is no less accurate than it against fp64."""
    module = CastProgram(qk_cast, factor, bias, softmax_dtype, probs_cast, v_cast)
    q, k, v = _qkv(L=10, S=12, dtype=model, seed=1)
    try:
        module(q, k, v)
    except RuntimeError:
        return  # a spelling the original itself rejects
    truth = _truth(q, k, v, 8 ** -0.5, module.bias if bias else None)
    fused_error, original_error, report = _errors(module, (q, k, v), truth)
    assert report.fused == 1, str(report)
    _assert_no_worse(fused_error, original_error, module(q, k, v).dtype)


class AdditiveMask(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, dim=-1) @ v


@given(L=st.integers(1, 7), pad=st.integers(0, 7), grad=st.booleans(), seed=st.integers(0, 3))
def test_fp16_rows_at_the_fp16_floor_match_the_original(L, pad, grad, seed):
    """transformers' 0 / finfo(fp16).min mask on a left-padded row: every key of the first rows is at
    -65504, where fp16's ``s + min`` rounds to min (a uniform row) but a kernel's fp32 sum does not."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, L, 8, generator=g, dtype=torch.float16).requires_grad_(grad) for _ in range(3))
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, :min(pad, L)] = False
    bias = torch.where(keep[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril(), 0.0,
                       torch.finfo(torch.float16).min).to(torch.float16)
    assert_fused_equal(AdditiveMask(), (q, k, v, bias), atol=2e-3, rtol=2e-3)

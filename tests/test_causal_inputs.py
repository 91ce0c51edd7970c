"""Inductor's causal form of a graph whose sites take a graph input as their one bias (``attnfuse.causal_inputs``).

Layers behind a graph break each get the model's additive mask as an input (FSDP2's per-layer graphs, torchtitan's
per-block compile). Inductor's trace cannot read it; where the first call's mask is the causal triangle, the graph is
compiled with those sites on the causal path, and each call runs it only where its mask holds the triangle again,
else the rewritten graph op by op. Every call, forward and backward, equals the original's.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnfuse
from attnfuse.causal_inputs import CausalForm

class BiasedAttention(nn.Module):
    """transformers' eager attention: scores plus the additive mask handed in, softmax, values."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
        return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


class LayersBehindBreaks(nn.Module):
    """A graph break before each layer, as FSDP2's hooks make: the mask reaches each layer's graph as an input."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BiasedAttention() for _ in range(depth))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            torch._dynamo.graph_break()
            x = x + layer(x, bias)
        return x


def causal_bias(batch: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' eager mask: 0 on the kept keys, the dtype's lowest value on the others."""
    triangle = torch.zeros(n, n, dtype=dtype).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                                          torch.finfo(dtype).min)
    return triangle.expand(batch, 1, n, n).contiguous()  # the strides of the padded one: no recompile between them


def padded_bias(batch: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The causal triangle with the first two keys of the last sequence masked too (left padding)."""
    bias = causal_bias(batch, n, dtype)
    bias[-1, :, :, :2] = torch.finfo(dtype).min
    return bias


def same_step(optimized: nn.Module, original: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> None:
    """Output and every gradient (input and parameters) of one forward and backward equal the original's (to bf16's
    rounding in bf16)."""
    tolerance = dict(atol=1e-5, rtol=1e-4) if x.dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    results = []
    for model in (original, optimized):
        model.zero_grad()
        leaf = x.detach().clone().requires_grad_()
        out = model(leaf, bias)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in model.parameters()]))
    (expected, expected_dx, expected_grads), (got, got_dx, got_grads) = results
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got_dx, expected_dx, **tolerance)
    for e, g in zip(expected_grads, got_grads):
        torch.testing.assert_close(g, e, **tolerance)


def causal_counts(model: nn.Module) -> list[dict]:
    return [{"causal": s["features"]["calls_read_as_causal"], "as given": s["features"]["calls_run_with_it"]}
            for s in attnfuse.report(model).to_dict()["sites"]]


@pytest.fixture
def causal_forms(monkeypatch) -> list[CausalForm]:
    """The causal forms the backend compiles in the test."""
    import attnfuse.capture as capture

    forms, compile_form = [], capture.compile_causal_form

    def recorded(*args, **kwargs):
        form = compile_form(*args, **kwargs)
        if form is not None:
            forms.append(form)
        return form

    monkeypatch.setattr(capture, "compile_causal_form", recorded)
    torch._dynamo.reset()
    yield forms
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_causal_first_call_compiles_the_causal_form_and_each_call_is_exact(causal_forms, dtype):
    """Causal, padded, causal again (same shapes, no recompile): the padded call runs op by op with its mask. In half
    precision the sites also check rows for a live key, which the triangle passes."""
    torch.manual_seed(0)
    original = LayersBehindBreaks().to(dtype)
    optimized = attnfuse.optimize(copy.deepcopy(original), compiler="inductor")
    x = torch.randn(2, 8, 16, dtype=dtype)
    for bias in (causal_bias(2, 8, dtype), padded_bias(2, 8, dtype), causal_bias(2, 8, dtype)):
        same_step(optimized, original, x, bias)
    assert len(causal_forms) == 1  # the layers share one compiled graph
    sites = attnfuse.report(optimized).to_dict()["sites"]
    assert all(site["backend"] and not site["backend"].startswith("unfused") for site in sites), sites
    assert causal_counts(optimized) == [{"causal": 4, "as given": 2}] * 2, str(attnfuse.report(optimized))


def test_a_first_call_that_is_not_causal_compiles_the_graph_as_it_is(causal_forms):
    torch.manual_seed(0)
    original = LayersBehindBreaks()
    optimized = attnfuse.optimize(copy.deepcopy(original), compiler="inductor")
    x = torch.randn(2, 8, 16)
    for bias in (padded_bias(2, 8), causal_bias(2, 8)):
        same_step(optimized, original, x, bias)
    assert causal_forms == []


def test_a_bias_that_needs_a_gradient_is_not_read_as_causal(causal_forms):
    """The causal path gives a bias no gradient; the original gives it one: such a bias runs as given."""
    torch.manual_seed(0)
    original = LayersBehindBreaks(depth=1)
    optimized = attnfuse.optimize(copy.deepcopy(original), compiler="inductor")
    x = torch.randn(2, 8, 16)
    grads = []
    for model in (original, optimized):
        bias = causal_bias(2, 8).clone().requires_grad_()
        model(x, bias).sum().backward()
        grads.append(bias.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert causal_forms == []


class CachedAttention(nn.Module):
    """Queries of ``x`` against keys and values of ``memory`` (a cache, a prefix), with the additive mask handed in
    behind a graph break: ``L`` queries, ``S`` keys."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.q, self.kv, self.out = heads, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        (b, n, _), s = x.shape, memory.shape[1]
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
        return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


def triangle_keep(L: int, S: int) -> torch.Tensor:
    """The triangle ``RunTimeCausal`` reads: bottom-right where ``L <= S``, top-left where ``L > S``."""
    offset = S - L if L <= S else 0
    return torch.ones(L, S, dtype=torch.bool).tril(offset)


BIAS_KINDS = ("finfo.min", "-inf", "mixed fills", "fill that does not absorb", "NaN on a masked key", "a padded key",
              "a row without keys", "random")


def drawn_bias(kind: str, L: int, S: int, seed: int) -> torch.Tensor:
    """A ``(2, 1, L, S)`` bias of ``kind``: the first three hold the triangle, the others do not."""
    generator = torch.Generator().manual_seed(seed)
    keep = triangle_keep(L, S).expand(2, 1, L, S)
    low = torch.finfo(torch.float32).min
    if kind == "random":
        return torch.randn(2, 1, L, S, generator=generator) * 3
    fill = {"-inf": -math.inf, "fill that does not absorb": -1e29}.get(kind, low)
    bias = torch.zeros(2, 1, L, S).masked_fill(~keep, fill)
    masked = (~keep).nonzero()
    pick = masked[torch.randint(len(masked), (1,), generator=generator)[0]].tolist() if len(masked) else None
    if kind == "mixed fills":
        bias = bias.masked_fill(~keep & (torch.rand(2, 1, L, S, generator=generator) < 0.5), -math.inf)
    elif kind == "NaN on a masked key" and pick is not None:
        bias[tuple(pick)] = math.nan
    elif kind == "a padded key":
        bias[1, :, :, 0] = low
    elif kind == "a row without keys":
        bias[0, :, L - 1, :] = low
    return bias


@pytest.fixture(params=[(6, 6), (4, 7), (7, 4)], ids=["square", "bottom-right", "top-left"])
def cached_models(request, causal_forms):
    """The original and its optimized copy, compiled in the causal form by a first call on the triangle; kept across
    the drawn examples of one test (Dynamo is reset between tests, not between examples)."""
    L, S = request.param
    torch.manual_seed(0)
    original = CachedAttention()
    optimized = attnfuse.optimize(copy.deepcopy(original), compiler="inductor")
    x, memory = (torch.randn(2, n, 16, requires_grad=True) for n in (L, S))
    optimized(x, memory, drawn_bias("finfo.min", L, S, 0)).sum().backward()
    assert len(causal_forms) == 1
    return original, optimized, L, S


@given(kinds=st.lists(st.sampled_from(BIAS_KINDS), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 4.0]))
def test_every_call_of_a_causal_form_equals_the_original(cached_models, causal_forms, kinds, seed, scale):
    """Calls of one graph compiled in the causal form, with drawn masks: the triangle with any fill that masks, a
    fill that does not, a NaN under the mask, padding, a row without keys, a random bias; larger scores too (at 30x, where softmax saturates, a fused backward
    differs from the original's on every route, by the kernels' own rounding). Forward
    and every gradient equal the original's (NaN where it gives NaN); no recompile."""
    original, optimized, L, S = cached_models
    for kind in kinds:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2, L, 16, generator=generator) * scale
        memory = torch.randn(2, S, 16, generator=generator) * scale
        bias = drawn_bias(kind, L, S, seed)
        results = []
        for model in (original, optimized):
            model.zero_grad()
            x_, memory_ = (t.clone().requires_grad_() for t in (x, memory))
            out = model(x_, memory_, bias)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)))
            results.append((out.detach(), x_.grad, memory_.grad, *(p.grad for p in model.parameters())))
        # the tolerances of ``helpers.assert_fused_equal``, relative to each tensor's scale (kernels sum in another
        # order); as there, rows the original fills with NaN are reproduced in the forward, gradients not compared
        for i, (expected, got) in enumerate(zip(*results)):
            if i and results[0][0].isnan().any():
                break
            size = expected.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1.0).item()
            atol, rtol = (2e-5, 1e-4) if i == 0 else (2e-4, 1e-3)
            torch.testing.assert_close(got, expected, atol=atol * size, rtol=rtol, equal_nan=True,
                                       msg=lambda message: f"{kind}, tensor {i} (largest value {size:.3g}): {message}")
    assert len(causal_forms) == 1


def test_the_causal_form_across_lengths(causal_forms):
    """A second length compiles a symbolic graph, in the causal form again; every call at every length is exact."""
    torch.manual_seed(0)
    original = LayersBehindBreaks()
    optimized = attnfuse.optimize(copy.deepcopy(original), compiler="inductor")
    for n in (8, 10, 12):
        x = torch.randn(2, n, 16)
        for bias in (causal_bias(2, n), padded_bias(2, n)):
            same_step(optimized, original, x, bias)
    assert len(causal_forms) == 2  # the first length's static graph, then one for every length

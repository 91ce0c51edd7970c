"""A site's one mask or bias handed in at run time (transformers' eager mask reaching a layer's graph across a graph
break, as under FSDP2) is read as the causal flag on exactly the calls where its values are the causal triangle
(``attnfuse.guards.RunTimeCausal``), and used as given on every other call; each call is compared with the
unrewritten module, forward and backward."""
from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
import attnfuse.lower as lower
from attnfuse.guards import RunTimeCausal
from attnfuse.kernels.call import AttentionCall, CallFacts
from tests.helpers import count_host_reads, spy_on_sdpa

FILLS = {"min": None, "-inf": float("-inf")}  # None: the dtype's lowest value, as transformers fills its masks


class BiasArgument(nn.Module):
    """Llama's eager attention: ``softmax(s + mask)`` in fp32, the mask an argument."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class KeepArgument(nn.Module):
    """``masked_fill(~keep, fill)`` with a boolean keep-mask argument."""

    def __init__(self, fill: Optional[float]):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        fill = torch.finfo(scores.dtype).min if self.fill is None else self.fill
        return scores.masked_fill(~keep, fill).softmax(-1) @ v


class BrokenLayers(nn.Module):
    """``layers`` attention layers, each compiled as a graph of its own (a graph break between them, as FSDP2's
    hooks make), all given the same mask object."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(BiasArgument() for _ in range(layers))

    def forward(self, q, k, v, mask):
        for layer in self.layers:
            torch._dynamo.graph_break()
            q = layer(q, k, v, mask)
        return q


def triangle(L: int, S: int) -> torch.Tensor:
    """The keep triangle every row keeps a key under: bottom-right where ``L <= S``, top-left where ``L > S``."""
    return torch.ones(L, S, dtype=torch.bool).tril(S - L if L <= S else 0)


def additive(keep: torch.Tensor, dtype: torch.dtype, fill: Optional[float]) -> torch.Tensor:
    value = torch.finfo(dtype).min if fill is None else fill
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, value)


def is_causal_triangle(mask: torch.Tensor, L: int, S: int) -> bool:
    """The reference: the mask holds the triangle in every slice (a bias: exactly 0 on it, at most -1e30 off it)."""
    keep = triangle(L, S)
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    values = mask.detach().double()
    return bool((values[..., keep] == 0).all() and (values[..., ~keep] <= -1e30).all())


def site_counts(model: nn.Module) -> dict:
    features = attnfuse.report(model).to_dict()["sites"][0]["features"]
    return {"causal": features["calls_read_as_causal"], "as given": features["calls_run_with_it"]}


def call_and_compare(model, original, q, k, v, mask, atol):
    """One call of both, forward and backward (q, k, v and, where it needs one, the mask's gradient)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v, mask)]
    expected = original(*leaves)
    got = model(q, k, v, mask)
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol, equal_nan=True)
    if expected.isnan().any():
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(expected.device, expected.dtype)
    inputs = [t for t in (q, k, v, mask) if t.requires_grad]
    want = torch.autograd.grad((expected * weights).sum(), [t for t in leaves if t.requires_grad])
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=atol * 10)


ALTERATIONS = ["none", "padded", "diagonal+1", "diagonal-1", "other corner", "not below the threshold",
               "fill -inf and min mixed", "wrong in one batch"]


def altered(keep: torch.Tensor, how: str, kind: str, dtype: torch.dtype, fill: Optional[float], L: int, S: int,
            where: int) -> torch.Tensor:
    """The triangle ``keep`` (B, H, L, S) changed as ``how`` says, as the mask the model is given."""
    keep = keep.clone()
    if how == "padded":  # one key of one sequence masked (left padding)
        keep[0, :, :, where % S] = False
    elif how in ("diagonal+1", "diagonal-1", "other corner"):
        offset = {"diagonal+1": 1, "diagonal-1": -1}.get(how, 0) + (S - L if L <= S else 0)
        if how == "other corner":
            offset = 0 if L <= S else S - L
        keep[...] = torch.ones(L, S, dtype=torch.bool).tril(offset)
    elif how == "wrong in one batch":
        keep[-1, :, where % L, :] = True
    if kind == "bool":
        return keep
    mask = additive(keep, dtype, fill)
    masked = (~keep).nonzero()
    if how == "not below the threshold" and len(masked):
        mask[tuple(masked[where % len(masked)])] = -1e4
    if how == "fill -inf and min mixed" and len(masked):
        mask[tuple(masked[where % len(masked)])] = float("-inf") if fill is None else torch.finfo(dtype).min
    return mask


@given(L=st.integers(1, 7), S=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       kind=st.sampled_from(["min", "-inf", "bool"]), how=st.sampled_from(ALTERATIONS),
       batch=st.sampled_from([1, 2]), heads=st.sampled_from([1, 3]), where=st.integers(0, 50),
       mask_grad=st.booleans())
def test_a_run_time_mask_is_read_as_causal_exactly_when_it_is_the_triangle(L, S, dtype, kind, how, batch, heads,
                                                                          where, mask_grad):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(L * 13 + S)
    q = torch.randn(2, 3, L, 8, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 3, S, 8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    fill = FILLS.get(kind)
    module = KeepArgument(fill) if kind == "bool" else BiasArgument()
    model = attnfuse.optimize(copy.deepcopy(module))
    keep = triangle(L, S).expand(batch, heads, L, S)
    mask = altered(keep, how, kind, dtype, fill, L, S, where)
    mask.requires_grad_(mask_grad and kind != "bool")
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    # a boolean mask is not read where the triangle keeps every key (one query): its read would cost more than it
    decode_keep = kind == "bool" and (L if L <= S else S) == 1
    reads_as_causal = is_causal_triangle(mask, L, S) and not mask.requires_grad and not decode_keep
    assert reads_as_causal or how != "none" or mask.requires_grad or decode_keep  # the unaltered triangle: causal

    call_and_compare(model, module, q, k, v, mask, atol)
    assert site_counts(model) == {"causal": int(reads_as_causal), "as given": int(not reads_as_causal)}
    # the same tensor object, now written through ``.data`` (its version does not move): read again, not remembered
    if not mask.requires_grad:
        mask.data.copy_(triangle(L, S) if kind == "bool" else additive(triangle(L, S), dtype, fill))
        call_and_compare(model, module, q, k, v, mask, atol)
        assert site_counts(model)["causal"] == int(reads_as_causal) + int(not decode_keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_runs_causal_without_the_bias_and_with_it_otherwise(monkeypatch, dtype):
    q, k, v = (torch.randn(2, 4, 6, 8).to(dtype) for _ in range(3))
    causal = additive(triangle(6, 6), dtype, None).expand(2, 1, 6, 6).contiguous()
    padded = causal.clone()
    padded[1, :, :, 0] = torch.finfo(dtype).min
    model = attnfuse.optimize(BiasArgument())
    calls = spy_on_sdpa(monkeypatch)
    with torch.no_grad():
        for mask in (causal, padded, causal):
            torch.testing.assert_close(model(q, k, v, mask), BiasArgument()(q, k, v, mask), atol=2e-2, rtol=2e-2)
    assert calls == [(False, True), (True, False), (False, True)]
    text = str(attnfuse.report(model))
    assert "bias (2, 1, 6, 6), checked per call for the causal triangle (causal on 2 of 3 calls of its graph)" in text


@pytest.mark.parametrize("causal", [True, False])
def test_a_call_reads_the_host_no_more_often_than_without_the_check(monkeypatch, causal):
    """The comparison with the triangle is read in the read the bias's rows already take: one a call either way."""
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = additive(triangle(6, 6), torch.float32, None).expand(2, 1, 6, 6).clone()
    if not causal:
        mask[0, :, :, :2] = torch.finfo(torch.float32).min
    fields = dict(q=q, k=k, v=v, keep=None, bias=mask, causal=None, window=None, softcap=None, bias_fn=None,
                  scale=None, scale_value=8 ** -0.5, dropout_p=0.0, fully_masked_rows="zero", needs_grad=False,
                  allowed=None, autotune=False, on_kernel=None)
    counts = {}
    for check in (None, RunTimeCausal("bias", -1e30)):
        reads = count_host_reads(monkeypatch)
        with torch.no_grad():
            out = attnfuse.attend(q, k, v, bias=mask, maybe_causal=check)
        counts[check is None] = len(reads)
        torch.testing.assert_close(out, BiasArgument()(q, k, v, mask))
        monkeypatch.undo()
    assert counts[False] <= counts[True] == 1
    check = RunTimeCausal("bias", -1e30)
    assert check.causal_reading(AttentionCall(**fields, facts=CallFacts())) == ("bottom_right" if causal else None)


def test_layers_given_one_mask_each_read_it_once_and_run_causal(monkeypatch):
    """Four layers, a graph each, one mask object: each layer's call compares it once (nothing is remembered across
    calls: ``attnfuse.memo``), in its one host read, and runs causal."""
    layers = 4
    q, k, v = (torch.randn(2, 4, 8, 8) for _ in range(3))
    mask = additive(triangle(8, 8), torch.float32, None).expand(2, 1, 8, 8)
    module = BrokenLayers(layers)
    model = attnfuse.optimize(copy.deepcopy(module))
    with torch.no_grad():
        model(q, k, v, mask)  # compiles each graph
        calls, reads = spy_on_sdpa(monkeypatch), count_host_reads(monkeypatch)
        torch.testing.assert_close(model(q, k, v, mask), module(q, k, v, mask))
    assert calls == [(False, True)] * layers
    assert len(reads) == layers, reads
    sites = attnfuse.report(model).to_dict()["sites"]
    assert len(sites) == layers and all(s["features"]["causal_checked_per_call"] == "bias" for s in sites)


def test_a_bias_that_needs_a_gradient_is_used_as_given():
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = additive(triangle(5, 5), torch.float32, None)[None, None].requires_grad_()
    model = attnfuse.optimize(BiasArgument())
    call_and_compare(model, BiasArgument(), q, k, v, mask, 2e-5)
    assert site_counts(model) == {"causal": 0, "as given": 1}
    with torch.no_grad():  # no gradient wanted: read as causal (a graph of its own: Dynamo guards on grad mode)
        model(q, k, v, mask)
    assert site_counts(model) == {"causal": 1, "as given": 0}


def test_nan_off_the_triangle_is_not_read_as_causal():
    """The original's ``s + NaN`` is NaN in that row; the causal path would hide it."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = additive(triangle(5, 5), torch.float32, None)[None, None].clone()
    mask[0, 0, 1, 3] = float("nan")
    model = attnfuse.optimize(BiasArgument())
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v, mask), BiasArgument()(q, k, v, mask), equal_nan=True)
    assert site_counts(model) == {"causal": 0, "as given": 1}


@pytest.mark.parametrize("kind", ["bias", "bool"])
def test_dynamic_shapes_and_kv_cache_lengths(kind):
    """One graph for every length (dynamic shapes): queries shorter than keys read bottom-right, as a KV cache's."""
    module = KeepArgument(None) if kind == "bool" else BiasArgument()
    model = attnfuse.optimize(copy.deepcopy(module), dynamic=True)
    sizes = [(6, 6), (3, 7), (1, 9), (7, 4), (5, 5)]
    for L, S in sizes:
        g = torch.Generator().manual_seed(L + 10 * S)
        q = torch.randn(2, 2, L, 8, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 2, S, 8, generator=g, requires_grad=True) for _ in range(2))
        keep = triangle(L, S)[None, None]
        mask = keep if kind == "bool" else additive(keep, torch.float32, None)
        call_and_compare(model, module, q, k, v, mask, 2e-5)
    report = attnfuse.report(model)
    records = [site.record.causal_checks for graph in report.graphs for site in graph.sites]
    assert len(records) < len(sizes)  # symbolic sizes (Dynamo still specializes L == S and L == 1)
    decode = 1 if kind == "bool" else 0  # a boolean mask at one query (every key kept) is used as given, unread
    assert sum(r["causal"] for r in records) == len(sizes) - decode
    assert sum(r["as given"] for r in records) == decode
    assert any(site.features["q_len"] == "L" for graph in report.graphs for site in graph.sites)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_a_half_precision_mask_is_read_once_where_it_is_the_triangle(monkeypatch, causal, grad):
    """A bf16 mask handed in is checked for rows without a live key and for the causal triangle: both in one host read
    (a synchronization on CUDA); a mask that is not the triangle is read once more, as the kernel reads any bias."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 4, 6, 8, generator=g).to(dtype) for _ in range(3)]
    mask = additive(triangle(6, 6), dtype, None).expand(2, 1, 6, 6).clone()
    if not causal:
        mask[0, :, :, :2] = torch.finfo(dtype).min
    module = BiasArgument()
    model = attnfuse.optimize(copy.deepcopy(module))
    plans, run_site = [], lower.run_site
    monkeypatch.setattr(lower, "run_site", lambda plan, *tensors: plans.append(plan) or run_site(plan, *tensors))
    model(*base, mask)  # compiles
    monkeypatch.undo()
    (plan,) = plans
    assert plan.live_rows and plan.run_time_causal is not None
    expected_args, actual_args = ([t.clone().requires_grad_(grad) for t in base] for _ in range(2))
    reads = count_host_reads(monkeypatch)
    out = model(*actual_args, mask)
    assert len(reads) == (1 if causal else 2), reads
    expected = module(*expected_args, mask)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    if grad:
        out.float().sum().backward(), expected.float().sum().backward()
        for e, a in zip(expected_args, actual_args):
            torch.testing.assert_close(a.grad, e.grad, atol=3e-2, rtol=3e-2)
    counts = site_counts(model)  # (a call with gradients compiles a graph of its own: its counts start there)
    assert (counts["causal"] > 0) == causal and (counts["as given"] > 0) == (not causal)

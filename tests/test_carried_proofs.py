"""A causal mask built in one graph and read by attention in others across graph breaks (transformers' eager mask
under FSDP2's per-layer breaks): proven where it is built (``attnfuse.carried``), read as causal in each layer
without a host read; anything else (a mask built otherwise, written after it was built, passed in) is read per
call as before. Every call is compared with the unrewritten model, forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from attnfuse.carried import CARRIED
from tests.helpers import count_host_reads
from tests.test_run_time_causal import BiasArgument, KeepArgument, spy_on_sdpa

BUILDS = ["full triu", "arange bias", "arange keep", "tril keep", "padded", "diagonal+1", "top-left at L < S",
          "window", "keep everything"]
CAUSAL_BUILDS = {"full triu", "arange bias", "arange keep", "tril keep"}


def build_mask(how: str, L: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mask a model builds before its layers, from shapes (all but ``padded``), ``(1, 1, L, S)``."""
    low = torch.finfo(dtype).min
    i = torch.arange(L, device=device)[:, None] + (S - L)
    j = torch.arange(S, device=device)[None, :]
    if how == "full triu":
        mask = torch.full((L, S), low, dtype=dtype, device=device).triu(S - L + 1)
    elif how == "arange bias":
        mask = torch.where(j <= i, 0.0, low).to(dtype)
    elif how == "arange keep":
        mask = j <= i
    elif how == "tril keep":
        mask = torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)
    elif how == "padded":
        mask = torch.where((j <= i) & (j > 0), 0.0, low).to(dtype)
    elif how == "diagonal+1":
        mask = torch.where(j <= i + 1, 0.0, low).to(dtype)
    elif how == "top-left at L < S":
        mask = torch.where(j <= i - (S - L), 0.0, low).to(dtype)
    elif how == "window":
        mask = torch.where((j <= i) & (j > i - 2), 0.0, low).to(dtype)
    else:
        mask = torch.zeros(L, S, dtype=dtype, device=device)
    return mask[None, None]


class Decoder(nn.Module):
    """Builds its mask once, then runs ``layers`` attention layers, a graph each (as FSDP2's hooks break them)."""

    def __init__(self, how: str, layers: int = 3):
        super().__init__()
        self.how = how
        keep = how in ("arange keep", "tril keep")
        self.layers = nn.ModuleList(KeepArgument(None) if keep else BiasArgument() for _ in range(layers))

    def forward(self, q, k, v):
        mask = build_mask(self.how, q.shape[-2], k.shape[-2], q.dtype, q.device)
        for layer in self.layers:
            torch._dynamo.graph_break()
            q = layer(q, k, v, mask)
        return q


def checked_counts(model: nn.Module) -> dict:
    """The per-call causal checks summed over the model's sites."""
    totals = {"causal": 0, "as given": 0, "proven": 0}
    for graph in attnfuse.report(model).graphs:
        for site in graph.sites:
            for key, value in (site.record.causal_checks or {}).items():
                totals[key] += value
    return totals


@settings(max_examples=30, deadline=None)
@given(how=st.sampled_from(BUILDS), L=st.integers(1, 6), extra=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), grad=st.booleans())
def test_a_mask_built_before_the_layers_is_proven_exactly_when_it_is_the_triangle(how, L, extra, dtype, grad):
    torch._dynamo.reset()
    S = L + extra
    module = Decoder(how)
    model = attnfuse.optimize(copy.deepcopy(module))
    g = torch.Generator().manual_seed(L * 10 + S)
    q = torch.randn(2, 2, L, 8, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(2, 2, S, 8, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    expected = module(*(t.detach().clone().requires_grad_(grad) for t in (q, k, v)))
    got = model(q, k, v)
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol)
    if grad:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        weights = torch.randn(expected.shape, generator=g).to(dtype)
        want = torch.autograd.grad((module(*leaves) * weights).sum(), leaves)
        have = torch.autograd.grad((model(q, k, v) * weights).sum(), (q, k, v))
        for a, b in zip(have, want):
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=atol * 10)
    counts = checked_counts(model)
    keeps_all = (L if L <= S else S) == 1  # the triangle keeps every key: so does any causal-shaped build
    # a window of 2 is the triangle only where its last row (which reaches key S - 1) still keeps key 0: S <= 2
    if how in CAUSAL_BUILDS or (how == "top-left at L < S" and extra == 0) or (how == "window" and S <= 2) or (
            keeps_all and how in ("diagonal+1", "keep everything")):
        assert counts["proven"] == counts["causal"] > 0 and counts["as given"] == 0, counts
    elif how == "padded" and L > 1 and counts["causal"]:  # a triangle here only where no row loses its key
        assert counts["proven"] < counts["causal"], counts  # read by the first layer of each forward, not proven
    else:
        assert counts["causal"] == counts["proven"] == 0, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_read_a_proven_mask_without_a_host_read(monkeypatch, dtype):
    """Three layers, one mask built in the model: no host read in any layer, every call causal (in bf16 too, where a
    bias handed to a layer is checked for rows without a live key: the proof answers that as well)."""
    module = Decoder("full triu")
    model = attnfuse.optimize(copy.deepcopy(module))
    q, k, v = (torch.randn(2, 4, 8, 8, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        model(q, k, v)  # compiles each graph
        calls, reads = spy_on_sdpa(monkeypatch), count_host_reads(monkeypatch)
        tolerance = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(model(q, k, v), module(q, k, v), **tolerance)
    assert calls == [(False, True)] * 3 and reads == []
    assert "(causal on 6 of 6 calls of its graph, 6 without reading the mask)" in str(attnfuse.report(model))


class WritesBetween(nn.Module):
    """Builds a causal bias, then changes it between two layers in one of the ways a model can."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.first, self.second = BiasArgument(), BiasArgument()

    def forward(self, q, k, v):
        L = q.shape[-2]
        mask = torch.full((L, L), torch.finfo(q.dtype).min).triu(1)[None, None]
        q = self.first(q, k, v, mask)
        torch._dynamo.graph_break()
        if self.how == "in place in a graph":
            mask[..., 0] = torch.finfo(q.dtype).min
        elif self.how == "through .data in a graph":
            mask.data[..., 0] = torch.finfo(q.dtype).min
        elif self.how == "in place outside any graph":
            _write_eagerly(mask)
        torch._dynamo.graph_break()
        return self.second(q, k, v, mask)


@torch._dynamo.disable
def _write_eagerly(mask: torch.Tensor) -> None:
    mask[..., 0] = torch.finfo(mask.dtype).min


@pytest.mark.parametrize("how", ["nothing", "in place in a graph", "through .data in a graph",
                                 "in place outside any graph"])
def test_a_mask_written_after_it_was_built_is_read_per_call(how):
    """The second layer's graph is handed the mask (the first reads it in the graph that builds it)."""
    torch._dynamo.reset()
    module = WritesBetween(how)
    model = attnfuse.optimize(copy.deepcopy(module))
    for seed in range(2):  # the second call runs every compiled graph again
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
        with torch.no_grad():
            torch.testing.assert_close(model(q, k, v), module(q, k, v))
    counts = checked_counts(model)
    if how == "nothing":
        assert counts == {"causal": 2, "as given": 0, "proven": 2}, counts
    else:
        assert counts == {"causal": 0, "as given": 2, "proven": 0}, counts


def test_records_do_not_keep_tensors_alive():
    model = attnfuse.optimize(Decoder("full triu"))
    with torch.no_grad():
        model(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert len(CARRIED) == 0


def test_transformers_llama_split_per_layer_reads_its_mask_as_proven():
    """transformers' eager Llama with a graph break before each decoder layer (FSDP2's shape): training steps equal
    the unrewritten model's and every attention call is causal by the carried proof."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import assert_same_training_steps

    torch._dynamo.reset()
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    optimized = copy.deepcopy(reference)
    for layer in optimized.model.layers:
        layer.register_forward_pre_hook(torch._dynamo.disable(lambda module, args: None))
    optimized = attnfuse.optimize(optimized)
    assert_same_training_steps(reference, optimized, (12, 12, 7))
    counts = checked_counts(optimized)
    assert counts["causal"] == counts["proven"] == 3 * 3 and counts["as given"] == 0, counts


class HandsATwin(nn.Module):
    """Builds a causal bias, then hands each layer another tensor object over the same memory (FSDP2 does on CUDA),
    in eager code between the graphs; ``write`` writes the twin in place first."""

    def __init__(self, write: bool):
        super().__init__()
        self.write = write
        self.layers = nn.ModuleList(BiasArgument() for _ in range(3))

    def forward(self, q, k, v):
        L = q.shape[-2]
        mask = torch.full((L, L), torch.finfo(q.dtype).min).triu(1)[None, None]
        q = self.layers[0](q, k, v, _twin(mask, False))  # unrolled: Dynamo resumes after a break outside a loop
        q = self.layers[1](q, k, v, _twin(mask, self.write))
        return self.layers[2](q, k, v, _twin(mask, False))


@torch._dynamo.disable
def _twin(mask: torch.Tensor, write: bool) -> torch.Tensor:
    twin = mask.detach()
    if write:
        twin[..., 0] = torch.finfo(mask.dtype).min
    return twin


@pytest.mark.parametrize("write", [False, True])
def test_a_twin_of_a_built_mask_is_read_as_the_mask(write):
    torch._dynamo.reset()
    module = HandsATwin(write)
    model = attnfuse.optimize(copy.deepcopy(module))
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), module(q, k, v))
    counts = checked_counts(model)
    if write:  # the write moved the counter the twins share: layers 2 and 3 read the mask (and find a key masked)
        assert counts == {"causal": 1, "as given": 2, "proven": 1}, counts
    else:
        assert counts == {"causal": 3, "as given": 0, "proven": 3}, counts

"""A causal (or no) mask ANDed with key padding that the model builds from its ``attention_mask`` (transformers' eager
masks, BERT's padding mask) runs on the kernels' causal path, or without a mask, on the calls whose padding keeps
every key, and with the mask on every other call (``attnfuse.unpadded``): each call is compared with the
unrewritten module, forward and backward, and the padding is read once per graph call, not per layer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from tests.helpers import count_host_reads, spy_on_sdpa

SPELLINGS = ["where", "masked_fill", "negated padding", "padding only", "padding only, masked_fill",
             "key bias", "causal fill, key bias", "causal fill, key masked_fill", "window", "causal buffer, key bias",
             "causal buffer, whole mask"]


class PaddedLayers(nn.Module):
    """``layers`` attention layers in one graph, all reading one mask the forward builds from ``attention_mask``
    (``(B, S)``, 1 = a real token): ``causal & padding[b, kv]`` (bottom-right, as under a KV cache), or the padding
    alone, or with a sliding window (``window``, read as the window and a padding keep-mask), spelled as transformers'
    ``where(keep, 0, finfo.min)`` added to the scores or as a ``masked_fill``; or the
    padding as a term of its own, a ``(B, 1, 1, S)`` bias ``(1 - am) * finfo.min`` (BERT's, GPT-2's beside a causal
    ``where``, GPT-Neo's beside a causal buffer, where transformers 5 adds its whole mask too) or
    ``masked_fill(am == 0, ...)`` after a causal fill."""

    def __init__(self, spelling: str, layers: int = 2):
        super().__init__()
        self.spelling, self.layers = spelling, layers
        self.register_buffer("tril", torch.ones(128, 128, dtype=torch.bool).tril(), persistent=False)  # GPT-Neo's

    def forward(self, q, k, v, attention_mask):
        L, S = q.shape[-2], k.shape[-2]
        if self.spelling == "negated padding":
            padding = ~(attention_mask == 0)[:, None, None, :]
        else:
            padding = attention_mask.bool()[:, None, None, :]
        if self.spelling.startswith("padding only"):
            keep = padding.expand(-1, 1, L, S)
        else:
            positions = torch.arange(L, device=q.device)[:, None] + (S - L)
            keys = torch.arange(S, device=q.device)[None, :]
            keep = (keys <= positions)[None, None] & padding
            if self.spelling == "window":  # Mistral's: the last 3 keys up to the diagonal
                keep = keep & (keys > positions - 3)[None, None]
        lowest = torch.finfo(q.dtype).min
        mask = torch.where(keep, torch.zeros((), dtype=q.dtype), lowest)
        key_bias = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * lowest
        triangle = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        out = q
        for _ in range(self.layers):
            scores = out @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if self.spelling == "key bias":
                scores = scores + key_bias
            elif self.spelling == "causal fill, key bias":
                scores = torch.where(triangle, scores, torch.tensor(lowest, dtype=scores.dtype)) + key_bias
            elif self.spelling.startswith("causal buffer"):  # beside the padding term, or the whole mask
                term = key_bias if self.spelling.endswith("key bias") else mask
                scores = torch.where(self.tril[S - L:S, :S], scores, torch.tensor(lowest, dtype=scores.dtype)) + term
            elif self.spelling == "causal fill, key masked_fill":
                scores = scores.masked_fill(~triangle, lowest).masked_fill(attention_mask[:, None, None, :] == 0,
                                                                           lowest)
            elif "masked_fill" in self.spelling:
                scores = scores.masked_fill(~keep, lowest)
            else:
                scores = scores + mask
            out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return out


def counts(model: nn.Module) -> list[dict]:
    return [{"causal": s["features"]["calls_read_as_causal"], "as given": s["features"]["calls_run_with_it"]}
            for s in attnfuse.report(model).to_dict()["sites"]]


def compare(model: nn.Module, original: nn.Module, args: tuple, atol: float) -> None:
    """One call of both, forward and backward through q, k and v."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in args]
    expected, got = original(*leaves), model(*args)
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol)
    if not expected.requires_grad:
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(expected.device, expected.dtype)
    want = torch.autograd.grad((expected * weights).sum(), [t for t in leaves if t.requires_grad])
    have = torch.autograd.grad((got * weights).sum(), [t for t in args if t.requires_grad])
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=atol * 10)


def padding_of(batch: int, S: int, how: str, where: int) -> torch.Tensor:
    """An ``attention_mask``: all ones, or one sequence left- or right-padded (``where`` keys; all of them too)."""
    mask = torch.ones(batch, S, dtype=torch.long)
    count = where % S + 1
    if how == "left":
        mask[-1, :count] = 0
    elif how == "right":
        mask[0, S - count:] = 0
    return mask


def inputs(batch: int, L: int, S: int, dtype: torch.dtype, grad: bool, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 3, L, 8, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(batch, 3, S, 8, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v


@given(batch=st.integers(1, 3), L=st.integers(1, 7), extra=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), spelling=st.sampled_from(SPELLINGS),
       paddings=st.lists(st.sampled_from(["none", "left", "right"]), min_size=1, max_size=3),
       where=st.integers(0, 20), grad=st.booleans())
def test_each_call_runs_without_the_mask_exactly_when_its_padding_keeps_every_key(batch, L, extra, dtype, spelling,
                                                                                  paddings, where, grad):
    """Calls of one compiled graph, one after the other as a training loop makes them (the read is not remembered)."""
    torch._dynamo.reset()
    S = L + extra
    module = PaddedLayers(spelling)
    model = attnfuse.optimize(copy.deepcopy(module))
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    unpadded = 0
    for call, how in enumerate(paddings):
        attention_mask = padding_of(batch, S, how, where + call)
        q, k, v = inputs(batch, L, S, dtype, grad, seed=call)
        compare(model, module, (q, k, v, attention_mask), atol)
        unpadded += int(how == "none")
        report = attnfuse.report(model)
        assert report.fused == 2, str(report)
        if (spelling == "window" and dtype == torch.float16) or (spelling.startswith("causal buffer") and L == 1):
            # fp16's lowest fill does not absorb every score: the window mask stays one bias, left out only where it
            # is 0 throughout (a window that keeps every key); a one-row slice of a causal buffer is no triangle
            # (it stays a mask beside the padding). Either way never left out on a padded call
            dropped = [s["features"].get("calls_read_as_causal", 0) for s in report.to_dict()["sites"]]
            assert all(n <= unpadded for n in dropped), str(report)
            continue
        assert counts(model) == [{"causal": unpadded, "as given": call + 1 - unpadded}] * 2, str(report)


@pytest.mark.parametrize("spelling, causal", [("where", True), ("padding only", False), ("key bias", False),
                                             ("causal fill, key bias", True), ("causal fill, key masked_fill", True),
                                             ("causal buffer, key bias", True), ("causal buffer, whole mask", True)])
def test_layers_read_the_padding_once_a_graph_call_and_run_the_kernels_plain_path(monkeypatch, spelling, causal):
    layers = 4
    module = PaddedLayers(spelling, layers)
    model = attnfuse.optimize(copy.deepcopy(module))
    q, k, v = inputs(2, 6, 6, torch.float32, False, seed=0)
    ones = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        model(q, k, v, ones)  # compiles the graph
        reads = count_host_reads(monkeypatch)
        calls = spy_on_sdpa(monkeypatch)
        torch.testing.assert_close(model(q, k, v, ones), module(q, k, v, ones))
    assert calls == [(False, causal)] * layers
    # one read of the padding; a causal buffer keeps its own per-call guard (``attnfuse.guards.CausalGuard``)
    assert len(reads) == 1 + (layers if "buffer" in spelling else 0), reads
    text = str(attnfuse.report(model))
    if spelling == "causal buffer, whole mask":
        assert "bias (2, 1, 6, 6), run as causal top-left where its padding keeps every key (so on 2 of 2 calls" in text
    elif spelling.startswith("causal ") or spelling == "key bias":  # a padding term of its own, left out
        term = "mask key padding (2, 1, 1, 6)" if "masked_fill" in spelling else "bias (2, 1, 1, 6)"
        assert f"{term}, left out where it keeps every key (so on 2 of 2 calls" in text, text
    else:
        run = "as causal top-left" if causal else "without it"  # L == S: the two alignments agree
        assert f"bias (2, 1, 6, 6), run {run} where its padding keeps every key (so on 2 of 2 calls" in text, text


class PaddingWrittenAfterTheMask(nn.Module):
    """The padding is written in place (a graph input) after the mask was built from it: the mask is what counts."""

    def forward(self, q, k, v, padding):
        L, S = q.shape[-2], k.shape[-2]
        keep = torch.ones(L, S, dtype=torch.bool).tril(S - L) & padding[:, None, None, :]
        mask = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        padding.fill_(True)
        scores = q @ k.transpose(-2, -1) + mask
        return scores.softmax(-1) @ v


def test_padding_written_in_place_is_not_read_for_the_mask():
    q, k, v = inputs(2, 5, 5, torch.float32, False, seed=3)
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[0, :2] = False
    model = attnfuse.optimize(PaddingWrittenAfterTheMask())
    with torch.no_grad():
        got = model(q, k, v, padding.clone())
    torch.testing.assert_close(got, PaddingWrittenAfterTheMask()(q, k, v, padding.clone()))
    features = attnfuse.report(model).to_dict()["sites"][0]["features"]
    assert features["without_padding"] is None


def test_a_graph_compiled_by_inductor_uses_the_mask_whole():
    """No value can be read inside Inductor's graph: no reading is planned (the site's row says nothing of one)."""
    from attnfuse.match import find_sites

    captured = []

    def backend(gm, example_inputs):
        captured.extend(find_sites(gm.graph, reads_values=False))
        return gm.forward

    torch.compile(PaddedLayers("where", 1), backend=backend)(*inputs(2, 4, 4, torch.float32, False, 0),
                                                             torch.ones(2, 4, dtype=torch.long))
    assert captured and all(site.scores.unpadded is None for site in captured)


def test_a_transformers_llama_trains_on_its_attention_mask_as_causal():
    """Data collators pass ``attention_mask`` (all ones without padding): the eager mask runs as the causal flag;
    a left-padded batch in the same process runs with the mask; logits and every gradient equal the original's."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import assert_same_step

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2, 12, dtype=torch.long)
    left_padded = ones.clone()
    left_padded[1, :4] = 0
    for attention_mask in (ones, left_padded, ones):
        assert_same_step(reference, optimized, ids, attention_mask)
    assert counts(optimized) == [{"causal": 2, "as given": 1}] * 2, str(attnfuse.report(optimized))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_the_padding_is_one_read_a_forward_and_each_call_is_exact(monkeypatch, dtype):
    """On CUDA the read is a synchronization: one a forward for every layer, and the kernels' causal path (cuDNN,
    flash) gives the original's answer; a padded batch in the same process runs with the mask."""
    layers = 4
    module = PaddedLayers("where", layers)
    model = attnfuse.optimize(copy.deepcopy(module))
    q, k, v = (t.cuda() for t in inputs(4, 64, 64, dtype, True, seed=5))
    ones = torch.ones(4, 64, dtype=torch.long, device="cuda")
    padded = ones.clone()
    padded[2:, :20] = 0
    for attention_mask in (ones, padded, ones):
        compare(model, module, (q, k, v, attention_mask), 2e-2)
    assert counts(model) == [{"causal": 2, "as given": 1}] * layers
    with torch.no_grad():
        reads, calls = count_host_reads(monkeypatch), spy_on_sdpa(monkeypatch)
        model(q, k, v, ones)
    assert calls == [(False, True)] * layers and len(reads) == 1, (calls, reads)


def test_one_read_serves_padding_of_equal_values_only():
    """Padding built again in every layer (``am == 0`` per layer) shares one read; two random draws never do."""
    from torch.fx import symbolic_trace

    from attnfuse.unpadded import MASKS, Unpadded, padding_read

    class Built(nn.Module):
        def forward(self, am, x):
            return am == 0, am == 0, torch.rand_like(x) > 0.5, torch.rand_like(x) > 0.5, am == 1

    graph = symbolic_trace(Built()).graph
    outputs = next(node for node in graph.nodes if node.op == "output").args[0]
    reads = [padding_read(graph, Unpadded(None, ((node, MASKS),), whole=False)) for node in outputs]
    assert reads[0] is reads[1]
    assert len({id(read) for read in reads}) == 4

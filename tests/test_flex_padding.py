"""Issue 16, item 1: padded masks of sites that go to FlexAttention read from their structure.

A site that carries a softcap or a bias computed from positions (ALiBi) runs on FlexAttention (SDPA has no kernel
for it), where a dense ``(B, 1, L, S)`` mask gathered in the ``score_mod`` is far slower than a block mask. Such a
site reads transformers' padded *plain causal* mask (``where(causal & padding[b, kv], 0, finfo.min)``) and a
padding-only mask (``where(padding[b, kv], 0, finfo.min)`` over every query) as the causal triangle (or none) and a
``(B, 1, 1, S)`` key-padding keep-mask, with the proofs and guards of the window case (``attnfuse/added_masks.py``,
``tests/test_window_padding.py``): rows without keys give the mean of v, calls with gradients add the original's
bias rebuilt, a fill that does not absorb every score (fp16's lowest value) stays a bias. Sites bound for SDPA keep
the model's own mask (``test_window_padding.test_causal_mask_with_padding_stays_the_models_bias``).
"""
from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from helpers import grads
from score_modules import alibi_slopes
from test_window_padding import (PathSpy, TransformersMask, _padding, _qkv, assert_stays_bias, cached_decode_reports,
                                 compare)

masking_utils = pytest.importorskip("transformers.masking_utils")


# ----------------------------------------------------------------------------- modules

class AlibiPadded(nn.Module):
    """Bloom / Falcon style: ``slopes[h] * (j - i)`` added to the scores, then transformers' padded mask (causal,
    or padding alone for an encoder), the softmax in fp32."""

    def __init__(self, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal

    def forward(self, q, k, v, padding):
        B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        if self.causal:
            mask = masking_utils.eager_mask(B, L, S, q_offset=S - L, mask_function=masking_utils.causal_mask_function,
                                            attention_mask=padding.bool(), dtype=q.dtype, device=q.device)
        else:  # an encoder's padding mask, expanded over the queries as transformers builds it
            keep = padding.bool()[:, None, None, :].expand(B, 1, L, S)
            mask = torch.where(keep, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        rel = torch.arange(S)[None, :] - torch.arange(S - L, S)[:, None]
        alibi = alibi_slopes(self.heads, q.device, torch.float32)[:, None, None] * rel[None]
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + alibi.to(q.dtype)
        s = s + mask
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


# ----------------------------------------------------------------------------- checks

def assert_reads_key_padding(report: attnfuse.FusionReport, causal: Optional[tuple] = ("top_left", "bottom_right"),
                             functions: int = 0) -> None:
    """Every site fused with the causal triangle (or none), one key-padding keep-mask, no bias, and ``functions``
    score functions: the padded mask read from its structure, not a dense bias."""
    assert report.fused == len(report.sites) >= 1, str(report)
    for site in report.sites:
        features = site.features
        assert features["bias"] is None and features["mask"] is not None, features
        assert features["mask"].startswith("key padding") and "," not in features["mask"].split(")")[1], features
        assert features["causal"] in (causal if causal else (None,)), features
        assert features["window"] is None and (features.get("score_functions") or 0) == functions, features


shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(0, 4), st.integers(1, 8))


# ----------------------------------------------------------------------------- softcap (Gemma 2's full layers)

@given(shape=shapes, pads=st.lists(st.integers(0, 13), min_size=3, max_size=3), side=st.sampled_from(["left", "right"]),
       grad=st.booleans())
@settings(max_examples=15)
def test_softcap_causal_padding_fuses_exactly(shape, pads, side, grad):
    """Any batch, heads, query and cache length and padding (whole rows of padding included), with and without
    gradients: equal to the original, read as causal + key padding."""
    b, h, length, past, d = shape
    q, k, v = _qkv(b, h, length, length + past, d, seed=sum(shape))
    padding = _padding(b, length + past, [min(n, length + past) for n in pads], side)
    report = compare(TransformersMask(softcap=5.0), q, k, v, padding, grad=grad)
    # one query against one key: the triangle keeps everything, the padding alone remains
    assert_reads_key_padding(report, None if length + past == 1 else ("top_left", "bottom_right"))


def test_paths_of_padded_softcap_calls(monkeypatch):
    """Without gradients the keep-mask (rows without keys get the mean of v); with gradients the original's mask."""
    spy = PathSpy(monkeypatch)
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=1)
    for side in ("left", "right"):
        for grad in (False, True):
            spy.paths.clear()
            report = compare(TransformersMask(softcap=5.0), q, k, v, _padding(2, 6, [0, 3], side), grad=grad)
            assert_reads_key_padding(report, ("top_left",))
            assert spy.paths == ["bias" if grad else "mask"], (side, grad, spy.paths)


def test_softcap_rows_without_keys():
    """A left-padded batch row whose first queries keep no key (every key before them padded), and a batch row that
    is padding throughout: the original's uniform rows (the mean of v), forward and backward."""
    q, k, v = _qkv(3, 2, 7, 7, 8, seed=3)
    report = compare(TransformersMask(softcap=5.0), q, k, v, _padding(3, 7, [0, 5, 7], "left"))
    assert_reads_key_padding(report, ("top_left",))


@pytest.mark.parametrize("grad", [False, True])
def test_softcap_bfloat16(monkeypatch, grad):
    """bf16 (scores of magnitude ~1: the original rounds each op to bf16, the fused call computes in fp32)."""
    spy = PathSpy(monkeypatch)
    q, k, v = _qkv(2, 2, 7, 7, 16, seed=4, dtype=torch.bfloat16, magnitude=1.0)
    report = compare(TransformersMask(softcap=5.0), q, k, v, _padding(2, 7, [0, 4], "left"), grad=grad,
                     atol=2e-2, rtol=2e-2)
    assert_reads_key_padding(report, ("top_left",))
    assert spy.paths == ["bias" if grad else "mask"]


def test_softcap_float16_stays_a_bias():
    """fp16's lowest value does not absorb every score: not proven, the model's bias."""
    q, k, v = _qkv(2, 2, 7, 7, 16, seed=4, dtype=torch.float16, magnitude=2.0)
    report = compare(TransformersMask(softcap=5.0), q, k, v, _padding(2, 7, [0, 4], "left"), atol=2e-2, rtol=2e-2)
    assert_stays_bias(report)


def test_sdpa_site_keeps_the_boolean_mask_whole():
    """Without a softcap or score function, a boolean causal & padding mask filling the scores stays one mask."""

    class Replace(nn.Module):
        def forward(self, q, k, v, padding):
            L, S = q.shape[-2], k.shape[-2]
            keep = (torch.arange(S)[None, :] <= torch.arange(L)[:, None]) & padding.bool()[:, None, None, :]
            return (q @ k.transpose(-1, -2)).masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v

    q, k, v = _qkv(2, 2, 6, 6, 8, seed=7)
    report = compare(Replace(), q, k, v, _padding(2, 6, [0, 3], "left"))
    features = report.sites[0].features
    assert report.fused == 1 and features["causal"] is None and features["mask"].startswith("full"), features


# ----------------------------------------------------------------------------- ALiBi (Bloom / Falcon style)

@given(shape=shapes, pads=st.lists(st.integers(0, 13), min_size=3, max_size=3), side=st.sampled_from(["left", "right"]),
       grad=st.booleans(), causal=st.booleans())
@settings(max_examples=15)
def test_alibi_padding_fuses_exactly(shape, pads, side, grad, causal):
    """ALiBi with a padded causal mask, or with an encoder's padding mask: equal to the original, read as the score
    function, causal (or none) and key padding."""
    b, h, length, past, d = shape
    q, k, v = _qkv(b, h, length, length + past, d, seed=sum(shape))
    padding = _padding(b, length + past, [min(n, length + past) for n in pads], side)
    report = compare(AlibiPadded(h, causal), q, k, v, padding, grad=grad)
    if length + past > 1:  # one query against one key: ALiBi is 0 there (no position function) and stays a bias
        assert_reads_key_padding(report, ("top_left", "bottom_right") if causal else None, functions=1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_alibi_padding_bfloat16(causal, grad):
    """bf16 (scores of magnitude ~1: the original rounds each op to bf16, the fused call computes in fp32)."""
    q, k, v = _qkv(2, 4, 7, 7, 16, seed=5, dtype=torch.bfloat16, magnitude=1.0)
    report = compare(AlibiPadded(4, causal), q, k, v, _padding(2, 7, [1, 4], "left"), grad=grad,
                     atol=2e-2, rtol=2e-2)
    assert_reads_key_padding(report, ("top_left",) if causal else None, functions=1)


def test_padding_alone_without_score_function_stays_a_bias():
    """An encoder's padding mask on a site SDPA takes (no softcap, no ALiBi): the model's own mask."""

    class Encoder(nn.Module):
        def forward(self, q, k, v, padding):
            B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
            keep = padding.bool()[:, None, None, :].expand(B, 1, L, S)
            mask = torch.where(keep, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
            return (q @ k.transpose(-1, -2) + mask).softmax(-1) @ v

    q, k, v = _qkv(2, 2, 6, 6, 8, seed=8)
    report = compare(Encoder(), q, k, v, _padding(2, 6, [0, 3], "left"))
    features = report.sites[0].features
    assert features["bias"] is not None and features["mask"] is None, features


# ----------------------------------------------------------------------------- real tiny models

def _tiny(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gemma2":
        config = transformers.Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           hidden_size=64, head_dim=16, intermediate_size=128, vocab_size=100,
                                           max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=16,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.MptConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
        model = transformers.MptForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model.float().eval()


@pytest.mark.parametrize("name", ["gemma2", "mpt"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("grad", [False, True])
def test_real_models(name, side, grad):
    """Logits and every parameter's gradient equal the unrewritten model's; Gemma 2's full layer and MPT's layers
    read causal + key padding (MPT's ALiBi a score function), Gemma 2's window layer window + key padding."""
    torch._dynamo.reset()
    reference = _tiny(name)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = _padding(3, 10, [0, 4, 7], side)
    outputs = []
    for model in (reference, optimized):
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        outputs.append((logits, grads(logits, list(model.parameters())) if grad else []))
    (expected, expected_grads), (actual, actual_grads) = outputs
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for e, a in zip(expected_grads, actual_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3)
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)
    for site in report.sites:
        features = site.features
        assert features["bias"] is None and features["mask"].startswith("key padding"), features
        assert features["causal"] == "top_left", features
        assert (features.get("score_functions") or 0) == (1 if name == "mpt" else 0), features


@pytest.mark.parametrize("dynamic", [False, True])
def test_mpt_with_a_cache(dynamic):
    """MPT: prefill a left-padded batch into a cache, then decode two tokens: its ALiBi slice ``[:, a:, b:]`` moves
    with the cache length (a run-time size under dynamic shapes) and still equals the unrewritten model's."""
    for _, report in cached_decode_reports(_tiny("mpt"), dynamic=dynamic):
        assert report.fused == len(report.sites) == 2, str(report)
        for site in report.sites:
            assert site.features["score_functions"] == 1 and site.features["bias"] is None, site.features


class SlicedAlibi(nn.Module):
    """MPT's ALiBi: built once for ``max_len`` keys as ``arange(1 - max_len, 1).view(1, 1, 1, n) * slopes``, squeezed,
    and sliced to the last ``S`` keys (``spelling``: ``"start"`` ``[:, :, max_len - S:]``, ``"negative"`` ``[..., -S:]``;
    look-alikes: ``"strided"`` every other key, ``"merged"`` a reshape that merges heads and keys)."""

    def __init__(self, heads: int, spelling: str, max_len: int = 16) -> None:
        super().__init__()
        self.heads, self.spelling, self.max_len = heads, spelling, max_len

    def forward(self, q, k, v, padding):
        L, S, n = q.shape[-2], k.shape[-2], self.max_len
        positions = torch.arange(1 - n, 1, dtype=torch.int32).view(1, 1, 1, n)
        alibi = (positions * alibi_slopes(self.heads).view(1, self.heads, 1, 1)).squeeze(0)
        if self.spelling == "start":
            alibi = alibi[:, max(0, 1 - L):, n - S:]
        elif self.spelling == "negative":
            alibi = alibi[..., -S:]
        elif self.spelling == "strided":
            alibi = alibi[:, :, n - 2 * S::2]
        else:
            alibi = alibi.reshape(1, self.heads * n)[:, :self.heads * n].reshape(self.heads, 1, n)[:, :, n - S:]
        s = q @ k.transpose(-1, -2) * 0.25 + alibi
        keep = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        return s.masked_fill(~keep, torch.finfo(s.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("spelling, functions", [("start", 1), ("negative", 1), ("strided", 0), ("merged", 0)])
def test_sliced_alibi(spelling, functions):
    """Slices of a position-built bias shift the score index; a strided slice or a reshape that merges dims is no
    pointwise reading (a tensor bias), and either way the result equals the original's."""
    q, k, v = _qkv(2, 4, 3, 6, 8, seed=9)
    report = compare(SlicedAlibi(4, spelling), q, k, v, torch.ones(2, 6))
    features = report.sites[0].features
    assert report.fused == 1 and (features["score_functions"] or 0) == functions, features
    assert (features["bias"] is None) == (functions == 1), features


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma2", "mpt"])
@pytest.mark.parametrize("grad", [False, True])
def test_real_models_on_flex_gpu(name, grad):
    """CUDA, bf16, a left-padded batch: the sites run on FlexAttention with causal + key padding (MPT's ALiBi a score
    function); logits and parameter gradients are as close to the fp32 model's as the unrewritten bf16 model's are
    (bf16 gradients of two computation orders differ by far more than bf16's epsilon). ``python -m pytest -m gpu``."""
    torch._dynamo.reset()
    exact = _tiny(name).to("cuda", torch.float32)
    reference = copy.deepcopy(exact).to(torch.bfloat16)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (4, 30), generator=torch.Generator().manual_seed(0)).cuda()  # MPT: max_seq_len 32
    mask = _padding(4, 30, [0, 12, 0, 29], "left").cuda()
    weight = torch.randn(4, 30, 100, generator=torch.Generator().manual_seed(1)).cuda()
    outputs = []
    for model in (exact, reference, optimized):
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        found = torch.autograd.grad((logits * weight).sum(), list(model.parameters()), allow_unused=True) if grad else []
        outputs.append((logits.detach(), [None if g is None else g.float() for g in found]))
    (truth, true_grads), (expected, expected_grads), (actual, actual_grads) = outputs
    torch.testing.assert_close(actual, expected, atol=5e-2, rtol=5e-2)
    for t, e, a in zip(true_grads, expected_grads, actual_grads):
        if t is None:
            continue
        own_error, error = (e - t).abs().max().item(), (a - t).abs().max().item()
        assert error <= 2 * own_error + 1e-2 * t.abs().max().item() + 1e-3, (error, own_error)
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)
    for site in report.sites:
        assert site.backend == "flex" or grad, str(report)  # with gradients the rebuilt bias may go elsewhere
        assert site.features["mask"].startswith("key padding") and site.features["bias"] is None, site.features

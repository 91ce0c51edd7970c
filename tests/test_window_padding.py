"""Issue 14, family 8 (rest): transformers' padded sliding-window masks read as the window plus a key-padding keep-mask.

transformers' eager models with a sliding window (Mistral, Gemma 2 / 3, Qwen2) add one ``(B, 1, L, S)`` bias
``where(causal & window & padding[b, kv], 0, finfo.min)``. It is read as the causal window and a ``(B, 1, 1, S)``
key-padding keep-mask, not a materialized bias, and stays exact: rows in which every key is masked (left padding)
are, in the original, the softmax of ``s + fill`` over every key (uniform: the mean of v), whose backward reaches q
and k; calls with gradients therefore add the original's bias rebuilt (``attnfuse/added_masks.py``), and the tests
check which way each call went as well as the values. A plain causal mask with padding stays the model's own bias
on sites bound for SDPA (it needs it whole; rebuilding it was slower; Flex sites: tests/test_flex_padding.py), as do
look-alikes whose padding part varies along the queries,
whose window differs per batch row, or whose fill does not absorb every score (fp16's lowest value).
"""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st
from torch import nn

import attnfuse
import attnfuse.added_masks as added_masks
from helpers import grads, leaf_copies

masking_utils = pytest.importorskip("transformers.masking_utils")


# ----------------------------------------------------------------------------- modules

def _mask_function(window: Optional[int]):
    if window is None:
        return masking_utils.causal_mask_function
    return masking_utils.sliding_window_causal_mask_function(window)


class TransformersMask(nn.Module):
    """transformers' own ``eager_mask`` (the installed version) added to the scores, a KV cache of ``S - L`` keys
    before the queries, a softcap as Gemma 2 applies it, the softmax in fp32 as the eager models run it."""

    def __init__(self, window: Optional[int] = None, softcap: Optional[float] = None, scale: float = 0.3) -> None:
        super().__init__()
        self.window, self.softcap, self.scale = window, softcap, scale

    def forward(self, q, k, v, padding):
        B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        mask = masking_utils.eager_mask(B, L, S, q_offset=S - L, mask_function=_mask_function(self.window),
                                        attention_mask=padding.bool(), dtype=q.dtype, device=q.device)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scale
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        s = s + mask
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class HandWrittenMask(nn.Module):
    """The same mask spelled by hand: ``"v5.17"`` (``where(keep, torch.tensor(0.0), min)``, transformers 5.17's
    ``eager_mask``), ``"drop_or"`` (``where(~causal | ~padding, min, 0)``), ``"masked_fill"`` (a zero bias filled
    where dropped) and ``"replace"`` (the scores themselves filled: ``s.masked_fill(~(causal & padding), min)``)."""

    def __init__(self, spelling: str, window: Optional[int] = None) -> None:
        super().__init__()
        self.spelling, self.window = spelling, window

    def forward(self, q, k, v, padding):
        B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        qi = (torch.arange(L) + (S - L))[None, None, :, None]
        kv = torch.arange(S)[None, None, None, :]
        causal = kv <= qi
        if self.window is not None:
            causal = causal & (kv > qi - self.window)
        pad = padding.bool()[:, None, None, :]
        low = torch.finfo(q.dtype).min
        s = q @ k.transpose(-1, -2) * 0.25
        if self.spelling == "replace":
            s = s.masked_fill(~(causal & pad), low)
        elif self.spelling == "v5.17":
            s = s + torch.where(causal & pad, torch.tensor(0.0, dtype=q.dtype), low)
        elif self.spelling == "drop_or":
            s = s + torch.where(~causal | ~pad, low, 0.0)
        else:
            s = s + torch.zeros(B, 1, L, S, dtype=q.dtype).masked_fill(~(causal & pad), low)
        return s.softmax(-1) @ v


# ----------------------------------------------------------------------------- helpers

def _qkv(b: int, h: int, i: int, j: int, d: int, seed: int, dtype=torch.float32, magnitude: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, h, n, d, generator=g) * magnitude).to(dtype) for n in (i, j, j))


def _padding(b: int, s: int, pads: list[int], side: str) -> torch.Tensor:
    """A ``(b, s)`` 0/1 attention mask whose row ``r`` has ``pads[r]`` padding tokens on the ``side`` given."""
    padding = torch.ones(b, s, dtype=torch.long)
    for row, n in enumerate(pads[:b]):
        if side == "left":
            padding[row, :n] = 0
        elif n:
            padding[row, s - n:] = 0
    return padding


class PathSpy:
    """Records, per call of a site that read an added mask, whether it added the rebuilt bias or used the masks."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        original = added_masks.AddedMask.needs_bias

        def needs_bias(q, k):
            self.paths.append("bias" if original(q, k) else "mask")
            return self.paths[-1] == "bias"
        monkeypatch.setattr(added_masks.AddedMask, "needs_bias", staticmethod(needs_bias))


def compare(module: nn.Module, q, k, v, padding, *, grad: bool = True, atol: float = 2e-5, rtol: float = 1e-4,
            dynamic: bool = False) -> attnfuse.FusionReport:
    """The optimized module against the original on one call, outputs and (with ``grad``) q, k, v gradients taken
    from a loss over every output row, the rows without keys included."""
    torch._dynamo.reset()
    reference = copy.deepcopy(module)
    optimized = attnfuse.optimize(copy.deepcopy(module), dynamic=dynamic, verify=False)
    args = tuple(t.requires_grad_(grad) for t in (q, k, v))
    e_args, a_args = leaf_copies(args), leaf_copies(args)
    with torch.set_grad_enabled(grad):
        expected, actual = reference(*e_args, padding.clone()), optimized(*a_args, padding.clone())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if grad:
        for name, a, e in zip("qkv", grads(actual, list(a_args)), grads(expected, list(e_args))):
            torch.testing.assert_close(a, e, atol=atol * 10, rtol=rtol * 10, msg=lambda m, n=name: f"d{n}: {m}")
    return attnfuse.report(optimized)


def assert_window_with_padding(report: attnfuse.FusionReport, window: object,
                               alignment: Optional[str] = None) -> None:
    """Every site fused as the causal window and a key-padding keep-mask, no bias."""
    assert report.fused == len(report.sites) >= 1, str(report)
    for site in report.sites:
        assert_site_reads(site.features, window, alignment)


def assert_site_reads(features: dict, window: object, alignment: Optional[str] = None) -> None:
    """One site's features: causal (``alignment`` if given), ``window``, one key-padding mask and no bias."""
    assert features["bias"] is None and features["mask"] is not None, features
    assert features["mask"].startswith("key padding") and "," not in features["mask"].split(")")[1], features
    assert features["causal"] in (("top_left", "bottom_right") if alignment is None else (alignment,)), features
    assert str(features["window"]) == str(window), features  # a symbolic window is written as text


def assert_site_keeps_bias(features: dict) -> None:
    """The site fused with its mask as the model's materialized bias."""
    assert features["bias"] is not None and features["causal"] is None and features["mask"] is None, features


def assert_stays_bias(report: attnfuse.FusionReport) -> None:
    """The site fused with its mask as a materialized bias (the look-alike is not read as window + padding)."""
    assert report.fused == len(report.sites) == 1, str(report)
    assert_site_keeps_bias(report.sites[0].features)


# ----------------------------------------------------------------------------- exact, with the path each call takes

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(0, 4), st.integers(1, 8))


@given(shape=shapes, window=st.integers(1, 11), pads=st.lists(st.integers(0, 13), min_size=3, max_size=3),
       side=st.sampled_from(["left", "right"]), grad=st.booleans(), softcap=st.sampled_from([None, 5.0]))
@settings(max_examples=30)
def test_transformers_window_mask_fuses_exactly(shape, window, pads, side, grad, softcap):
    """Any batch, heads, query length, cache length, window and padding (whole rows of padding included), with and
    without gradients: equal to the original; a window that drops some key is read as the window (bottom-right
    under a cache) + key padding."""
    b, h, length, past, d = shape
    q, k, v = _qkv(b, h, length, length + past, d, seed=sum(shape))
    padding = _padding(b, length + past, [min(n, length + past) for n in pads], side)
    report = compare(TransformersMask(window, softcap), q, k, v, padding, grad=grad)
    if window < length + past and length > 1:  # the window drops a key that the causal triangle keeps
        assert_window_with_padding(report, window, "top_left" if past == 0 else "bottom_right")
    else:
        assert report.fused == len(report.sites) == 1, str(report)


@pytest.mark.parametrize("window", [None, 4])
def test_causal_mask_with_padding_stays_the_models_bias(window):
    """Without a window, transformers' padded causal mask stays the bias the model built (no per-call rebuild)."""
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=1)
    report = compare(TransformersMask(window), q, k, v, _padding(2, 6, [0, 3], "left"))
    if window is None:
        assert_stays_bias(report)
    else:
        assert_window_with_padding(report, window, "top_left")


def test_paths_of_padded_calls(monkeypatch):
    """Without gradients the keep-masks (rows without keys get the mean of v); with gradients the kernel adds the
    original's mask (a row without keys has a softmax backward that reaches q and k), left or right padding."""
    spy = PathSpy(monkeypatch)
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=1)
    left, right = _padding(2, 6, [0, 3], "left"), _padding(2, 6, [0, 3], "right")
    for padding, grad, path in ((left, False, "mask"), (left, True, "bias"), (right, True, "bias"),
                                (right, False, "mask")):
        spy.paths.clear()
        assert_window_with_padding(compare(TransformersMask(window=3), q, k, v, padding, grad=grad), 3)
        assert spy.paths == [path], (grad, spy.paths)


def test_large_scores_still_absorbed():
    """fp32 scores up to 1e29 still round ``s + finfo.min`` to the fill: a left-padded row stays uniform."""
    q, k, v = _qkv(2, 2, 5, 5, 8, seed=2)
    q, k = q * 1e14, k * 1e14
    report = compare(TransformersMask(window=2), q, k, v, _padding(2, 5, [0, 2], "left"), grad=False)
    assert_window_with_padding(report, 2)


@pytest.mark.parametrize("grad", [False, True])
def test_bfloat16(monkeypatch, grad):
    """bf16 rounds ``s + finfo.min`` to the fill like fp32."""
    spy = PathSpy(monkeypatch)
    q, k, v = _qkv(2, 2, 7, 7, 16, seed=4, dtype=torch.bfloat16, magnitude=2.0)
    report = compare(TransformersMask(window=4), q, k, v, _padding(2, 7, [0, 4], "left"), grad=grad,
                     atol=2e-2, rtol=2e-2)
    assert_window_with_padding(report, window=4)
    assert spy.paths == ["bias" if grad else "mask"]


def test_float16_stays_a_bias():
    """fp16's lowest value (-65504) absorbs only scores under 16: a row without keys is not proven uniform, so the
    mask stays the model's bias."""
    q, k, v = _qkv(2, 2, 7, 7, 16, seed=4, dtype=torch.float16, magnitude=2.0)
    report = compare(TransformersMask(window=4), q, k, v, _padding(2, 7, [0, 4], "left"), atol=2e-2, rtol=2e-2)
    assert_stays_bias(report)


@pytest.mark.parametrize("spelling", ["v5.17", "drop_or", "masked_fill", "replace"])
def test_spellings(spelling):
    """transformers 5.17's zero (``torch.tensor(0.0)``), a disjunction of drops, a filled zero bias, and the same
    conjunction as a boolean mask filling the scores (read as window + padding with the replacing fill)."""
    q, k, v = _qkv(2, 3, 6, 8, 8, seed=5)
    report = compare(HandWrittenMask(spelling, 3), q, k, v, _padding(2, 8, [0, 5], "left"))
    assert_window_with_padding(report, 3, "bottom_right")


@given(sizes=st.lists(st.tuples(st.integers(2, 9), st.integers(0, 3), st.integers(0, 6)), min_size=2, max_size=3),
       window=st.integers(1, 6))
@settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes a step
def test_dynamic_shapes(sizes, window):
    """One graph with symbolic lengths serves several query, cache and padding sizes, with gradients."""
    torch._dynamo.reset()
    module = TransformersMask(window)
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(copy.deepcopy(module), dynamic=True)
    for n, (length, past, pad) in enumerate(sizes):
        q, k, v = (t.requires_grad_() for t in _qkv(2, 2, length, length + past, 8, seed=n))
        padding = _padding(2, length + past, [0, min(pad, length + past)], "left")
        e_args, a_args = leaf_copies((q, k, v)), leaf_copies((q, k, v))
        expected, actual = reference(*e_args, padding), optimized(*a_args, padding)
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
        for a, e in zip(grads(actual, list(a_args)), grads(expected, list(e_args))):
            torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)
        assert attnfuse.report(optimized).fused == 1


# ----------------------------------------------------------------------------- look-alikes that stay a bias

class LookAlike(nn.Module):
    """transformers' window mask (width 3) with one change that makes it something else than window + key padding."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.rel = nn.Parameter(torch.randn(2, 6, 6) * 0.1)

    def forward(self, q, k, v, padding):
        B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        b = torch.arange(B)[:, None, None, None]
        qi, kv = torch.arange(L)[None, None, :, None], torch.arange(S)[None, None, None, :]
        pad = padding if padding.dtype == torch.bool else padding.bool()
        keep = kv <= qi
        if self.change == "query_padding":  # padding read at the query, varies along the queries
            keep = keep & (kv > qi - 3) & pad[b, qi]
        elif self.change == "window_per_row":  # a window of another size in each batch row
            widths = torch.arange(B)[:, None, None, None] + 2
            keep = keep & (kv > qi - widths) & pad[b, kv]
        elif self.change == "or":  # window OR padding: not a conjunction
            keep = (keep & (kv > qi - 3)) | pad[b, kv]
        elif self.change == "written_after":  # the padding input is written after the mask is built from it
            keep = keep & (kv > qi - 3) & pad[:, None, None, :]
        else:
            keep = keep & (kv > qi - 3) & pad[b, kv]
        low = torch.finfo(q.dtype).min if self.change != "small_fill" else -1e4
        mask = torch.where(keep.expand(B, -1, L, S), torch.zeros((), dtype=q.dtype), low)
        if self.change == "written_after":
            pad.fill_(True)
        s = q @ k.transpose(-1, -2) * 0.25
        if self.change == "scaled_after":
            return ((s + mask) * 0.5).softmax(-1) @ v
        if self.change == "second_bias":
            s = s + self.rel
        return (s + mask).softmax(-1) @ v


@pytest.mark.parametrize("change", ["query_padding", "window_per_row", "or", "small_fill", "scaled_after",
                                    "second_bias", "written_after"])
def test_look_alikes_stay_a_bias(change):
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=6)
    padding = _padding(2, 6, [1, 3], "left")
    report = compare(LookAlike(change), q, k, v, padding.bool() if change == "written_after" else padding)
    if change == "second_bias":  # the learned bias and the mask: two biases, neither read as a flag
        features = report.sites[0].features
        assert features["causal"] is None and features["mask"] is None and features["bias"].count("(") == 2
        return
    assert_stays_bias(report)


def test_plain_conjunction_is_read():
    """The look-alikes' own base (no change): read as window + key padding, so the changes above are what counts."""
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=6)
    assert_window_with_padding(compare(LookAlike("none"), q, k, v, _padding(2, 6, [1, 3], "left")), 3, "top_left")


# ----------------------------------------------------------------------------- real tiny models

def _tiny(name: str):
    transformers = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
                  intermediate_size=128, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if name == "mistral":
        config = transformers.MistralConfig(sliding_window=4, **common)
    elif name == "gemma2":
        config = transformers.Gemma2Config(sliding_window=4, query_pre_attn_scalar=16, **common)
    elif name == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **common)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


_WINDOWS = {"mistral": (4, 4), "gemma2": (4, None), "llama": (None, None), "qwen2": (None, 4)}
_SOFTCAPPED = {"gemma2"}  # full layers that go to FlexAttention read causal + key padding (tests/test_flex_padding.py)


def _model_call(model, ids, mask, **kwargs):
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("name", ["mistral", "gemma2", "llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("grad", [False, True])
def test_real_models(name, side, grad):
    """Logits and (with ``grad``) every parameter's gradient (a loss over every position, padded ones included)
    equal the unrewritten model's; sliding-window layers read their window + key padding, full layers their bias
    (causal + key padding where a softcap sends them to FlexAttention)."""
    torch._dynamo.reset()
    reference = _tiny(name)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = _padding(3, 10, [0, 4, 7], side)
    weight = torch.randn(3, 10, 100, generator=torch.Generator().manual_seed(1))
    outputs = []
    for model in (reference, optimized):
        with torch.set_grad_enabled(grad):
            logits = _model_call(model, ids, mask, use_cache=False)
        if grad:
            (logits * weight).sum().backward()
        outputs.append((logits.detach(), [p.grad for p in model.parameters()]))
    (expected, expected_grads), (actual, actual_grads) = outputs
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for e, a in zip(expected_grads, actual_grads):
        if grad:
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3)
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)
    for site, window in zip(sorted(report.sites, key=lambda s: s.name), _WINDOWS[name]):
        if window is None and name in _SOFTCAPPED:
            assert_site_reads(site.features, None, "top_left")
        elif window is None:
            assert_site_keeps_bias(site.features)
        else:
            assert_site_reads(site.features, window, "top_left")


def cached_decode_reports(reference, **options):
    """Prefill a left-padded batch into a cache, then decode two tokens (q_len 1 against the cached keys), through
    the transformers model ``reference`` and its optimized copy without gradients: every call's logits must be
    equal; yields the step (0: the prefill) and the optimized model's report after it."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    optimized = attnfuse.optimize(copy.deepcopy(reference), **options)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = _padding(2, 7, [0, 3], "left")
    steps = torch.randint(3, 100, (2, 2), generator=torch.Generator().manual_seed(3))
    caches = {model: transformers.DynamicCache(config=model.config) for model in (reference, optimized)}
    with torch.no_grad():
        for n in range(3):
            tokens = ids if n == 0 else steps[:, n - 1:n]
            step_mask = torch.cat([mask, torch.ones(2, n, dtype=mask.dtype)], 1)
            expected, actual = (_model_call(model, tokens, step_mask, past_key_values=caches[model], use_cache=True)
                                for model in (reference, optimized))
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
            yield n, attnfuse.report(optimized)


def test_real_model_with_a_cache():
    """Mistral: every call of a cached prefill and decode equals the unrewritten model's; the prefill reads window +
    key padding."""
    for n, report in cached_decode_reports(_tiny("mistral")):
        assert report.fused == len(report.sites) == 2, str(report)
        if n == 0:
            for site in report.sites:
                assert_site_reads(site.features, 4, "top_left")

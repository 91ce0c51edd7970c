"""Masks built from position tensors (``patterns/position_ids.py``): transformers 5.x's unpadded masks.

Without an attention mask, transformers (5.17 and 5.24 measured) builds its causal and sliding-window masks
from ``position_ids``: ``pos[b, q_idx]`` and ``pos[b, kv_idx]`` gathered with ``arange`` indices, ANDed with a
packed-sequence test ``cumsum(diff(pos, prepend=pos[:, :1] - 1) != 1)`` equal at both. Where ``pos`` is
``arange`` positions, the window is read from that structure (a window the kernels take, not a materialized
bias), at every size. Look-alikes whose positions are not provably linear stay the model's bias, and every
case equals the unrewritten code forward and backward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, assert_same_training_steps


class PositionMask(nn.Module):
    """transformers' spelling of a causal (optionally windowed) mask read through positions, with look-alikes:
    ``"arange"`` (positions ``arange(S) + offset``), ``"input"`` (positions given as an argument),
    ``"step2"`` (positions two apart: the window counts positions, not keys), ``"wrapped"`` (the query position
    read at ``q - 1``, which wraps to the last position for the first query), ``"no_prepend"`` (the
    packed-sequence test without ``prepend``) and ``"bad_prepend"`` (a prepend that is not the position
    before the first: not read as positions; every row is one document anyway, which evaluating it shows). Queries sit at the last ``L`` positions
    (a KV cache before them) or, without ``from_the_end``, at the first ``L`` (transformers without a cache)."""

    def __init__(self, spelling: str, window: int | None, offset: int = 0, from_the_end: bool = True) -> None:
        super().__init__()
        self.spelling, self.window, self.offset, self.from_the_end = spelling, window, offset, from_the_end

    def forward(self, q, k, v, given_positions):
        B, L, S = q.shape[0], q.shape[-2], k.shape[-2]
        if self.spelling == "input":
            pos = given_positions
        else:
            pos = (torch.arange(S) * (2 if self.spelling == "step2" else 1) + self.offset)[None].expand(B, -1)
        if self.spelling == "no_prepend":
            packed = torch.cat([torch.zeros(B, 1, dtype=torch.long), (torch.diff(pos, dim=-1) != 1).cumsum(-1)], -1)
        else:
            before = pos[:, :1] - (2 if self.spelling == "bad_prepend" else 1)
            packed = (torch.diff(pos, prepend=before, dim=-1) != 1).cumsum(-1)
        b = torch.arange(B)[:, None, None, None]
        qi = (torch.arange(L) + (S - L if self.from_the_end else 0))[None, None, :, None]
        if self.spelling == "wrapped":
            qi = qi - 1
        kv = torch.arange(S)[None, None, None, :]
        q_pos, kv_pos = pos[b, qi], pos[b, kv]
        keep = q.new_ones((), dtype=torch.bool) & (kv_pos <= q_pos)
        if self.window is not None:
            keep = keep & (kv_pos > q_pos - self.window)
        keep = keep & (packed[b, qi] == packed[b, kv])
        bias = torch.where(keep.expand(B, 1, L, S), torch.zeros(()), torch.finfo(q.dtype).min)
        s = q @ k.transpose(-1, -2) * 0.3 + bias
        return torch.softmax(s, dim=-1) @ v


def _qkv(B: int, L: int, S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 2, L, 8, generator=g).requires_grad_()
    k = torch.randn(B, 2, S, 8, generator=g).requires_grad_()
    v = torch.randn(B, 2, S, 8, generator=g).requires_grad_()
    return q, k, v


@settings(max_examples=12)
@given(L=st.integers(1, 9), extra=st.integers(0, 5), window=st.one_of(st.none(), st.integers(1, 6)),
       offset=st.integers(0, 3), B=st.integers(1, 3))
def test_arange_positions_read_as_causal_and_window(L, extra, window, offset, B):
    S = L + extra
    report = assert_fused_equal(PositionMask("arange", window, offset), (*_qkv(B, L, S), None))
    features = report.sites[0].features
    if S == 1:  # one key: nothing is masked, and the 1-element bias may stay
        return
    assert features["bias"] is None and features["mask"] is None, features
    assert features["causal"] in ("top_left", "bottom_right") and features["window"] == window, features


@pytest.mark.parametrize("spelling", ["input", "step2", "wrapped", "no_prepend", "bad_prepend"])
@pytest.mark.parametrize("window", [None, 3])
def test_look_alikes_stay_exact(spelling, window):
    """Each look-alike equals the original; those whose positions are not provably ``arange`` keep the bias."""
    B, L, S = 2, 6, 8
    positions = torch.arange(S)[None].expand(B, -1).clone()
    positions[1, 4:] -= 4  # a second packed sequence in row 1: the document term masks across it
    report = assert_fused_equal(PositionMask(spelling, window), (*_qkv(B, L, S), positions))
    features = report.sites[0].features
    if spelling in ("input", "wrapped"):  # (``bad_prepend``'s document test is a constant of the graph, all True)
        assert features["bias"] is not None and features["window"] is None, features
    if spelling == "step2":  # positions two apart: the window (in positions) is not a window of keys
        assert features["window"] is None, features


def test_many_lengths_in_one_process():
    """One module, lengths that change call to call (Dynamo makes them dynamic): read the same way each time.
    (Queries at the last ``L`` of ``S`` positions gather at ``q + S - L``, which is not provably a valid index
    once ``L`` and ``S`` are symbolic: ``S < L`` would wrap around. They stay exact, as a bias.)"""
    torch._dynamo.reset()
    module = PositionMask("arange", 3, from_the_end=False)
    optimized = attnfuse.optimize(copy.deepcopy(module))
    for L in (5, 9, 7, 12):
        args = _qkv(2, L, L, seed=L)
        torch.testing.assert_close(optimized(*args, None), module(*args, None), atol=2e-5, rtol=1e-4)
    for site in attnfuse.report(optimized).sites:
        assert site.features["window"] == 3 and site.features["bias"] is None, site.features


# ----------------------------------------------------------------------------- real tiny models, no padding

def _tiny(name: str):
    transformers = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
                  intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    if name == "mistral":
        config = transformers.MistralConfig(sliding_window=4, **common)
    elif name == "gemma2":
        config = transformers.Gemma2Config(sliding_window=4, query_pre_attn_scalar=16, **common)
    else:
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    model.config.use_cache = False
    return model


# per layer (sorted by name): the window it must read
_WINDOWS = {"mistral": (4, 4), "gemma2": (4, None), "qwen2": (None, 4)}


@pytest.mark.parametrize("name", sorted(_WINDOWS))
def test_real_models_without_padding(name):
    """Logits and every parameter's gradient equal the unrewritten model's at several lengths in one process;
    each layer reads causal (and its window) with no bias."""
    torch._dynamo.reset()
    reference = _tiny(name)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    assert_same_training_steps(reference, optimized, (10, 7, 13))
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)
    for site, window in zip(sorted(report.sites, key=lambda s: s.name), _WINDOWS[name]):
        features = site.features
        assert features["bias"] is None and features["mask"] is None and features["causal"] == "top_left", features
        assert features["window"] == window, features


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma2", "mistral"])
@pytest.mark.parametrize("grad", [False, True])
def test_real_models_without_padding_on_gpu(name, grad):
    """CUDA, bf16: each layer runs its causal window on a kernel (Gemma 2's softcapped layers on FlexAttention with
    a window block mask); logits and parameter gradients are as close to the fp32 model's as the unrewritten bf16
    model's are. ``python -m pytest -m gpu tests/test_position_ids.py``."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    exact = _tiny(name).to("cuda", torch.float32)
    reference = copy.deepcopy(exact).to(torch.bfloat16)
    optimized = attnfuse.optimize(copy.deepcopy(reference))
    ids = torch.randint(3, 100, (4, 30), generator=torch.Generator().manual_seed(0)).cuda()
    weight = torch.randn(4, 30, 100, generator=torch.Generator().manual_seed(1)).cuda()
    outputs = []
    for model in (exact, reference, optimized):
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids).logits.float()
        found = torch.autograd.grad((logits * weight).sum(), list(model.parameters())) if grad else []
        outputs.append((logits.detach(), [g.float() for g in found]))
    (truth, true_grads), (expected, expected_grads), (actual, actual_grads) = outputs
    assert (actual - truth).abs().max() <= 2 * (expected - truth).abs().max() + 1e-2
    for t, e, a in zip(true_grads, expected_grads, actual_grads):
        own_error, error = (e - t).abs().max().item(), (a - t).abs().max().item()
        assert error <= 2 * own_error + 1e-2 * t.abs().max().item() + 1e-3, (error, own_error)
    report = attnfuse.report(optimized)
    assert report.fused == len(report.sites) == 2, str(report)
    for site, window in zip(sorted(report.sites, key=lambda s: s.name), _WINDOWS[name]):
        assert site.features["bias"] is None and site.features["window"] == window, site.features
        if name == "gemma2":
            assert site.backend == "flex", str(report)

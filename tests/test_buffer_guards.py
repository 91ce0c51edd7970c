"""A registered causal buffer (nanoGPT's ``tril``) written behind the version counter: through
``.data``, a NumPy view, or ``.data =`` assignment. The guard recomputes the mask from the buffer at
every call, so each write is seen; the site returns to the causal path when the triangle is back."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from attnfuse import lower
from helpers import grads, leaf_copies


class NanoGPTAttention(nn.Module):
    def __init__(self, block_size: int = 16, fill: float = float("-inf")):
        super().__init__()
        self.fill = fill
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, self.fill)
        return F.softmax(att, dim=-1) @ v


def _inputs(T: int = 7, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, T, 8, generator=g).requires_grad_() for _ in range(3))


def _assert_same(model, reference, args) -> None:
    a_args, e_args = leaf_copies(args), leaf_copies(args)
    actual, expected = model(*a_args), reference(*e_args)
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=2e-5, rtol=1e-4)
    if not expected.isnan().any():
        for a, e in zip(grads(actual, list(a_args)), grads(expected, list(e_args))):
            torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)


def _write(buffer: torch.Tensor, how: str, index: tuple, value: float) -> None:
    if how == "data":
        buffer.data[index] = value
    elif how == "numpy":
        buffer.numpy()[index] = value
    else:
        with torch.no_grad():
            buffer[index] = value


class CausalCalls:
    """Records whether each fused call ran on the causal flag or with an explicit mask."""

    def __init__(self, monkeypatch):
        self.causal: list = []
        real = lower.attend

        def spy(*args, **kwargs):
            self.causal.append(kwargs["causal"] if kwargs["mask"] is None else None)
            return real(*args, **kwargs)

        monkeypatch.setattr(lower, "attend", spy)


@pytest.mark.parametrize("how", ["data", "numpy", "no_grad"])
def test_buffer_written_behind_the_guard_is_seen_and_the_causal_path_comes_back(how, monkeypatch):
    calls = CausalCalls(monkeypatch)
    model, reference = NanoGPTAttention(), NanoGPTAttention()
    attnfuse.optimize(model)
    args = _inputs()
    _assert_same(model, reference, args)
    assert calls.causal == ["top_left"]
    for buffer in (model.bias, reference.bias):  # every row now also ignores key 0: row 0 keeps no key (NaN)
        _write(buffer, how, (..., 0), 0.0)
    if how != "no_grad":
        assert model.bias._version == 0  # invisible to a guard keyed by the version counter
    _assert_same(model, reference, args)
    assert calls.causal[-1] is None
    for buffer in (model.bias, reference.bias):  # the triangle is back: the causal path again
        _write(buffer, how, (..., 0), 1.0)
    _assert_same(model, reference, args)
    assert calls.causal[-1] == "top_left"


def test_buffer_storage_swapped_through_data_assignment():
    model, reference = NanoGPTAttention(), NanoGPTAttention()
    attnfuse.optimize(model)
    args = _inputs()
    _assert_same(model, reference, args)
    anti = torch.triu(torch.ones(16, 16)).view(1, 1, 16, 16)  # keys after the query instead
    model.bias.data = anti.clone()
    reference.bias.data = anti.clone()
    _assert_same(model, reference, args)


@given(writes=st.lists(st.tuples(st.sampled_from(["data", "numpy", "no_grad"]), st.integers(0, 15),
                                 st.integers(0, 15), st.sampled_from([0.0, 1.0])), min_size=1, max_size=4),
       fill=st.sampled_from([float("-inf"), -1e9, -torch.finfo(torch.float32).max]),
       T=st.integers(1, 9))
def test_fuzzed_buffer_writes_match_the_original(writes, fill, T):
    torch._dynamo.reset()
    model, reference = NanoGPTAttention(fill=fill), NanoGPTAttention(fill=fill)
    attnfuse.optimize(model)
    args = _inputs(T)
    _assert_same(model, reference, args)
    for how, i, j, value in writes:
        _write(model.bias, how, (0, 0, i, j), value)
        _write(reference.bias, how, (0, 0, i, j), value)
        _assert_same(model, reference, args)

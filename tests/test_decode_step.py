"""A decode step (one query against a cache) through ``attend``: the shortcuts that skip per-call work keep the
original's result (a bottom-right triangle at q_len 1 masks nothing; no ``-inf`` bias row once the far-rows read
found none) and the call leaves no reference cycle holding its tensors."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnfuse
from attnfuse.kernels import call as call_module


def reference(q, k, v, keep=None, bias=None):
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("S", [1, 5])
@pytest.mark.parametrize("window", [None, 2, 5, 10])
def test_bottom_right_causal_at_one_query_matches_the_triangle(S, window):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, S, 8, requires_grad=True) for _ in range(2))
    keep = torch.ones(1, S, dtype=torch.bool).tril(S - 1)
    if window is not None:
        keep = keep.triu(S - window)
    out = attnfuse.attend(q, k, v, causal="bottom_right", window=window)
    expected = reference(q, k, v, keep=keep)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_a_row_of_neginf_bias_still_gives_nan_with_the_far_rows_read_before_it():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    bias = torch.zeros(2, 1, 3, 6)
    bias[1, 0, 2] = -float("inf")
    out = attnfuse.attend(q, k, v, bias=bias)
    torch.testing.assert_close(out, reference(q, k, v, bias=bias), equal_nan=True)
    assert out[1, :, 2].isnan().all() and not out[0].isnan().any()


def test_a_bias_without_such_rows_skips_the_second_pass(monkeypatch):
    calls = []
    real = call_module.rows_beyond_kernel_range
    monkeypatch.setattr(call_module, "rows_beyond_kernel_range", lambda *a: calls.append(1) or real(*a))
    from attnfuse.kernels import rows

    monkeypatch.setattr(rows, "rows_of_neginf", lambda *a, **kw: pytest.fail("rows_of_neginf ran"))
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    bias = torch.zeros(2, 1, 1, 6)
    bias[1, ..., :2] = torch.finfo(torch.float32).min
    torch.testing.assert_close(attnfuse.attend(q, k, v, bias=bias), reference(q, k, v, bias=bias))
    assert calls == [1]


def test_a_call_leaves_no_cycle_holding_its_tensors():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    bias = torch.zeros(2, 1, 1, 6)
    alive = weakref.ref(bias)
    gc.disable()
    try:
        attnfuse.attend(q, k, v, bias=bias)
        del bias
        assert alive() is None
    finally:
        gc.enable()

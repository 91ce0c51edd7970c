"""A decode step (one query against a cache) through ``attend``: the shortcuts that skip per-call work keep the
original's result (a bottom-right triangle at q_len 1 masks nothing; one host read for a bias's rows) and the call leaves no reference cycle holding its tensors."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnfuse


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


class HostReads:
    """Counts host reads of tensor values (``bool()``, ``.item()``, ``.tolist()``: each a synchronization on CUDA)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("__bool__", "item", "tolist"):
            real = getattr(torch.Tensor, name)

            def counting(tensor, *args, _real=real, **kwargs):
                self.count += 1
                return _real(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize("low_rows", [False, True], ids=["bias", "finfo.min rows"])
@pytest.mark.parametrize("padded", [False, True], ids=["no mask", "key padding"])
@pytest.mark.parametrize("grad", [False, True])
def test_a_bias_call_reads_the_host_once(monkeypatch, low_rows, padded, grad):
    """The rows below the kernels' range, the ``-inf`` rows and the whole-row check of a bias are one host read
    (before: one each, and one more for the uniformity of rows that low). With key padding, the rows without keys
    take one more where a kernel reads them: SDPA with gradients (with its leak flag), or the unfused path that a
    ``finfo.min`` row over padded keys sends the call to. The results stay the original's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=grad) for _ in range(3))
    bias = torch.randn(2, 1, 6, 6)
    if low_rows:  # transformers' mask over left-padded queries
        bias[1, :, :2] = torch.finfo(torch.float32).min
    keep = None
    if padded:
        keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
        keep[1, ..., :3] = False
    reads = HostReads(monkeypatch)
    out = attnfuse.attend(q, k, v, bias=bias, mask=keep)
    assert reads.count == (2 if padded and (grad or low_rows) else 1)
    monkeypatch.undo()
    expected = reference(q, k, v, keep=keep, bias=bias)
    torch.testing.assert_close(out, expected)
    if grad:
        for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
            torch.testing.assert_close(got, want)


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

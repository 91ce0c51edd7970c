"""Masks with a finite fill added in half precision: a query row whose every key holds the fill (a left-padded query)
is uniform in the original, where fp16's or bf16's ``s + fill`` rounds to the fill, but a fused kernel adds the bias
in fp32, where a fill such as -1e4 or -65504 does not absorb the score. Such calls must give the original's rows (the
site's own ops run), also where the sum is upcast before the softmax (LLaMA's reference code) and with gradients."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, grads, leaf_copies

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FILLS = ["lowest", -1e9, -1e4, -65504.0, float("-inf")]


class FilledMask(nn.Module):
    """``softmax(q k^T * scale + mask) @ v`` with ``mask`` built from a key keep-mask as ``where(keep, 0, fill)`` or
    ``zeros.masked_fill(~keep, fill)`` in q's dtype; ``upcast``: the sum is cast to fp32 before the softmax."""

    def __init__(self, fill, upcast: bool, spelling: str) -> None:
        super().__init__()
        self.fill, self.upcast, self.spelling = fill, upcast, spelling

    def forward(self, q, k, v, keep):
        fill = torch.finfo(q.dtype).min if self.fill == "lowest" else self.fill
        keep = keep[:, None, None, :]
        if self.spelling == "where":
            mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype, device=q.device), fill)
        else:
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, fill)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + mask
        weights = torch.softmax(scores.float(), -1).to(q.dtype) if self.upcast else torch.softmax(scores, -1)
        return weights @ v


def inputs(L: int, S: int, dtype: torch.dtype, grad: bool, seed: int, empty_row: bool = True) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, n, 16, generator=g).to(dtype).requires_grad_(grad) for n in (L, S, S))
    keep = torch.rand(3, S, generator=g) > 0.3
    keep[:, 0] = True
    if empty_row:
        keep[1] = False  # every key of this batch row is padding: its query rows keep no key
    return q, k, v, keep


def tolerance(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def skip_unrepresentable(dtype: torch.dtype, fill) -> None:
    if dtype == torch.float16 and fill == -1e9:
        pytest.skip("-1e9 overflows fp16 (the fill becomes -inf)")


@pytest.mark.parametrize("dtype,fill", list(itertools.product(DTYPES, FILLS)))
def test_rows_without_keys_match_the_original(dtype, fill):
    skip_unrepresentable(dtype, fill)
    with torch.no_grad():
        assert_fused_equal(FilledMask(fill, upcast=True, spelling="where"),
                           inputs(5, 9, dtype, grad=False, seed=0), **tolerance(dtype))


@settings(deadline=None)
@given(dtype=st.sampled_from(DTYPES), fill=st.sampled_from(FILLS), upcast=st.booleans(),
       spelling=st.sampled_from(["where", "masked_fill"]), grad=st.booleans(), empty_row=st.booleans(),
       L=st.integers(1, 6), S=st.integers(1, 10), seed=st.integers(0, 2 ** 16))
def test_finite_fills_in_every_dtype(dtype, fill, upcast, spelling, grad, empty_row, L, S, seed):
    """Forward and backward equal the original's for every fill, dtype, spelling and length."""
    if dtype == torch.float16 and fill == -1e9:
        return
    args = inputs(L, S, dtype, grad, seed, empty_row)
    module = FilledMask(fill, upcast, spelling)
    if grad:
        assert_fused_equal(module, args, **tolerance(dtype))
    else:
        with torch.no_grad():
            assert_fused_equal(module, args, **tolerance(dtype))


class GivenMask(nn.Module):
    """The same attention with the ``0 / fill`` mask handed in (built before a graph break, or by the caller)."""

    def __init__(self, upcast: bool) -> None:
        super().__init__()
        self.upcast = upcast

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + mask
        weights = torch.softmax(scores.float(), -1).to(q.dtype) if self.upcast else torch.softmax(scores, -1)
        return weights @ v


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("dtype,fill", list(itertools.product(DTYPES, FILLS)))
def test_a_mask_handed_in_matches_the_original(dtype, fill, upcast):
    """A mask the graph receives has values nobody proved: rows without a live key are found on each call."""
    skip_unrepresentable(dtype, fill)
    q, k, v, keep = inputs(5, 9, dtype, grad=False, seed=1)
    value = torch.finfo(dtype).min if fill == "lowest" else fill
    mask = torch.zeros(3, 1, 1, 9, dtype=dtype).masked_fill(~keep[:, None, None, :], value)
    with torch.no_grad():
        assert_fused_equal(GivenMask(upcast), (q, k, v, mask), **tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype,fill", [(torch.bfloat16, -1e4), (torch.bfloat16, -65504.0), (torch.float16, -1e4),
                                        (torch.float16, "lowest"), (torch.bfloat16, "lowest")])
def test_rows_without_keys_on_cuda(dtype, fill, grad):
    """On the fused CUDA kernels (cuDNN, flash, memory-efficient), built in the graph and handed in."""
    q, k, v, keep = (t.cuda() for t in inputs(37, 70, dtype, grad=False, seed=2))
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    tolerance = dict(atol=3e-2, rtol=3e-2)
    assert_fused_equal(FilledMask(fill, upcast=True, spelling="where"), (q, k, v, keep), **tolerance)
    value = torch.finfo(dtype).min if fill == "lowest" else fill
    mask = torch.zeros(3, 1, 1, 70, dtype=dtype, device="cuda").masked_fill(~keep[:, None, None, :], value)
    assert_fused_equal(GivenMask(upcast=False), (q, k, v, mask), **tolerance)


class SelfAttentionUnderAutocast(nn.Module):
    """q, k and v one projection (one graph node given three times), scores in autocast's dtype, a mask added in fp32
    (``add_fp32``: promotes the sum), in the scores' dtype (``add_half``), or filled into the scores (``fill``)."""

    def __init__(self, fill, kind: str) -> None:
        super().__init__()
        self.fill, self.kind = fill, kind
        self.proj = nn.Linear(16, 16)

    def forward(self, x, keep):
        q = k = v = self.proj(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * 8 ** -0.5
        fill = torch.finfo(scores.dtype).min if self.fill == "lowest" else self.fill
        keep = keep[:, None, None, :]
        if self.kind == "add_fp32":
            scores = scores + torch.zeros(keep.shape, device=x.device).masked_fill(~keep, fill)
        elif self.kind == "add_half":
            scores = scores + torch.zeros(keep.shape, dtype=scores.dtype, device=x.device).masked_fill(~keep, fill)
        else:
            scores = scores.masked_fill(~keep, fill)
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)


def assert_same_under_autocast(fill, kind: str, dtype: torch.dtype, grad: bool, device: str, keys: int) -> None:
    """``SelfAttentionUnderAutocast`` and its optimized copy under autocast on ``device``: fused, the same output
    (NaN where a ``-inf`` fill leaves a row without keys) and, with ``grad``, the same gradient of x."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = SelfAttentionUnderAutocast(fill, kind).to(device)
    reference, optimized = copy.deepcopy(module), attnfuse.optimize(module)
    x = torch.randn(3, keys, 16, device=device, requires_grad=grad)
    keep = torch.rand(3, keys, device=device) > 0.3
    keep[:, 0], keep[1] = True, False
    ref_args, opt_args = leaf_copies((x, keep)), leaf_copies((x, keep))
    with torch.autocast(device, dtype=dtype), torch.set_grad_enabled(grad):
        expected, actual = reference(*ref_args), optimized(*opt_args)
    assert attnfuse.report(optimized).fused == 1
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=3e-2,
                               equal_nan=fill == float("-inf"))
    if grad and not expected.isnan().any():
        torch.testing.assert_close(grads(actual.float(), [opt_args[0]])[0], grads(expected.float(), [ref_args[0]])[0],
                                   atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", ["add_fp32", "add_half", "fill"])
@pytest.mark.parametrize("dtype,fill", list(itertools.product([torch.bfloat16, torch.float16], FILLS)))
def test_masks_under_autocast(dtype, fill, kind, grad):
    """Under autocast a row without keys is the original's with any fill (fp16's -1e9 in fp32 too, which the kernels
    would take as -inf), and q, k and v read from one node compile (the site's own ops are kept for such calls)."""
    if dtype == torch.float16 and fill == -1e9 and kind != "add_fp32":
        pytest.skip("-1e9 overflows fp16: the original raises")
    assert_same_under_autocast(fill, kind, dtype, grad, "cpu", keys=9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fill,kind", [(torch.float16, -1e9, "add_fp32"), (torch.float16, "lowest", "add_half"),
                                             (torch.bfloat16, -1e4, "add_half"), (torch.bfloat16, -1e4, "fill")])
def test_masks_under_autocast_on_cuda(dtype, fill, kind):
    assert_same_under_autocast(fill, kind, dtype, True, "cuda", keys=70)

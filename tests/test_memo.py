"""Facts memoized per unchanged tensor (attnfuse.memo) and the cheap SDPA kernel scope.

A memoized fact that outlived an in-place change of its mask would give a wrong answer on the
rows that lost every key, so each test changes a mask between calls and compares with the
unrewritten module.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.nn.attention import SDPBackend

import attnfuse
from attnfuse import masking
from attnfuse.kernel_scope import kernel_scope
from attnfuse.memo import ContentMemo
from seed_modules import PaddingStyle


def test_memo_computes_once_per_unchanged_tensor_and_again_after_a_write():
    memo, calls = ContentMemo(), []
    mask = torch.ones(2, 5, dtype=torch.bool)

    def compute():
        calls.append(1)
        return bool((~mask).any())

    assert memo.get(mask, "k", compute) is False
    assert memo.get(mask, "k", compute) is False
    assert memo.get(mask[:, None, None, :], "k", lambda: "view") == "view"  # another geometry: its own fact
    assert len(calls) == 1
    mask[0, 3] = False  # in place: the version counter moves
    assert memo.get(mask, "k", compute) is True
    mask[:, None][1, 0, 2] = False  # a write through a view moves the shared counter too
    assert memo.get(mask, "k", lambda: "recomputed") == "recomputed"
    assert len(calls) == 2


def test_memo_forgets_a_tensor_when_it_dies():
    memo = ContentMemo()
    mask = torch.ones(3, dtype=torch.bool)
    memo.get(mask, None, lambda: 1)
    assert len(memo) == 1
    del mask
    gc.collect()
    assert len(memo) == 0


def test_memo_keeps_a_bounded_number_of_facts_per_tensor():
    from attnfuse.memo import MAX_FACTS_PER_TENSOR

    memo = ContentMemo()
    cache = torch.ones(1, 1, 1, 4096, dtype=torch.bool)  # a long-lived mask, sliced anew at every step
    for step in range(1, 3 * MAX_FACTS_PER_TENSOR):
        assert memo.get(cache[..., :step], None, lambda step=step: step) == step
    assert memo.facts_about(cache) == MAX_FACTS_PER_TENSOR


def test_memo_never_stores_for_inference_tensors():
    memo, calls = ContentMemo(), []
    with torch.inference_mode():
        mask = torch.ones(3, dtype=torch.bool)
        memo.get(mask, None, lambda: calls.append(1))
        memo.get(mask, None, lambda: calls.append(1))
    assert len(calls) == 2 and len(memo) == 0


def _padding_inputs(b=3, h=2, n=7, d=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    return q, k, v, torch.ones(b, n, dtype=torch.bool)


def test_mask_changed_in_place_between_calls_still_matches_the_original():
    q, k, v, mask = _padding_inputs()
    module = PaddingStyle().eval()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))
    mask[1] = False  # batch row 1 now has no key at all: its output must become the mean of v
    mask[2, 3:] = False
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))
    mask[1] = True  # and back
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))


def test_new_mask_objects_each_call_are_checked_each_time():
    q, k, v, _ = _padding_inputs()
    module = PaddingStyle().eval()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    for dead_batch in (None, 0, 2, None):
        mask = torch.ones(3, 7, dtype=torch.bool)
        if dead_batch is not None:
            mask[dead_batch] = False
        torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))


def test_attend_skips_the_row_check_only_while_the_mask_is_unchanged():
    q, k, v, mask = _padding_inputs()
    keep = mask[:, None, None, :]
    assert masking.rows_without_keys(keep, None, 7, 7, q.device) is None
    mask[0] = False
    dead = masking.rows_without_keys(mask[:, None, None, :], None, 7, 7, q.device)
    assert dead is not None and dead[0].all() and not dead[1:].any()
    out = attnfuse.attend(q, k, v, mask=mask[:, None, None, :], fully_masked_rows="mean")
    torch.testing.assert_close(out[0], v[0].mean(-2, keepdim=True).expand_as(out[0]))


def test_two_masks_combine_into_one_tensor_while_both_are_unchanged():
    padding = torch.ones(2, 5, dtype=torch.bool)
    custom = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    first = masking.conjunction(padding[:, None, None, :], custom)
    assert masking.conjunction(padding[:, None, None, :], custom[:]) is first  # fresh views, same masks
    torch.testing.assert_close(first, padding[:, None, None, :] & custom)
    padding[1, 2] = False
    second = masking.conjunction(padding[:, None, None, :], custom)
    assert second is not first and not second[1, ..., 2].any()
    custom[0, 0, 0] = False
    third = masking.conjunction(padding[:, None, None, :], custom)
    assert third is not second and not third[0, 0, 0].any()
    torch.testing.assert_close(third, padding[:, None, None, :] & custom)


class TwoMasks(torch.nn.Module):
    """A key-padding mask and a per-pair mask, both filled into the scores."""

    def forward(self, q, k, v, padding, allowed):
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        sim = sim.masked_fill(~padding[:, None, None, :], -torch.finfo(sim.dtype).max)
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        return torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(-1), v)


def test_site_with_two_masks_changed_in_place_still_matches_the_original():
    q, k, v, padding = _padding_inputs()
    allowed = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    module = TwoMasks()
    optimized = attnfuse.optimize(TwoMasks())
    torch.testing.assert_close(optimized(q, k, v, padding, allowed), module(q, k, v, padding, allowed))
    assert attnfuse.report(optimized).fused == 1
    allowed[0, 0, 2] = False  # query row 2 of batch 0 loses every key: the mean of v, as the original
    padding[2, :4] = False
    for _ in range(2):
        torch.testing.assert_close(optimized(q, k, v, padding, allowed), module(q, k, v, padding, allowed))
    allowed[0, 0, 2] = True
    torch.testing.assert_close(optimized(q, k, v, padding, allowed), module(q, k, v, padding, allowed))


def test_kernel_scope_enables_only_the_order_and_restores_the_global_state():
    from torch.nn.attention import _cur_sdpa_kernel_backends

    q = k = v = torch.randn(1, 1, 4, 8)
    before = (_cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order())
    with kernel_scope([SDPBackend.MATH], q):
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        assert torch._fused_sdp_choice(q, k, v) == int(SDPBackend.MATH)
    assert (_cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order()) == before
    with pytest.raises(RuntimeError):
        with kernel_scope([SDPBackend.FLASH_ATTENTION], q):
            raise RuntimeError("a kernel refused")
    assert (_cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order()) == before

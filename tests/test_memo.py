"""Facts about a mask's values, read at every call (attnfuse.memo), and the cheap SDPA kernel scope.

A fact that outlived a change of its mask would give a wrong answer on the rows that lost every
key, so each test changes a mask between calls (in place, through ``.data``, through a NumPy view)
and compares with the unrewritten module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend

import attnfuse
from attnfuse.kernels import rows as masking
from attnfuse.kernels.kernel_scope import kernel_scope
from attnfuse.memo import host_bool, host_bools
from seed_modules import PaddingStyle


def test_data_writes_do_not_move_the_version_counter():
    """Why nothing is memoized by version: ``t.data`` has a counter of its own, NumPy views none."""
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask.data[0, 1] = False
    mask.numpy()[1, 2] = False
    assert mask._version == 0 and not mask[0, 1] and not mask[1, 2]


def test_host_reads_in_eager_mode_and_not_under_a_tracer():
    assert host_bool(torch.tensor(True)) is True
    assert host_bools(torch.tensor(False), torch.tensor([True])) == [False, True]
    with torch._subclasses.FakeTensorMode():
        assert host_bool(torch.tensor(True)) is None


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


def test_rows_without_keys_follows_the_mask_values_at_every_call():
    q, k, v, mask = _padding_inputs()
    keep = mask[:, None, None, :]
    assert masking.rows_without_keys(keep, None, 7, 7, q.device) is None
    mask[0] = False
    dead = masking.rows_without_keys(mask[:, None, None, :], None, 7, 7, q.device)
    assert dead is not None and dead[0].all() and not dead[1:].any()
    mask.data[0] = True  # not seen by the version counter, seen here
    assert masking.rows_without_keys(keep, None, 7, 7, q.device) is None
    out = attnfuse.attend(q, k, v, mask=(~mask)[:, None, None, :], fully_masked_rows="mean")
    torch.testing.assert_close(out[0], v[0].mean(-2, keepdim=True).expand_as(out[0]))


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_mask_written_behind_the_version_counter_still_matches_the_original(write):
    q, k, v, mask = _padding_inputs()
    module = PaddingStyle().eval()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))
    view = mask.data if write == "data" else mask.numpy()
    view[1] = False  # batch row 1 loses every key: the mean of v, as in the original
    view[2, 3:] = False
    assert mask._version == 0
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))
    view[1] = True
    torch.testing.assert_close(optimized(q, k, v, mask), module(q, k, v, mask))


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

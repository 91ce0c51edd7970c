"""The named contract between a site and its fused call (``attnfuse.site_inputs``), and the keep-mask assembly."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from attnfuse.masking import keep_from_masks
from attnfuse.site_inputs import InputLayout, SiteTensors, dropout_p

groups = st.fixed_dictionaries({name: st.integers(0, 3) for name in
                                ("masks", "biases", "factors", "leaves", "guards", "dropout", "original")})


@given(counts=groups)
def test_split_gives_back_each_group(counts):
    """Whatever the counts, the flat order of a call splits back into the same named groups."""
    named = SiteTensors("q", "k", "v", **{name: tuple(f"{name}{i}" for i in range(n)) for name, n in counts.items()})
    layout = InputLayout.of(named)
    assert layout == InputLayout(**counts)
    assert layout.split(named.flat()) == named


def test_a_call_with_other_inputs_is_refused():
    layout = InputLayout(masks=1, biases=2)
    with pytest.raises(RuntimeError, match="called with 5 inputs, its layout has 6"):
        layout.split(tuple(range(5)))


def test_run_time_dropout_p_is_checked():
    assert dropout_p(SiteTensors(0, 0, 0), 0.25) == 0.25
    assert dropout_p(SiteTensors(0, 0, 0, dropout=(torch.tensor(0.5),)), 0.0) == 0.5
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout_p(SiteTensors(0, 0, 0, dropout=(1.5,)), 0.0)


def test_keep_from_masks():
    """A bool mask keeps where True (False when negated), a 0/1 mask where not 0; several are ANDed."""
    bool_mask = torch.tensor([True, False, True, True])
    product_mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    keep = keep_from_masks([bool_mask, product_mask], [False, False], lambda m: m)
    assert keep.tolist() == [True, False, False, True]
    assert keep_from_masks([bool_mask], [True], lambda m: m).tolist() == [False, True, False, False]
    assert keep_from_masks([], [], lambda m: m) is None


class _Everything(nn.Module):
    """A site with a keep-mask, a bias, a tensor factor and a run-time dropout p: every group but guards."""

    def forward(self, q, k, v, mask, bias, temperature, p):
        s = (q @ k.transpose(-1, -2)) * temperature
        s = (s + bias).masked_fill(~mask, float("-inf"))
        return torch.nn.functional.dropout(s.softmax(-1), p=p, training=False) @ v


def test_fused_call_reads_its_groups_by_name():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask, bias = torch.rand(2, 1, 1, 5) > 0.2, torch.randn(3, 5, 5)
    temperature = torch.rand(2, 3, 5, 1) + 0.5
    mask[..., 0] = True
    module = _Everything()
    expected = module(q, k, v, mask, bias, temperature, 0.1)
    optimized = attnfuse.optimize(_Everything(), verify=False)
    torch.testing.assert_close(optimized(q, k, v, mask, bias, temperature, 0.1), expected)
    report = attnfuse.report(optimized)
    assert report.fused == 1, str(report)

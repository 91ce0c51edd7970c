"""Attention the model already runs through PyTorch's fused entry points: reported as such, and
``nn.MultiheadAttention`` moved to its SDPA path when its weights are never read."""
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from helpers import assert_fused_equal, run_both


class Multihead(nn.Module):
    def __init__(self, width: int, heads: int, need_weights, batch_first: bool, returns_weights: bool = False,
                 kdim=None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.need_weights, self.returns_weights = need_weights, returns_weights

    def forward(self, x, memory, key_padding_mask=None):
        kwargs = {} if self.need_weights is None else {"need_weights": self.need_weights}
        out, weights = self.mha(x, memory, memory, key_padding_mask=key_padding_mask, **kwargs)
        return (out, weights) if self.returns_weights else out


class OwnSdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 5), length=st.integers(1, 7),
       memory=st.integers(1, 7), batch_first=st.booleans(), kdim=st.sampled_from([None, 3]),
       need_weights=st.sampled_from([None, True]), train=st.booleans())
def test_multihead_weights_never_read_run_on_sdpa(heads, head_dim, length, memory, batch_first, kdim, need_weights,
                                                   train):
    torch.manual_seed(0)
    width = heads * head_dim
    module = Multihead(width, heads, need_weights, batch_first, kdim=kdim).train(train)
    x, mem = torch.randn(2, length, width), torch.randn(2, memory, kdim or width)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    report = assert_fused_equal(module, (x.requires_grad_(), mem.requires_grad_()))
    assert report.sites[0].name == "Multihead.mha" and "need_weights=False" in str(report), str(report)


def test_multihead_weights_read_stay_unfused_with_a_reason():
    torch._dynamo.reset()
    module = Multihead(8, 2, True, True, returns_weights=True)
    x = torch.randn(2, 5, 8)
    expected, actual, report, _, _ = run_both(module, (x, x))
    torch.testing.assert_close(actual, expected)
    assert report.fused == 0 and report.skipped == 1 and "pass need_weights=False" in report.sites[0].reason


def test_multihead_with_padding_mask_is_left_as_written():
    torch._dynamo.reset()
    module = Multihead(8, 2, None, True)
    x, padding = torch.randn(2, 5, 8, requires_grad=True), torch.zeros(2, 5, dtype=torch.bool)
    padding[1] = True  # every key of the second sequence masked: the two paths could differ there
    expected, actual, report, ref_args, opt_args = run_both(module, (x, x, padding))
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert report.skipped == 1 and "a mask" in report.sites[0].reason, str(report)


def test_multihead_already_on_sdpa_and_own_sdpa_are_reported_as_native():
    torch._dynamo.reset()
    model = attnfuse.optimize(Multihead(8, 2, False, True))
    model(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    report = attnfuse.report(model)
    assert [s.status for s in report.sites] == ["native"] and "already on a fused kernel" in str(report)
    own = attnfuse.audit(OwnSdpa(), *(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert own.sites[0].status == "native" and own.sites[0].backend == "the model's own sdpa"
    assert own.to_dict()["already_fused"] == 1

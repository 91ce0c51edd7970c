"""The per-call shortcuts of a fused site (``lower._same_batch``: q, k and v already 4-d with one batch, nothing to
broadcast) give the original's result, and so does the general path beside them (q shared over the batch, over
heads, a 3-d single-head site), each checked against the unrewritten model on inputs that take it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfuse.lower as lower
from helpers import assert_fused_equal, count_host_reads


class GroupedDecode(nn.Module):
    """Llama-style attention: k, v heads repeated for groups of query heads, a ``(B, 1, 1, S)`` additive mask."""

    def forward(self, q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + mask
        return scores.softmax(-1) @ v


class PlainAttention(nn.Module):
    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) / 3.0).softmax(-1) @ v


def _padding_mask(B: int, S: int) -> torch.Tensor:
    mask = torch.zeros(B, 1, 1, S)
    mask[B // 2:, ..., : S // 3] = torch.finfo(torch.float32).min
    return mask


def _taken_paths(monkeypatch) -> list[bool]:
    """Whether each fused call took the shortcut (``_same_batch`` gave the batch)."""
    taken, real = [], lower._same_batch

    def recording(*args):
        found = real(*args)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(lower, "_same_batch", recording)
    return taken


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("L", [1, 3])
def test_grouped_heads_take_the_shortcut(monkeypatch, grad, L):
    torch.manual_seed(0)
    taken = _taken_paths(monkeypatch)
    q = torch.randn(4, 4, L, 8, requires_grad=grad)
    k, v = (torch.randn(4, 2, 6, 8, requires_grad=grad) for _ in range(2))
    assert_fused_equal(GroupedDecode(), (q, k, v, _padding_mask(4, 6)))
    assert taken and all(taken)


@pytest.mark.parametrize("shapes", [((1, 4, 2, 8), (3, 4, 5, 8)),  # latent queries shared over the batch
                                    ((3, 1, 2, 8), (3, 4, 5, 8)),  # one query head against several kv heads
                                    ((3, 2, 8), (3, 5, 8))],  # single-head 3-d site (batch rank 1)
                         ids=["q-over-batch", "q-over-heads", "three-d"])
def test_broadcast_queries_take_the_general_path(monkeypatch, shapes):
    torch.manual_seed(0)
    taken = _taken_paths(monkeypatch)
    q_shape, kv_shape = shapes
    q = torch.randn(*q_shape, requires_grad=True)
    k, v = (torch.randn(*kv_shape, requires_grad=True) for _ in range(2))
    assert_fused_equal(PlainAttention(), (q, k, v))
    assert taken and not any(taken)


class GroupedPaddedDecode(nn.Module):
    """Grouped heads and a boolean key-padding keep-mask replacing masked scores (a finite fill)."""

    def forward(self, q, k, v, keep):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
@pytest.mark.parametrize("empty_row", [False, True])
def test_long_cache_key_padding_reads_once(monkeypatch, bad, empty_row):
    """A decode step over a padded cache too large to copy (the zeroing limit set to 0): the rows without keys and the
    leak check of the output are read in one host read per call; a masked key's NaN or inf still gives the
    original's output (the call reruns unfused), and so does a sequence with every key padded (the mean of v)."""
    import attnfuse
    import attnfuse.kernels.sdpa as sdpa

    monkeypatch.setattr(sdpa, "ZEROING_LIMIT_BYTES", 0)
    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 8)
    k, v = (torch.randn(3, 2, 10, 8) for _ in range(2))
    keep = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., :4] = False
    if empty_row:
        keep[2] = False
    if bad is not None:
        k[1, :, 1] = bad
    module = GroupedPaddedDecode()
    with torch.no_grad():
        expected = module(q, k, v, keep)
        optimized = attnfuse.optimize(GroupedPaddedDecode())
        optimized(q, k, v, keep)  # the rewrite
        assert attnfuse.report(optimized).fused == 1
        reads = count_host_reads(monkeypatch)
        out = optimized(q, k, v, keep)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert reads == [1], reads


def test_shared_heads_answer_is_remembered_per_signature(monkeypatch):
    """Whether SDPA's pick takes grouped heads with a mask is asked once per call signature (metadata), not per
    call: the layers of one decode step ask once; a new key length asks again."""
    import attnfuse.kernels.sdpa as sdpa
    from torch.nn.attention import SDPBackend

    asked, real = [], sdpa._sdp_choice

    def counting(*args):
        asked.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(sdpa, "_sdp_choice", counting)
    sdpa._SHARED_HEADS.clear()
    order = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    for S in (7, 7, 7, 8, 8):
        q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 8)
        mask = torch.ones(2, 1, 1, S, dtype=torch.bool)
        assert sdpa._shares_kv_heads_with_a_mask(q, k, v, mask, 0.0, None, order) is False  # the CPU has no cuDNN
    assert len(asked) == 2


def test_attention_call_keeps_the_frozen_record_contract():
    """``AttentionCall``'s one-step constructor keeps what the dataclass promised: immutable, ``replace`` builds a new
    call with the other fields carried over, equality by fields."""
    import dataclasses

    from attnfuse.kernels.call import AttentionCall, CallFacts

    q = torch.randn(1, 2, 3, 4)
    call = AttentionCall(q, q, q, None, None, "top_left", None, None, None, None, 0.5, 0.0, "zero", False, None,
                         False, None, CallFacts())
    assert call.bias_fill is None and call.causal == "top_left" and call.scale_value == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.q = q
    changed = dataclasses.replace(call, causal=None, bias_fill=-1.0)
    assert (changed.causal, changed.bias_fill, changed.q) == (None, -1.0, q) and call.causal == "top_left"
    assert changed.facts is call.facts and dataclasses.replace(call) == call


class BoolBiasAttention(nn.Module):
    """A boolean tensor added to the scores: it adds as 0/1 numbers (not the single floating bias taken as it is)."""

    def forward(self, q, k, v, flags):
        return ((q @ k.transpose(-2, -1)) * 0.5 + flags).softmax(-1) @ v


@pytest.mark.parametrize("grad", [False, True])
def test_a_boolean_bias_is_added_as_numbers_on_the_shortcut(grad):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=grad) for n in (3, 5, 5))
    flags = torch.rand(2, 1, 3, 5) > 0.5
    assert_fused_equal(BoolBiasAttention(), (q, k, v, flags))

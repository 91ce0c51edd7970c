"""The per-call shortcuts of a fused site (``lower._same_batch``: q, k and v already 4-d with one batch, nothing to
broadcast) give the original's result, and so does the general path beside them (q shared over the batch, over
heads, a 3-d single-head site), each checked against the unrewritten model on inputs that take it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnfuse.lower as lower
from helpers import assert_fused_equal


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

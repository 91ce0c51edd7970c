"""A use of the scores that reads only their shape, dtype or device (``mask.expand_as(scores)``,
``scores.new_zeros(...)``, ``torch.zeros_like(scores)``) is not a second use of their values."""
import pytest
import torch
from torch import nn

from helpers import assert_fused_equal


class ShapeReaders(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-1, -2) / 4
        if self.spelling == "expand_as":  # XLM / Flaubert
            masked = (keep == 0)[:, None, None, :].expand_as(scores)
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        elif self.spelling == "new_zeros":
            bias = scores.new_zeros(scores.shape[-1]).masked_fill(keep[0] == 0, float("-inf"))
            scores = scores + bias
        else:
            bias = torch.zeros_like(scores).masked_fill((keep == 0)[:, None, None, :], float("-inf"))
            scores = scores + bias
        return torch.softmax(scores.float(), dim=-1).type_as(scores) @ v


@pytest.mark.parametrize("spelling", ["expand_as", "new_zeros", "zeros_like"])
def test_metadata_reads_of_the_scores_do_not_block_fusion(spelling):
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 5, dtype=torch.long)
    keep[:, 3:] = 0
    assert_fused_equal(ShapeReaders(spelling), (q, k, v, keep))

"""Scale rules: the scores (or q, k) multiplied or divided by a number or a broadcastable tensor.

A Python number, or a one-element tensor computed from constants (``torch.sqrt(torch.tensor(d))``),
becomes SDPA's ``scale``; a tensor factor that is constant along the key axis (a learned per-head
temperature, a 0-d buffer) is folded into q, which is exact up to rounding.
The user's scale is always carried over, never replaced by SDPA's default.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import arithmetic_kind, canonicalizer
from attnfuse.folding import constant_value
from attnfuse.fx_utils import example_value, is_scalar, tensor_meta
from attnfuse.vocabulary import Factor, Multiply


@canonicalizer
def multiply_rule(node: Node) -> Optional[Multiply]:
    kind = arithmetic_kind(node)
    if kind not in ("mul", "div") or len(node.args) != 2 or node.kwargs:
        return None
    return Multiply(node.args[0], node.args[1], inverse=(kind == "div"))


def score_factor(other: object, inverse: bool, scores_rank: int) -> Union[Factor, str]:
    """Classify what multiplies the scores: a ``Factor``, or the reason it is not a pure scale."""
    if is_scalar(other):
        return Factor(float(other), inverse)
    if is_scalar(example_value(other)):
        return Factor(other, inverse)  # a number Dynamo passes in as a graph input (dynamic float)
    meta = tensor_meta(other)
    if meta is None:
        return f"the scores are multiplied by {type(other).__name__}, not a number or tensor"
    if not meta.is_floating_point():
        return "the scores are multiplied by a non-float tensor (a mask written as a product?)"
    if meta.dim() > scores_rank:
        return "a factor broadcasts the scores to a larger shape"
    if meta.dim() >= 1 and meta.shape[-1] != 1:
        return "the scores are multiplied by a tensor that varies along the key axis (not a scale)"
    folded = constant_value(other) if meta.numel() == 1 else None
    if isinstance(folded, torch.Tensor) and folded.numel() == 1 and folded.is_floating_point():
        # ``/ torch.sqrt(torch.tensor(d_k))``: a constant of the graph, so a plain number; the kernels apply
        # it in their internal fp32, where the original rounded the scaled scores to their dtype
        return Factor(float(folded.item()), inverse)
    return Factor(other, inverse)

"""Bias rules: tensors added to (or subtracted from) the scores become SDPA's additive float mask.

This covers relative-position biases, ALiBi tensors, and additive masks built from ``finfo.min``
(transformers' eager style). A boolean tensor added to scores adds 0 or 1: it stays an additive
bias of 0/1, never a keep-mask.
"""
from __future__ import annotations

from typing import Optional

from torch.fx import Node

from attnfuse.canonical import arithmetic_kind, canonicalizer
from attnfuse.fx_utils import bind, is_scalar, tensor_meta
from attnfuse.vocabulary import Add


@canonicalizer
def add_rule(node: Node) -> Optional[Add]:
    kind = arithmetic_kind(node)
    if kind not in ("add", "sub") or len(node.args) != 2:
        return None
    alpha = bind(node, ("a", "b"), alpha=1.0)["alpha"]
    if not is_scalar(alpha):
        return None
    return Add(node.args[0], node.args[1], float(alpha), -1.0 if kind == "sub" else 1.0)


def bias_reason(other: object, scores_rank: int) -> Optional[str]:
    """Why ``other`` cannot be an additive bias on the scores, or None when it can."""
    if is_scalar(other):
        return (f"the number {other} is added to every score: the softmax ignores it only up to rounding, which the "
                "fused kernel would not reproduce; remove it (it does not change the attention)")
    meta = tensor_meta(other)
    if meta is None:
        return f"the scores are added to {type(other).__name__}"
    if meta.dim() > scores_rank:
        return "a bias broadcasts the scores to a larger shape"
    if meta.is_complex():
        return "a complex bias is added to the scores"
    return None

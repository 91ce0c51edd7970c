"""Mask rules: ``masked_fill`` and ``torch.where`` that set some scores to a very negative value.

Each becomes a *keep-mask* (True = attend, SDPA's convention) plus the fill value, which decides
what a row with every key masked produces: a finite fill (``-finfo.max``, ``finfo.min``, ``-1e9``)
makes that row uniform (the mean of v), ``-inf`` makes it NaN. ``~mask`` / ``logical_not`` are
peeled so the original boolean tensor is passed on without a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import bind, canonicalizer, is_call, is_scalar, tensor_meta
from attnfuse.constants import constant_value

# A fill at or below this acts as a mask: exp(fill - row_max) is 0 for any sane score.
MASKING_THRESHOLD = -1e4


@dataclass(frozen=True)
class Select:
    """``where(cond, if_true, if_false)``; ``masked_fill(x, m, v)`` is ``Select(m, v, x)``."""

    cond: Node
    if_true: object
    if_false: object


@dataclass(frozen=True)
class KeepMask:
    """A boolean tensor ``node`` whose True entries keep a score (or drop it, if ``negated``)."""

    node: Node
    negated: bool


@canonicalizer
def masked_fill_rule(node: Node) -> Optional[Select]:
    if not is_call(node, (torch.masked_fill, torch.Tensor.masked_fill), ("masked_fill", "masked_fill_")):
        return None
    args = bind(node, ("x", "mask", "value"))
    if not isinstance(args.get("mask"), Node):
        return None
    return Select(args["mask"], args["value"], args["x"])


@canonicalizer
def where_rule(node: Node) -> Optional[Select]:
    if not is_call(node, (torch.where,), ("where",)) or len(node.args) + len(node.kwargs) != 3:
        return None
    args = bind(node, ("condition", "input", "other"))
    if not isinstance(args.get("condition"), Node):
        return None
    return Select(args["condition"], args["input"], args["other"])


def _is_not(node: Node) -> bool:
    import operator

    return is_call(node, (operator.invert, torch.logical_not, torch.bitwise_not),
                   ("logical_not", "bitwise_not", "__invert__"))


def keep_mask(cond: Node, fill_where_true: bool) -> KeepMask:
    """The keep-mask of a fill applied where ``cond`` is ``fill_where_true``, with negations peeled."""
    negated = fill_where_true
    while _is_not(cond) and tensor_meta(cond.args[0]) is not None and tensor_meta(cond.args[0]).dtype == torch.bool:
        cond, negated = cond.args[0], not negated
    return KeepMask(cond, negated)


def fill_value(value: object) -> Union[float, str]:
    """The fill as a float, or the reason it cannot act as a mask."""
    if isinstance(value, Node):
        folded = constant_value(value)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            value = folded.item()
        else:
            return "the fill value is a tensor computed at run time"
    if not is_scalar(value):
        return f"the fill value is {type(value).__name__}, not a number"
    value = float(value)
    if math.isnan(value) or (value > MASKING_THRESHOLD and value != -math.inf):
        return f"masked scores are set to {value:g}, which does not act as a mask (needs <= {MASKING_THRESHOLD:g})"
    return value


def mask_reason(mask: KeepMask, scores_rank: int) -> Optional[str]:
    """Why ``mask`` cannot be a keep-mask of the scores, or None when it can."""
    meta = tensor_meta(mask.node)
    if meta is None:
        return "the mask is not a tensor"
    if meta.dtype != torch.bool:
        return f"the mask has dtype {meta.dtype}, not bool"
    if meta.dim() > scores_rank:
        return "a mask broadcasts the scores to a larger shape"
    return None

"""A bias filled under a mask before it is added to the scores, read as the bias and the mask (Falcon's ALiBi).

Falcon with ALiBi adds ``alibi.masked_fill(causal_mask < -1, finfo.min)`` to its scores: one ``(B, H, L, S)`` tensor
holding the bias where the mask keeps and the fill elsewhere, which a kernel can only take whole. Read as the bias and
a fill of the scores under the same mask (``masked_fill(s + bias, m, fill)``), the mask rules find the causal
triangle, window or padding in ``m`` and the bias rules read the bias. ``filled_bias`` reads the spellings
(``masked_fill``, ``where`` either way round, a cast or an ``expand`` after); when the two readings are one function,
forward and backward, is the matcher's decision (``match._split_filled_biases``, docs/semantics.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from attnfuse.canonical import canonical
from attnfuse.folding import constant_value
from attnfuse.fx_utils import is_call, is_scalar, is_written, tensor_meta
from attnfuse.patterns.readers import filled_with
from attnfuse.vocabulary import Cast, FilledBias, Select

_BROADCASTS = ("expand", "expand_as", "contiguous")


def filled_bias(node: object) -> Optional[FilledBias]:
    """``node`` as a floating-point bias tensor filled with a number under a boolean mask, or None (a tensor
    fill, a bias that is itself a number or a constant of one value, anything written in place)."""
    casts = []
    while isinstance(node, Node) and not is_written(node):
        op = canonical(node)
        if isinstance(op, Cast) and _floating(op.x) and _floating(node):
            casts.append(op.dtype)
            node = op.x
        elif is_call(node, (), _BROADCASTS) and isinstance(node.args[0], Node):
            node = node.args[0]
        else:
            break
    select = canonical(node)
    if not isinstance(select, Select) or not _floating(node) or is_written(select.cond):
        return None
    for fill, bias, fill_where_true in ((select.if_true, select.if_false, True),
                                        (select.if_false, select.if_true, False)):
        value = _number(fill)
        if value is None or not _is_bias(bias, node):
            continue
        stored = torch.tensor(value, dtype=torch.float64).to(tensor_meta(node).dtype)
        for dtype in reversed(casts):
            stored = stored.to(dtype)
        return FilledBias(bias, select.cond, fill_where_true, float(stored), tuple(reversed(casts)))
    return None


def cast_bias(bias: torch.Tensor, *dtypes: torch.dtype) -> torch.Tensor:
    """``bias`` cast to each of ``dtypes`` in turn: what the filled tensor's casts did to the bias's values."""
    for dtype in dtypes:
        bias = bias.to(dtype)
    return bias


def _is_bias(bias: object, filled: Node) -> bool:
    """A tensor of the filled tensor's dtype that is no constant of one value (``where(m, fill, 0)`` is an added
    mask, read as one by the mask rules)."""
    meta, out = tensor_meta(bias), tensor_meta(filled)
    if not isinstance(bias, Node) or is_written(bias) or meta is None or meta.dtype != out.dtype:
        return False
    one_value = all(isinstance(size, int) and size == 1 for size in meta.shape) and _number(bias) is not None
    return filled_with(bias) is None and not one_value


def _floating(node: object) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.is_floating_point()


def _number(value: object) -> Optional[float]:
    """A Python number, or a constant tensor holding one (``torch.tensor(finfo.min)``), as a float."""
    if is_scalar(value):
        return None if isinstance(value, (torch.SymInt, torch.SymFloat)) else float(value)
    folded = constant_value(value) if isinstance(value, Node) else None
    if isinstance(folded, torch.Tensor) and folded.numel() == 1 and folded.is_floating_point():
        return float(folded.item())
    return None

"""Mask rules: ``masked_fill`` and ``torch.where`` that set some scores to a very negative value.

Each becomes a *keep-mask* (True = attend, SDPA's convention) plus the fill value, which decides
what a row with every key masked produces: a finite fill (``-finfo.max``, ``finfo.min``, ``-1e9``)
makes that row uniform (the mean of v), ``-inf`` makes it NaN. ``~mask`` / ``logical_not`` are
peeled so the original boolean tensor is passed on without a copy.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import canonical, canonicalizer
from attnfuse.folding import constant_value
from attnfuse.fx_utils import bind, has_side_effect, is_call, is_scalar, is_written, tensor_meta
from attnfuse.patterns.readers import filled_with
from attnfuse.vocabulary import (MASKING_THRESHOLD, Add, Cast, Clamp, KeepMask, Multiply, RegionWrite, Select,
                                 inplace_on_copy)


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


@canonicalizer
def clamp_rule(node: Node) -> Optional[Clamp]:
    if is_call(node, (torch.max, torch.maximum, torch.Tensor.max, torch.Tensor.maximum), ("max", "maximum")):
        if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], Node) or \
                tensor_meta(node.args[1]) is None:
            return None  # ``torch.max(x, dim)`` is a reduction
        x, other = node.args
        if isinstance(x, Node) and tensor_meta(x) is not None and tensor_meta(x).numel() == 1 < \
                tensor_meta(other).numel():
            x, other = other, x  # ``torch.max(torch.tensor(finfo.min), s)``
        return Clamp(x, other) if isinstance(x, Node) else None
    if not is_call(node, (torch.clamp, torch.clamp_min, torch.Tensor.clamp, torch.Tensor.clamp_min),
                   ("clamp", "clamp_min", "clip")):
        return None
    args = bind(node, ("x", "min", "max"), max=None)
    if args.get("max") is not None or args.get("min") is None or not isinstance(args.get("x"), Node):
        return None
    return Clamp(args["x"], args["min"])


def clamp_floor(low: object, dtype: torch.dtype) -> Union[float, str]:
    """The clamp's lower bound as a value of the scores' ``dtype``, or the reason it changes scores.

    Only a bound of ``finfo(dtype).min`` (or ``-inf``) leaves every finite score as it is: it turns ``-inf``
    into the lowest finite value, which the matcher makes exact with a per-call check."""
    if isinstance(low, Node):
        folded = constant_value(low)
        if not (isinstance(folded, torch.Tensor) and folded.numel() == 1):
            return "the scores are clamped to a tensor computed at run time"
        low = folded.item()
    if not is_scalar(low):
        return f"the scores are clamped to a {type(low).__name__}"
    value = float(torch.tensor(float(low), dtype=torch.float64).to(dtype))
    if value == -math.inf or value == float(torch.finfo(dtype).min):
        return value
    return (f"the scores are clamped from below at {float(low):g}, which changes scores below it; only a clamp at "
            f"torch.finfo({dtype}).min (which only turns -inf into a finite value) is fused")


# ----------------------------------------------------------------------------- masks written as products

_RANDOM_NAMES = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial")


def same_computation(a: object, b: object, depth: int = 16) -> bool:
    """Whether ``a`` and ``b`` are one value: the same node, or the same deterministic ops on the same inputs
    (CPM-Ant spells its mask twice, ``attention_mask.view(...) == torch.tensor(False)``). Nodes whose storage is
    written in place are never the same computation, since each reads its inputs at a different time."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_computation(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, slice) and isinstance(b, slice):
        return all(same_computation(x, y, depth) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if not (isinstance(a, Node) and isinstance(b, Node)):
        if isinstance(a, Node) or isinstance(b, Node) or type(a) is not type(b):
            return False
        try:
            return bool(a == b)
        except Exception:
            return False
    if not depth or a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target:
        return False
    if is_written(a) or is_written(b) or has_side_effect(a) or any(r in str(getattr(a.target, "__name__", a.target))
                                                                   for r in _RANDOM_NAMES):
        return False
    return same_computation(tuple(a.args), tuple(b.args), depth - 1) and set(a.kwargs) == set(b.kwargs) and \
        all(same_computation(a.kwargs[key], b.kwargs[key], depth - 1) for key in a.kwargs)


def same_keep_mask(a: KeepMask, b: KeepMask) -> bool:
    """Whether two keep-masks keep the same entries (same polarity, same computation)."""
    return a.negated == b.negated and same_computation(a.node, b.node)


_VALUE_PRESERVING = ("view", "reshape", "unsqueeze", "expand", "expand_as", "permute", "transpose", "contiguous",
                     "flatten", "squeeze", "clone")


def _values_of(node: Node) -> Node:
    """``node`` with ops that only move or select values peeled off (views, basic indexing, expand)."""
    import operator

    while isinstance(node, Node) and node.op in ("call_function", "call_method") and node.args and \
            isinstance(node.args[0], Node) and (
            node.target is operator.getitem and not any(isinstance(i, Node) for i in _index_items(node.args[1]))
            or (node.op == "call_method" and node.target in _VALUE_PRESERVING)
            or (node.op == "call_function" and getattr(node.target, "__name__", "") in _VALUE_PRESERVING)):
        node = node.args[0]
    return node


def zero_or_fill(node: object) -> Optional[float]:
    """The fill of an additive mask proven to hold only 0 and one finite value, in its own dtype:
    ``where(cond, 0, fill)`` / ``where(cond, fill, 0)`` / ``zeros.masked_fill(cond, fill)`` for any boolean
    ``cond``, seen through views and basic indexing (transformers' ``finfo.min`` masks); else None."""
    meta = tensor_meta(node)
    source = _values_of(node) if isinstance(node, Node) else None
    select = canonical(source) if source is not None and not is_written(source) else None
    if meta is None or not meta.is_floating_point() or not isinstance(select, Select):
        return None
    for zero, fill in ((select.if_true, select.if_false), (select.if_false, select.if_true)):
        zero_value, fill_value = _number(zero), _number(fill)
        if zero_value is None and isinstance(zero, Node):
            zero_value = _number(filled_with(zero))
        if zero_value == 0 and fill_value is not None:
            stored = float(torch.tensor(fill_value, dtype=torch.float64).to(meta.dtype))
            return stored if math.isfinite(stored) and stored != 0 else None
    return None


def _index_items(index: object) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def binary_mask(node: object) -> Optional[bool]:
    """For a tensor ``node`` multiplying the scores: True if its values are proven to be 0 or 1 (a bool, a cast
    of a bool, a constant of 0s and 1s), False if they must be checked on each call, None if it is no mask."""
    meta = tensor_meta(node)
    if meta is None or not (meta.dtype == torch.bool or meta.is_floating_point()):
        return None
    if meta.dtype == torch.bool:
        return True
    source = _values_of(node)
    op = canonical(source)
    if isinstance(op, Cast) and tensor_meta(op.x) is not None and tensor_meta(op.x).dtype == torch.bool:
        return True
    value = constant_value(node)
    if isinstance(value, torch.Tensor):
        return bool(((value == 0) | (value == 1)).all())  # proven, or (False) read on each call
    return False


def one_minus(node: object, mask: Node) -> Optional[float]:
    """``1`` if ``node`` is ``1 - mask``, ``-1`` if it is ``mask - 1``, else None."""
    op = canonical(node)
    if not isinstance(op, Add) or op.sign != -1.0 or op.alpha != 1.0:
        return None
    if is_scalar(op.a) and float(op.a) == 1.0 and same_computation(op.b, mask):
        return 1.0
    if is_scalar(op.b) and float(op.b) == 1.0 and same_computation(op.a, mask):
        return -1.0
    return None


def complement_value(node: object, mask: Node) -> Optional[float]:
    """``c`` if ``node`` computes ``c * (1 - mask)`` (any operand order, ``(mask - 1) * -c`` too), else None."""
    op = canonical(node)
    if not isinstance(op, Multiply) or op.inverse:
        sign = one_minus(node, mask)
        return sign if sign == 1.0 else None
    for number, other in ((op.a, op.b), (op.b, op.a)):
        value = _number(number)
        sign = one_minus(other, mask) if value is not None else None
        if sign is not None:
            return value * sign
    return None


def _number(value: object) -> Optional[float]:
    if is_scalar(value):
        return float(value)
    folded = constant_value(value) if isinstance(value, Node) else None
    if isinstance(folded, torch.Tensor) and folded.numel() == 1 and folded.is_floating_point():
        return float(folded.item())
    return None


def drops_where_zero(mask: KeepMask, factor: Node) -> bool:
    """Whether the keep-mask drops exactly the entries where the 0/1 ``factor`` is 0 (``factor == 0``,
    ``~factor.bool()``, ``where(factor.bool(), s, c)``)."""
    import operator

    node = mask.node
    if same_computation(node, factor) or (is_call(node, (), ("bool",)) and same_computation(node.args[0], factor)):
        return not mask.negated
    if is_call(node, (operator.eq, torch.eq), ("eq", "__eq__")) and len(node.args) == 2:
        a, b = node.args
        zero = next((x for x in (a, b) if _number(x) == 0.0), None)
        other = b if zero is a else a
        return zero is not None and mask.negated and same_computation(other, factor)
    return False


def weights_zeroing(node: Node) -> Optional[tuple[KeepMask, str, Node]]:
    """``(keep, kind, weights)`` when ``node`` zeroes attention weights outside a keep-mask: ``"replace"`` for
    ``masked_fill(~keep, 0)`` / ``where(keep, w, 0)``, ``"multiply"`` for ``w * keep`` (NaN stays NaN)."""
    op = canonical(node)
    if isinstance(op, Select) and isinstance(op.cond, Node):
        for zero, weights, fill_where_true in ((op.if_true, op.if_false, True), (op.if_false, op.if_true, False)):
            if _number(zero) == 0.0 and isinstance(weights, Node):
                mask = keep_mask(op.cond, fill_where_true)
                return (mask, "replace", weights) if mask_reason(mask, 8) is None else None
    if isinstance(op, Multiply) and not op.inverse:
        for weights, factor in ((op.a, op.b), (op.b, op.a)):
            if isinstance(weights, Node) and isinstance(factor, Node) and binary_mask(factor) is True:
                mask = keep_mask(factor, False) if tensor_meta(factor).dtype == torch.bool else KeepMask(factor, False)
                return mask, "multiply", weights
    return None


# ----------------------------------------------------------------------------- writes into a region of the scores

@canonicalizer
def region_write_rule(node: Node) -> Optional[RegionWrite]:
    if node.op != "call_function" or node.target is not inplace_on_copy or len(node.args) != 4 or \
            node.args[0] != "__setitem__" or node.kwargs or not isinstance(node.args[1], Node):
        return None
    return RegionWrite(node.args[1], node.args[2], node.args[3])


def full_index(index: object, rank: int) -> Optional[tuple]:
    """A basic index (ints, slices with constant bounds, one ``...``) spelled out over all ``rank`` axes, or None."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(item is Ellipsis for item in items) > 1:
        return None
    for item in items:
        if isinstance(item, slice):
            if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in
                       (item.start, item.stop, item.step)):
                return None
        elif not (item is Ellipsis or (isinstance(item, int) and not isinstance(item, bool))):
            return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (rank - len(items) + 1) + items[at + 1:]
    items = items + (slice(None),) * (rank - len(items))
    return items if len(items) == rank else None


def pad_region(term: object, index: tuple, sizes: tuple, outside: object,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """A tensor of ``sizes`` holding ``term`` in ``index`` and ``outside`` everywhere else; an axis the index
    spans whole keeps the term's own size there (1 where the term broadcasts), so a bias that is the same for
    every head stays one head wide. Exact: the scores plus 0 (or kept) outside the region are the scores."""
    term = term if isinstance(term, torch.Tensor) else torch.tensor(term, device=device)
    region = torch.empty(sizes, device="meta")[index].shape
    aligned = term.reshape((1,) * (len(region) - term.dim()) + tuple(term.shape))
    shape, axis = [], 0
    for size, item in zip(sizes, index):
        if isinstance(item, int):
            shape.append(size)
            continue
        whole = item == slice(None)
        shape.append(1 if whole and aligned.shape[axis] == 1 else size)
        axis += 1
    out = torch.full(shape, outside, dtype=term.dtype, device=term.device)
    out[index] = aligned
    return out

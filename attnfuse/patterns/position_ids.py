"""Position rules: positions read back out of a tensor of positions, as transformers builds its masks.

transformers (5.x) builds a mask from ``position_ids`` rather than from the indices: ``pos[b, q_idx]`` and
``pos[b, kv_idx]`` gathered with ``arange`` indices, and a packed-sequence test ``cumsum(diff(pos) != 1)``
compared at both. Where ``pos`` is itself ``arange`` positions (a forward without a cache), each of these is
a linear function of the indices again, so the window and causal terms read as inequalities (``index``)
and the packed-sequence term as always true, at every size.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch.fx import Node

from attnfuse.fx_utils import bind, is_call, statically_true, tensor_meta
from attnfuse.patterns.index import Inequality, Linear, Logic, _combine, _pad, constant_truth, index_rule

Interpret = Callable[[object], Optional[object]]


def _linear_tensor(node: object, sub: Interpret) -> Optional[Linear]:
    """``node`` read as positions, its coefficients padded to its rank."""
    meta, found = tensor_meta(node), sub(node)
    if meta is None or not isinstance(found, Linear) or len(found.coef) > meta.dim():
        return None
    return Linear(_pad(found.coef, meta.dim()), found.const)


def _never_negative(index: Linear) -> bool:
    """Non-negative at every index (a negative index would wrap around, which is not linear)."""
    const = index.const
    return all(c >= 0 for c in index.coef) and isinstance(const, (int, torch.SymInt)) and not isinstance(const, bool) \
        and statically_true(lambda: const >= 0)


@index_rule
def gathered_positions(node: Node, sub: Interpret) -> Optional[Linear]:
    """``pos[i_0, ..., i_r]`` with one integer index tensor per axis of ``pos``: ``sum(coef[d] * i_d) + const``."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return None
    source, items = _linear_tensor(node.args[0], sub), node.args[1]
    if source is None or len(items) != len(source.coef):
        return None
    total = Linear((), source.const)
    for coef, item in zip(source.coef, items):
        meta = tensor_meta(item)
        index = sub(item) if meta is not None and meta.dtype in (torch.int64, torch.int32) else None
        if not isinstance(index, Linear) or not _never_negative(index):
            return None
        total = _combine(total, Linear(tuple(coef * c for c in index.coef), coef * index.const), 1)
    return total


@index_rule
def sliced_positions(node: Node, sub: Interpret) -> Optional[Linear]:
    """``pos[:, s:e:t]`` (slices from a non-negative start with a positive step, and new axes)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    source = _linear_tensor(node.args[0], sub)
    if source is None or not all(item is None or isinstance(item, slice) for item in items):
        return None
    coef, const, axis = [], source.const, 0
    for item in items:
        if item is None:
            coef.append(0)
            continue
        if axis >= len(source.coef):
            return None
        start = 0 if item.start is None else item.start
        step = 1 if item.step is None else item.step
        if not (isinstance(start, int) and start >= 0 and isinstance(step, int) and step > 0):
            return None
        coef.append(source.coef[axis] * step)
        const = const + source.coef[axis] * start
        axis += 1
    return Linear(tuple(coef) + source.coef[axis:], const)


@index_rule
def differenced_positions(node: Node, sub: Interpret) -> Optional[Linear]:
    """``torch.diff(pos, dim=d)`` of positions with step ``c`` along ``d``: ``c`` everywhere. A ``prepend`` must be
    the positions one step before the first (``pos[:, :1] - c``), as transformers writes it."""
    if not is_call(node, (torch.diff,), ("diff",)):
        return None
    args = bind(node, ("input", "n", "dim", "prepend", "append"), n=1, dim=-1, prepend=None, append=None)
    source, dim = _linear_tensor(args["input"], sub), args["dim"]
    if source is None or args["n"] != 1 or args["append"] is not None or not isinstance(dim, int):
        return None
    dim %= len(source.coef)
    step = source.coef[dim]
    if args["prepend"] is not None:
        before = _linear_tensor(args["prepend"], sub)
        if before is None or len(before.coef) != len(source.coef) or before.const != source.const - step:
            return None
        if any(b != s for d, (b, s) in enumerate(zip(before.coef, source.coef)) if d != dim):
            return None
        if tensor_meta(args["prepend"]).shape[dim] != 1:
            return None
    return Linear((0,) * len(source.coef), step)


@index_rule
def summed_constant(node: Node, sub: Interpret) -> Optional[Linear]:
    """``cumsum`` along ``d`` of a tensor that holds one number ``c`` everywhere (a constant predicate counts
    as 0 or 1): ``c * (index_d + 1)``."""
    if not is_call(node, (torch.cumsum,), ("cumsum",)):
        return None
    args = bind(node, ("input", "dim"))
    meta, dim = tensor_meta(node), args.get("dim")
    if meta is None or not isinstance(dim, int) or meta.dtype not in (torch.int64, torch.int32) or meta.dim() == 0:
        return None
    found = sub(args["input"])
    if isinstance(found, (Inequality, Logic)):
        truth = constant_truth(found)
        value = None if truth is None else int(truth)
    elif isinstance(found, Linear) and not any(found.coef) and isinstance(found.const, int):
        value = found.const
    else:
        value = None
    if value is None:
        return None
    coef = [0] * meta.dim()
    coef[dim % meta.dim()] = value
    return Linear(tuple(coef), value)

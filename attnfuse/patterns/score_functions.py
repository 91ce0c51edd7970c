"""Score-function rules: a bias tensor rewritten as a function of ``(b, h, q_idx, kv_idx)``.

ALiBi (``slopes[h] * (j - i)``), relative-position tables gathered by a position difference, and
plain captured bias tensors are all elementwise programs over ``arange`` positions and captured
tensors. Re-reading the bias subgraph pointwise turns it into a FlexAttention ``score_mod`` (no
``n x n`` tensor) that can also be evaluated on broadcast index grids to materialize the bias for
SDPA. A subgraph with any op outside the pointwise set below stays a plain tensor bias.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch.fx import Node

from attnfuse.folding import constant_value
from attnfuse.fx_utils import (bind, example_value, is_call, is_scalar, is_written, same_size, statically_true,
                               tensor_meta)
from attnfuse.patterns.readers import arange_arguments, exact_positions, new_axes_index
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import ScoreFunction

# Elementwise functions applied unchanged to the pointwise values.
_UNARY = {torch.abs: torch.abs, torch.neg: torch.neg, torch.log: torch.log, torch.exp: torch.exp,
          torch.tanh: torch.tanh, torch.sqrt: torch.sqrt, torch.floor: torch.floor, operator.neg: torch.neg,
          operator.abs: torch.abs}
_UNARY_METHODS = {"abs": torch.abs, "neg": torch.neg, "log": torch.log, "exp": torch.exp, "tanh": torch.tanh,
                  "sqrt": torch.sqrt, "floor": torch.floor}
_BINARY = {operator.add: torch.add, operator.sub: torch.sub, operator.mul: torch.mul, operator.truediv: torch.div,
           torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
           torch.minimum: torch.minimum, torch.maximum: torch.maximum, torch.min: torch.minimum,
           torch.max: torch.maximum, operator.lt: torch.lt, operator.le: torch.le, operator.gt: torch.gt,
           operator.ge: torch.ge, operator.floordiv: torch.floor_divide}
_BINARY_METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "minimum": torch.minimum,
                   "maximum": torch.maximum, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}
_CASTS = {"float": torch.float32, "long": torch.int64, "int": torch.int32, "half": torch.float16,
          "bfloat16": torch.bfloat16}


class NotPointwise(Exception):
    """The bias subgraph uses an op that has no pointwise reading."""


def _dims_map(rank: int, out_map: tuple) -> tuple:
    """Right-align an input of ``rank`` dims against an output whose dims map to score axes ``out_map``."""
    return tuple(out_map[len(out_map) - rank:]) if rank <= len(out_map) else None


def _gather(value: torch.Tensor, dim_axes: tuple, shape: tuple, index: tuple) -> torch.Tensor:
    idx = []
    for axis, size in zip(dim_axes, shape):
        idx.append(torch.zeros_like(index[0]) if axis is None or size == 1 else index[axis])
    return value[tuple(idx)] if idx else value


def _constant_like(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A folded constant on ``index``'s device; under a tracer rebuilt from its numbers (at most 4096), a literal the
    trace records: a tensor made outside a trace is none of its tensors (Inductor's trace would refuse it)."""
    if is_traced(index):
        return torch.tensor(value.tolist(), dtype=value.dtype, device=index.device)
    return value.to(index.device)


class _Builder:
    """Compile a bias subgraph into a pointwise program over score axes 0..3 = (b, h, i, j)."""

    def __init__(self) -> None:
        self.leaves: list[Node] = []
        self.uses_positions = False

    def leaf(self, node: Node) -> int:
        if node not in self.leaves:
            self.leaves.append(node)
        return self.leaves.index(node)

    def build(self, node: object, axes: tuple) -> Callable:
        """A function ``(index, leaf_values) -> value`` for ``node`` whose dims map to score ``axes``."""
        if not isinstance(node, Node):
            if is_scalar(node) or isinstance(node, bool):
                return lambda index, leaves, c=node: c
            raise NotPointwise(f"argument {node!r}")
        if is_written(node):
            raise NotPointwise(f"{node.name} is written in place")
        meta = tensor_meta(node)
        if meta is None:
            value = example_value(node)
            if is_scalar(value):
                position = self.leaf(node)
                return lambda index, leaves, p=position: leaves[p]
            raise NotPointwise(node.name)
        if axes is None or len(axes) != meta.dim():
            raise NotPointwise(f"{node.name} does not broadcast against the scores")
        shape = tuple(meta.shape)
        along_positions = any(axis in (2, 3) and size != 1 for axis, size in zip(axes, shape))
        folded = None if along_positions else constant_value(node)
        if isinstance(folded, torch.Tensor) and folded.numel() <= 4096:
            return lambda index, leaves, t=folded, a=axes, s=shape: _gather(_constant_like(t, index[0]), a, s, index)
        if node.op not in ("call_function", "call_method"):
            position = self.leaf(node)
            return lambda index, leaves, p=position, a=axes, s=shape: _gather(leaves[p], a, s, index)
        return self.op(node, axes, shape)

    def op(self, node: Node, axes: tuple, shape: tuple) -> Callable:
        if is_call(node, (torch.arange,)):
            if not exact_positions(node):
                raise NotPointwise("positions that wrap or round in their dtype")
            self.uses_positions = True
            args = arange_arguments(node)
            start, step = self.build(args["start"], ()), self.build(args["step"], ())
            dtype = tensor_meta(node).dtype
            # Integer positions stay in the kernel's int32 index arithmetic (int64 is slower there).
            cast = dtype if dtype.is_floating_point else None
            return lambda index, leaves: _cast(start(index, leaves) + step(index, leaves) * (
                torch.zeros_like(index[0]) if axes[0] is None else index[axes[0]]), cast)
        if node.op == "call_function" and node.target is operator.getitem:
            indexed = new_axes_index(node)
            if indexed is None:
                return self.sliced(node, axes)
            items = indexed[1]
            inner_axes = tuple(a for a, item in zip(axes, items) if item is not None)
            inner_axes += axes[len(items):]
            return self.build(node.args[0], inner_axes)
        if is_call(node, (torch.unsqueeze,), ("unsqueeze",)):
            dim = bind(node, ("x", "dim"))["dim"] % len(axes)
            return self.build(node.args[0], axes[:dim] + axes[dim + 1:])
        if is_call(node, (torch.squeeze,), ("squeeze",)):
            return self.build(node.args[0], _squeezed_axes(node, axes))
        if is_call(node, (torch.reshape,), ("view", "reshape")):
            source = tensor_meta(node.args[0])
            return self.build(node.args[0], _unit_reshape_axes(tuple(source.shape), shape, axes))
        if is_call(node, (torch.permute,), ("permute",)):
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            inner = [None] * len(dims)
            for out_dim, in_dim in enumerate(dims):
                inner[in_dim % len(dims)] = axes[out_dim]
            return self.build(node.args[0], tuple(inner))
        if is_call(node, (torch.transpose,), ("transpose",)):
            inner = list(axes)
            a, b = node.args[1] % len(axes), node.args[2] % len(axes)
            inner[a], inner[b] = inner[b], inner[a]
            return self.build(node.args[0], tuple(inner))
        if is_call(node, (), ("expand", "contiguous", "clone")):
            source = tensor_meta(node.args[0])
            return self.build(node.args[0], _dims_map(source.dim(), axes))
        if (node.op == "call_method" and node.target in _CASTS) or is_call(node, (), ("to", "type_as")):
            source, dtype = tensor_meta(node.args[0]), tensor_meta(node).dtype
            if source.is_floating_point() and not dtype.is_floating_point:
                # Rounding a float (T5's log buckets) must match the original bit for bit; a kernel's
                # own log/exp may differ in the last ulp and move a bucket boundary. Keep it a tensor.
                raise NotPointwise("float to integer cast")
            inner = self.build(node.args[0], _dims_map(source.dim(), axes))
            return lambda index, leaves: _cast(inner(index, leaves), dtype)
        unary = _UNARY.get(node.target) if node.op == "call_function" else _UNARY_METHODS.get(node.target)
        if unary is not None and len(node.args) == 1:
            inner = self.build(node.args[0], axes)
            return lambda index, leaves: unary(torch.as_tensor(inner(index, leaves)))
        binary = _BINARY.get(node.target) if node.op == "call_function" else _BINARY_METHODS.get(node.target)
        if binary is not None and len(node.args) == 2 and not node.kwargs:
            a, b = (self.build(arg, self._arg_axes(arg, axes)) for arg in node.args)
            return lambda index, leaves: binary(_tensor(a(index, leaves), index), _tensor(b(index, leaves), index))
        if is_call(node, (torch.where,), ("where",)) and len(node.args) == 3:
            parts = [self.build(arg, self._arg_axes(arg, axes)) for arg in node.args]
            return lambda index, leaves: torch.where(*[torch.as_tensor(p(index, leaves)) for p in parts])
        if is_call(node, (torch.full_like,)) and len(node.args) == 2 and is_scalar(node.args[1]):
            return lambda index, leaves, c=node.args[1]: c
        if is_call(node, (torch.nn.functional.embedding,)):
            args = bind(node, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                               "sparse"), max_norm=None)
            indices, weight = args["input"], args["weight"]
            if tensor_meta(weight).dim() != 2 or not _plain_embedding(args):
                # padding_idx and scale_grad_by_freq change weight.grad, max_norm writes the weight: a
                # direct gather of `weight` would differ from the original in the backward pass
                raise NotPointwise("embedding options")
            lookup = self.build(indices, axes[:-1])
            position = self.leaf(weight)
            return lambda index, leaves: leaves[position][lookup(index, leaves),
                                                          index[axes[-1]] if axes[-1] is not None else 0]
        raise NotPointwise(str(node.target))

    def sliced(self, node: Node, axes: tuple) -> Callable:
        """``x[:, a:, b:]`` (step 1): position ``p`` along a sliced dim reads ``x`` at ``p + start``, so the
        score index of that dim is shifted by the start (a number, or a run-time size read as a leaf)."""
        source, items = node.args
        meta, out = tensor_meta(source), tensor_meta(node)
        items = items if isinstance(items, tuple) else (items,)
        if meta is not None and items.count(Ellipsis) == 1:  # ``x[..., a:]``: full slices in its place
            at = items.index(Ellipsis)
            items = items[:at] + (slice(None),) * (meta.dim() - len(items) + 1) + items[at + 1:]
        if meta is None or len(items) > meta.dim() or not all(isinstance(item, slice) for item in items):
            raise NotPointwise("indexing")
        shifts = []
        for axis, size, out_size, item in zip(axes, meta.shape, out.shape, items):
            if item.step not in (None, 1):
                raise NotPointwise("a strided slice")
            if _is_one(size) and _is_one(out_size):
                continue  # a size-1 dim that stays size 1 was sliced from 0: nothing moves
            start = 0 if item.start is None else item.start
            value = example_value(start)
            if isinstance(value, int) and value < 0:  # counted from the end of a dim of known size
                if not isinstance(size, int):
                    raise NotPointwise("a slice from the end of a dim of run-time size")
                start = value = max(value + size, 0)
            if isinstance(value, int) and value == 0:
                continue
            if not (is_scalar(value) and statically_true(lambda v=value: v >= 0)):
                raise NotPointwise("a slice start that may be negative")
            if axis is None or (isinstance(size, int) and size == 1):
                raise NotPointwise("a slice along a broadcast dim")
            shifts.append((axis, self.build(start, ())))
        inner = self.build(source, axes)
        if not shifts:
            return inner

        def shifted(index, leaves):
            index = list(index)
            for axis, start in shifts:
                index[axis] = index[axis] + start(index, leaves)
            return inner(tuple(index), leaves)
        return shifted

    @staticmethod
    def _arg_axes(arg: object, axes: tuple) -> tuple:
        meta = tensor_meta(arg) if isinstance(arg, Node) else None
        return () if meta is None else _dims_map(meta.dim(), axes)


def _is_one(size: object) -> bool:
    return isinstance(size, int) and size == 1


def _squeezed_axes(node: Node, axes: tuple) -> tuple:
    """The score axes of ``x`` for ``x.squeeze(dim)`` (or ``squeeze()``) read on ``axes``: removed size-1 dims
    broadcast (no axis)."""
    shape = tuple(tensor_meta(node.args[0]).shape)
    dims = bind(node, ("x", "dim")).get("dim")
    dims = range(len(shape)) if dims is None else (dims,) if isinstance(dims, int) else tuple(dims)
    removed = {d % len(shape) for d in dims if isinstance(shape[d % len(shape)], int) and shape[d % len(shape)] == 1}
    inner, kept = [], iter(axes)
    for d in range(len(shape)):
        inner.append(None if d in removed else next(kept))
    return tuple(inner)


def _unit_reshape_axes(source: tuple, target: tuple, axes: tuple) -> tuple:
    """The score axes of a ``view`` / ``reshape`` source that only adds or removes size-1 dims (``arange(n).view(1,
    1, 1, n)``): its other dims keep their order and sizes; anything else is no pointwise reading."""
    def others(shape):
        return [d for d, size in enumerate(shape) if not (isinstance(size, int) and size == 1)]
    inner_dims, outer_dims = others(source), others(target)
    if len(inner_dims) != len(outer_dims) or \
            not all(same_size(source[a], target[b]) for a, b in zip(inner_dims, outer_dims)):
        raise NotPointwise("a reshape that merges or splits dims")
    inner = [None] * len(source)
    for a, b in zip(inner_dims, outer_dims):
        inner[a] = axes[b]
    return tuple(inner)


def _plain_embedding(args: dict) -> bool:
    """An ``F.embedding`` whose gradient is a plain scatter-add into ``weight`` (no options set)."""
    return (args.get("padding_idx") is None and args.get("max_norm") is None
            and not args.get("scale_grad_by_freq", False) and not args.get("sparse", False))


def _tensor(value: object, index: tuple) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, device=index[0].device)


def _cast(value: object, dtype: Optional[torch.dtype]) -> object:
    return value.to(dtype) if isinstance(value, torch.Tensor) and dtype is not None else value


_SCORE_AXES = {2: (0, 1, 2, 3), 1: (0, 2, 3), 0: (2, 3)}


def score_function(bias: Node, batch_rank: int) -> Optional[ScoreFunction]:
    """``bias`` (broadcast against scores with ``batch_rank`` leading axes) as a function of the
    kernels' 4-d ``(b, h, i, j)`` indices, or None."""
    meta = tensor_meta(bias)
    score_axes = _SCORE_AXES.get(batch_rank)
    if meta is None or score_axes is None or meta.dim() > len(score_axes):
        return None
    builder = _Builder()
    try:
        program = builder.build(bias, _dims_map(meta.dim(), score_axes))
    except (NotPointwise, AttributeError, TypeError, IndexError):
        return None
    return ScoreFunction(builder.leaves, program, builder.uses_positions)

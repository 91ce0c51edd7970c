"""Layout rules: ops that only relabel axes (transpose, permute, ``.mT``, contiguous) and k/v head repeats.

An operand is tracked as a node plus one axis letter per dimension; peeling a layout op rewrites
the letters onto the op's input, so the fused call reads the original tensor. A permute counts as
a transpose only when its permutation, computed from its arguments and the tensor's rank, says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

import operator

from attnfuse.canonical import (bind, canonical, canonicalizer, example_value, is_call, is_scalar, rank_of, same_size,
                                tensor_meta)
from attnfuse.constants import constant_value
from attnfuse.patterns.scales import Multiply


@dataclass(frozen=True)
class Permute:
    """``out = x.permute(perm)``: output dim ``k`` is input dim ``perm[k]``."""

    x: Node
    perm: tuple[int, ...]


@dataclass(frozen=True)
class RepeatHeads:
    """``out`` repeats each slice of ``x`` along ``dim`` ``repeats`` times in place (``repeat_interleave``)."""

    x: Node
    dim: int
    repeats: int


@dataclass(frozen=True)
class Operand:
    """A tensor read by a product, with one axis letter per dimension of ``node``."""

    node: Node
    axes: str


def _swap(rank: int, a: int, b: int) -> tuple[int, ...]:
    perm = list(range(rank))
    a, b = a % rank, b % rank
    perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


@canonicalizer
def transpose_rule(node: Node) -> Optional[Permute]:
    if not is_call(node, (torch.transpose, torch.swapaxes, torch.swapdims), ("transpose", "swapaxes", "swapdims")):
        return None
    args = bind(node, ("x", "dim0", "dim1"))
    rank = rank_of(args["x"])
    if rank is None or not isinstance(args.get("dim0"), int) or not isinstance(args.get("dim1"), int):
        return None
    return Permute(args["x"], _swap(rank, args["dim0"], args["dim1"]))


@canonicalizer
def permute_rule(node: Node) -> Optional[Permute]:
    if not is_call(node, (torch.permute,), ("permute",)):
        return None
    x, dims = node.args[0], node.args[1:] or (node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    rank = rank_of(x)
    if rank is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    return Permute(x, tuple(d % rank for d in dims))


@canonicalizer
def matrix_transpose_rule(node: Node) -> Optional[Permute]:
    """``x.mT``, ``x.t()`` on a matrix, ``torch.t``: swap the last two axes."""
    is_mt = node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",)
    is_t = is_call(node, (torch.t,), ("t",))
    if not (is_mt or is_t):
        return None
    rank = rank_of(node.args[0])
    if rank is None or rank < 2 or (is_t and rank != 2):
        return None
    return Permute(node.args[0], _swap(rank, -2, -1))


@canonicalizer
def contiguous_rule(node: Node) -> Optional[Permute]:
    """``contiguous()`` and ``clone()`` keep values and axes; only memory layout changes."""
    if not is_call(node, (torch.clone,), ("contiguous", "clone")):
        return None
    rank = rank_of(node.args[0])
    return Permute(node.args[0], tuple(range(rank))) if rank is not None else None


@canonicalizer
def repeat_interleave_rule(node: Node) -> Optional[RepeatHeads]:
    if not is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        return None
    args = bind(node, ("x", "repeats", "dim"))
    if not isinstance(args.get("repeats"), int) or not isinstance(args.get("dim"), int):
        return None
    return RepeatHeads(args["x"], args["dim"] % rank_of(args["x"]), args["repeats"])


def _unsqueezed(node: object) -> Optional[tuple[Node, int]]:
    """``(x, dim)`` if ``node`` is ``x.unsqueeze(dim)`` or ``x[:, ..., None, ...]`` with full slices elsewhere."""
    if not isinstance(node, Node):
        return None
    if is_call(node, (torch.unsqueeze,), ("unsqueeze",)):
        args = bind(node, ("x", "dim"))
        rank = rank_of(args["x"])
        return (args["x"], args["dim"] % (rank + 1)) if rank is not None and isinstance(args.get("dim"), int) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        nones = [i for i, item in enumerate(index) if item is None]
        if len(nones) == 1 and all(item == full for i, item in enumerate(index) if i != nones[0]):
            return node.args[0], nones[0]
    return None


@canonicalizer
def expand_reshape_repeat_rule(node: Node) -> Optional[RepeatHeads]:
    """``x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)``: transformers' ``repeat_kv``."""
    if not is_call(node, (torch.reshape,), ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not (isinstance(expanded, Node) and is_call(expanded, (), ("expand",))):
        return None
    found = _unsqueezed(expanded.args[0])
    source, out, wide = (tensor_meta(found[0]) if found else None), tensor_meta(node), tensor_meta(expanded)
    if found is None or source is None or out is None or wide is None or found[1] == 0:
        return None
    dim = found[1]
    repeats = wide.shape[dim]
    merged = tuple(source.shape[:dim - 1]) + (source.shape[dim - 1] * repeats,) + tuple(source.shape[dim:])
    same = len(merged) == out.dim() and all(same_size(a, b) for a, b in zip(merged, out.shape))
    others_kept = all(same_size(a, b) for i, (a, b) in enumerate(zip(wide.shape, source.shape[:dim] + (1,) + source.shape[dim:]))
                      if i != dim)
    if not (same and others_kept and isinstance(repeats, int)):
        return None
    return RepeatHeads(found[0], dim - 1, repeats)


def peel_layout(operand: Operand) -> Operand:
    """Follow pure relabelings back to the tensor they view, carrying the axis letters along."""
    while True:
        op = canonical(operand.node)
        if not isinstance(op, Permute) or tensor_meta(op.x) is None:
            return operand
        inner = [""] * len(op.perm)
        for out_dim, in_dim in enumerate(op.perm):
            inner[in_dim] = operand.axes[out_dim]
        operand = Operand(op.x, "".join(inner))


def peel_head_repeat(operand: Operand, head_axis: str) -> tuple[Operand, int]:
    """If ``operand`` repeat-interleaves its ``head_axis``, the un-repeated tensor and the group size."""
    op = canonical(operand.node)
    if isinstance(op, RepeatHeads) and operand.axes.find(head_axis) == op.dim:
        return peel_layout(Operand(op.x, operand.axes)), op.repeats
    return operand, 1


@dataclass(frozen=True)
class HeadRepeat:
    """A k (or v) operand read as ``repeat(source, group) * factors``: what ``peel_scaled_head_repeat`` found."""

    source: Operand
    group: int
    factors: tuple  # numbers or run-time number nodes, each with its ``inverse`` flag: ``((value, inverse), ...)``


def number_factor(node: Node) -> Optional[tuple[Node, object, bool]]:
    """``(x, value, inverse)`` if ``node`` is ``x * value`` or ``x / value`` with ``value`` a number: a Python
    number, a run-time number node (a ``SymFloat``), or a one-element tensor computed from constants.
    A tensor that may vary is never read as a number."""
    op = canonical(node)
    if not isinstance(op, Multiply):
        return None
    sides = ((op.a, op.b),) if op.inverse else ((op.a, op.b), (op.b, op.a))
    for x, other in sides:
        value = _number(other)
        if isinstance(x, Node) and tensor_meta(x) is not None and value is not None:
            return x, value, op.inverse
    return None


def _number(value: object) -> object:
    """``value`` as a float, the node itself for a run-time number, or None for anything that may be a tensor."""
    if is_scalar(value) and not isinstance(value, (torch.SymInt, torch.SymFloat)):
        return float(value)
    if isinstance(value, Node) and is_scalar(example_value(value)):
        return value
    meta = tensor_meta(value)
    if meta is not None and meta.numel() == 1 and meta.dim() == 0 and meta.is_floating_point():
        folded = constant_value(value)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            return float(folded.item())
    return None


def peel_scaled_head_repeat(operand: Operand, head_axis: str) -> HeadRepeat:
    """The head repeat under any number of scalar multiplies and relabelings: ``repeat(k) * s`` reads as
    ``k`` repeated with the factor ``s`` on the scores (a number on k scales every score of its product).
    Without a repeat underneath, ``operand`` itself with group 1 and no factors."""
    factors, current = [], operand
    while True:
        current = peel_layout(current)
        found = number_factor(current.node)
        if found is None:
            break
        current = Operand(found[0], current.axes)
        factors.append((found[1], found[2]))
    source, group = peel_head_repeat(current, head_axis)
    if group == 1:
        return HeadRepeat(operand, 1, ())
    return HeadRepeat(source, group, tuple(factors))

"""Layout rules: ops that only relabel axes (transpose, permute, ``.mT``, contiguous) and k/v head repeats.

An operand is tracked as a node plus one axis letter per dimension; peeling a layout op rewrites
the letters onto the op's input, so the fused call reads the original tensor. A permute counts as
a transpose only when its permutation, computed from its arguments and the tensor's rank, says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import canonical, canonicalizer
from attnfuse.folding import constant_value
from attnfuse.fx_utils import bind, example_value, is_call, is_scalar, rank_of, same_size, statically_true, tensor_meta
from attnfuse.patterns.readers import new_axes_index
from attnfuse.vocabulary import Multiply, Operand, Permute, RepeatHeads


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
    indexed = new_axes_index(node)
    nones = [i for i, item in enumerate(indexed[1]) if item is None] if indexed else []
    return (indexed[0], nones[0]) if len(nones) == 1 else None


_EINOPS_GROUP = re.compile(r"\(\s*(\w+)\s+(\w+)\s*\)")


@canonicalizer
def einops_repeat_rule(node: Node) -> Optional[RepeatHeads]:
    """``einops.repeat(x, 'b g n d -> b (g r) n d', r=n)``, where torch keeps the einops call in the graph
    (torch 2.11): each head repeated ``n`` times in place, as ``repeat_interleave``. ``(r g)`` tiles instead."""
    target = node.target if node.op == "call_function" else None
    if getattr(target, "__name__", "") != "repeat" or not getattr(target, "__module__", "").startswith("einops"):
        return None
    if len(node.args) != 2 or not isinstance(node.args[1], str) or len(node.kwargs) != 1:
        return None
    left, _, right = node.args[1].partition("->")
    groups = _EINOPS_GROUP.findall(right)
    if len(groups) != 1 or not all(re.fullmatch(r"\w+", axis) for axis in left.split()):
        return None
    source, new = groups[0]
    repeats = node.kwargs.get(new)
    if _EINOPS_GROUP.sub(source, right).split() != left.split() or not isinstance(repeats, int):
        return None
    return RepeatHeads(node.args[0], left.split().index(source), repeats)


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


# ----------------------------------------------------------------------------- scores seen through a reshape

def _product(sizes: tuple) -> object:
    """The product of sizes (ints or SymInts)."""
    total = 1
    for size in sizes:
        total = total * size
    return total


def reshape_blocks(outer: tuple, inner: tuple) -> Optional[list[tuple[int, int, int, int]]]:
    """How a reshape from shape ``outer`` to shape ``inner`` regroups axes: consecutive blocks
    ``(outer_start, outer_end, inner_start, inner_end)`` of equal size, each one axis on one side split
    into (or merged from) consecutive axes on the other. None where some block mixes axes, e.g. ``(6, 4)``
    read as ``(4, 6)``, or a size cannot be proven equal for every shape."""
    blocks, i, j = [], 0, 0
    while i < len(outer) and j < len(inner):
        block = None
        for width in range(1, max(len(outer) - i, len(inner) - j) + 1):
            if j + width <= len(inner) and statically_true(lambda: outer[i] == _product(inner[j:j + width])):
                block = (i, i + 1, j, j + width)
            elif i + width <= len(outer) and statically_true(lambda: inner[j] == _product(outer[i:i + width])):
                block = (i, i + width, j, j + 1)
            if block:
                break
        if block is None:
            return None
        blocks.append(block)
        i, j = block[1], block[3]
    if not all(statically_true(lambda: s == 1) for s in (*outer[i:], *inner[j:])):
        return None
    if blocks and (i < len(outer) or j < len(inner)):
        start_i, _, start_j, _ = blocks.pop()
        blocks.append((start_i, len(outer), start_j, len(inner)))
    return blocks


@dataclass(frozen=True)
class Regroup:
    """How to read a tensor broadcast against a reshaped view of the scores on the scores' own shape:
    right-align it to ``rank`` axes, ``expand`` it (-1 keeps an axis, None is the one axis of its block
    inferred from the block's size) and reshape it to ``shape`` (an int, or ``(source, axis)``: the size
    of that axis of a tensor passed beside it). ``blocks`` lists the blocks that infer an axis."""

    rank: int
    expand: tuple
    shape: tuple
    blocks: tuple


# Meta key of a ``regroup`` node whose reshape leaves the last two axes (queries, keys) as they were: the tensor it
# regroups, so a causal or windowed pattern read there holds for the regrouped tensor too.
REGROUPED_FROM = "attnfuse_regrouped_from"


def keeps_query_key_axes(view: tuple, scores: tuple, blocks: list) -> bool:
    """Whether reading the view ``view`` of scores of shape ``scores`` back regroups only the leading axes: the
    last two axes of the scores are each one block, matched one to one with the last two axes of the view (up to
    size-1 axes the view inserts)."""
    n, m = len(scores), len(view)
    if n < 2 or m < 2:
        return False
    by_outer = {b[0]: b for b in blocks if b[1] - b[0] == 1}
    keys, queries = by_outer.get(n - 1), by_outer.get(n - 2)
    if keys != (n - 1, n, m - 1, m) or queries is None or queries[3] != m - 1:
        return False
    return all(statically_true(lambda d=d: view[d] == 1) for d in range(queries[2], m - 2))


def regroup(x: torch.Tensor, rank: int, expand: tuple, shape: tuple, blocks: tuple,
            *sources: torch.Tensor) -> torch.Tensor:
    """``x`` read on the scores' shape (``Regroup``): a view where the reshape only splits axes ``x`` is
    constant along, an expanded copy where it must repeat values (the graph node the rewrite reads)."""
    x = x.reshape((1,) * (rank - x.dim()) + tuple(x.shape))
    sizes = [s if isinstance(s, int) else sources[s[0]].shape[s[1]] for s in shape]
    target = list(expand)
    for outer_start, outer_end, inner_start, inner_end in blocks:
        free = next(d for d in range(inner_start, inner_end) if target[d] is None)
        known = _product(tuple(x.shape[d] if target[d] == -1 else target[d]
                               for d in range(inner_start, inner_end) if d != free))
        target[free] = _product(tuple(sizes[outer_start:outer_end])) // known
    return x.expand(target).reshape(sizes)


def regroup_recipe(meta: torch.Tensor, view: tuple, scores: tuple, blocks: list,
                   size_source: Callable[[int], Optional[tuple]]) -> Union[Regroup, str]:
    """The ``Regroup`` of a tensor with shape ``meta.shape`` broadcast against the view ``view`` of scores of
    shape ``scores`` (``blocks`` from ``reshape_blocks``), or why there is none. ``size_source(axis)`` names a
    tensor axis that holds the size of scores axis ``axis`` at run time, for sizes that are not numbers."""
    shape = (1,) * (len(view) - meta.dim()) + tuple(meta.shape)
    if meta.dim() > len(view) or not all(statically_true(lambda: s == 1) or statically_true(lambda: s == v)
                                         for s, v in zip(shape, view)):
        return f"a tensor of shape {tuple(meta.shape)} broadcasts the reshaped scores {tuple(view)} to a larger shape"
    expand, sizes, inferring = [], [], []
    for outer_start, outer_end, inner_start, inner_end in blocks:
        inner = range(inner_start, inner_end)
        if all(statically_true(lambda: shape[d] == 1) for d in inner):
            expand += [-1] * len(inner)
            sizes += [1] * (outer_end - outer_start)
            continue
        free = [d for d in inner if not statically_true(lambda: shape[d] == view[d])
                and not statically_true(lambda: view[d] == 1) and not isinstance(view[d], int)]
        if len(free) > 1:
            return (f"a tensor of shape {tuple(meta.shape)} is repeated over {len(free)} axes of sizes only known at "
                    f"run time when the reshaped scores {tuple(view)} are read back as {tuple(scores)}")
        for d in inner:
            kept = statically_true(lambda: shape[d] == view[d])
            expand.append(-1 if kept else None if d in free else view[d])
        if free:
            inferring.append((outer_start, outer_end, inner_start, inner_end))
        for axis in range(outer_start, outer_end):
            source = scores[axis] if isinstance(scores[axis], int) else size_source(axis)
            if source is None:
                return f"the size of axis {axis} of the scores is not the size of an axis of q, k or v"
            sizes.append(source)
    return Regroup(len(view), tuple(expand), tuple(sizes), tuple(inferring))


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

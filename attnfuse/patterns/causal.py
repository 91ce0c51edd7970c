"""Causal rules: recognize a keep-mask that is a causal triangle, and which corner it is aligned to.

Two rules, tried in order:
* structural: ``triu``/``tril`` of an all-true ``(L, S)`` tensor with a diagonal offset; works with
  symbolic sizes, because the offset is compared symbolically (``j - i + 1`` is bottom-right);
* by value: a mask that reads no graph input is evaluated (see ``attnfuse.folding``) and compared
  with both triangles; this covers ``arange`` comparisons and any other construction.
Top-left (SDPA's ``is_causal=True``) keeps ``j <= i``; bottom-right keeps ``j <= i + S - L``.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import canonical
from attnfuse.folding import BUFFER_VALUE, buffers_read, constant_value
from attnfuse.fx_utils import (constant_size, example_value, is_call, is_scalar, is_written, memoized, same_size,
                               statically_true, tensor_meta)
from attnfuse.patterns.index import (TRUE, keep_inequalities, keep_terms, query_key_inequalities, triangle_arguments,
                                     triangle_kept)
from attnfuse.patterns.layouts import REGROUPED_FROM
from attnfuse.patterns.readers import filled_with, is_all_true
from attnfuse.vocabulary import MASKING_THRESHOLD, KeepMask, MaskPattern, Select, causal_offset

Size = Union[int, torch.SymInt]

TENSOR = MaskPattern("tensor")


def _alignment(offset: object, L: Size, S: Size) -> Optional[str]:
    """The causal corner for a mask keeping ``j - i <= offset``."""
    for alignment in ("top_left", "bottom_right"):
        if same_size(offset, causal_offset(alignment, L, S)):
            return alignment
    return None


def _all_true_of_shape(node: object, L: Size, S: Size) -> bool:
    """An all-true ``(L, S)`` tensor (``torch.ones(L, S, dtype=bool)`` and friends)."""
    meta = tensor_meta(node)
    return is_all_true(node) and meta.dim() == 2 and same_size(meta.shape[0], L) and same_size(meta.shape[1], S)


def _structural(mask: KeepMask, L: Size, S: Size) -> Optional[MaskPattern]:
    triangle = triangle_arguments(mask.node) if not is_written(mask.node) else None
    if triangle is None or not _all_true_of_shape(triangle[2], L, S):
        return None
    name, diagonal, _ = triangle
    diagonal = example_value(diagonal)
    keeps_lower = (name == "tril") != mask.negated
    if not keeps_lower:
        return TENSOR
    offset = diagonal if name == "tril" else diagonal - 1
    alignment = _alignment(offset, L, S)
    return MaskPattern("causal", alignment) if alignment else TENSOR


def _by_value(mask: KeepMask, L: Size, S: Size) -> Optional[MaskPattern]:
    if not (isinstance(L, int) and isinstance(S, int)):
        return None
    value = constant_value(mask.node, with_buffers=True)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        return None
    pattern = keep_pattern(~value if mask.negated else value, L, S)
    buffers = tuple(buffers_read(mask.node))
    if buffers:  # read from a module buffer: only a causal triangle is used, and only under a guard
        return MaskPattern("causal", pattern.alignment, guarded_by=buffers) if pattern.kind == "causal" else TENSOR
    return pattern


def keep_pattern(keep: torch.Tensor, L: int, S: int) -> MaskPattern:
    """Classify a concrete boolean keep-mask broadcast against ``(..., L, S)`` scores."""
    if bool(keep.all()):
        return MaskPattern("all")
    if keep.dim() < 2 or tuple(keep.shape[-2:]) != (L, S):
        return TENSOR
    slices = keep.reshape(-1, L, S)
    keep = slices[0]
    if not bool((slices == keep).all()):
        return TENSOR
    ones = torch.ones(L, S, dtype=torch.bool, device=keep.device)
    for alignment in ("top_left", "bottom_right"):
        if torch.equal(keep, ones.tril(causal_offset(alignment, L, S))):
            return MaskPattern("causal", alignment)
    return TENSOR


def _by_index(node: Node, negated: bool, L: Size, S: Size) -> Optional[MaskPattern]:
    """A single inequality ``j - i <= offset`` over ``arange`` positions (see ``patterns.index``)."""
    return _from_inequalities(keep_inequalities(node, negated), L, S)


def _from_inequalities(found: Optional[list], L: Size, S: Size) -> Optional[MaskPattern]:
    """The pattern of a keep-mask given as ``a*i + b*j + c <= 0`` terms: causal, with a window, or not."""
    if found is None:
        return None
    constant = [c for a, b, c in found if a == 0 and b == 0]  # a term over no index: ``c <= 0`` everywhere or nowhere
    if not all(statically_true(lambda c=c: c <= 0) for c in constant):
        return TENSOR
    found = [t for t in found if t[:2] != (0, 0)]
    if same_size(L, 1):  # one query row (i = 0, a decoding step): a bound on the keys alone is a bound on j - i
        found = [(-b, b, c) if a == 0 and b in (1, -1) else (a, b, c) for a, b, c in found]
    found = [t for t in found if not _every_position_keeps(t, L, S)]
    if not found:
        return MaskPattern("all")
    causal = [t for t in found if t[:2] == (-1, 1)]
    window = [t for t in found if t[:2] == (1, -1)]
    if len(causal) != 1 or len(window) > 1 or len(causal) + len(window) != len(found):
        return TENSOR
    offset = -causal[0][2]  # keeps j - i <= offset
    alignment = _alignment(offset, L, S)
    if alignment is None:
        return TENSOR
    if not window:
        return MaskPattern("causal", alignment)
    # i - j + c <= 0 keeps j >= i + c: ``size`` keys up to the diagonal, the same for every shape (a plan holds a number)
    size = constant_size(offset - window[0][2] + 1)
    if size is None or size < 1:
        return TENSOR  # a window of no key masks every row, or one that varies with the shapes: kept a tensor
    return MaskPattern("causal", alignment, window=size)



def _every_position_keeps(term: tuple, L: Size, S: Size) -> bool:
    """Whether ``a*i + b*j + c <= 0``, a bound on the query position ``i`` alone or the key position ``j`` alone,
    holds at every position (transformers' bidirectional masks keep ``q >= 0``)."""
    a, b, c = term
    if b == 0 and a in (1, -1):
        sign, size = a, L
    elif a == 0 and b in (1, -1):
        sign, size = b, S
    else:
        return False
    if sign == -1:  # keeps positions >= c: every one where c <= 0
        return statically_true(lambda: c <= 0)
    return statically_true(lambda: size - 1 + c <= 0)  # keeps positions <= -c: every one where the last is


def _with_key_masks(node: Node, negated: bool, L: Size, S: Size) -> Optional[MaskPattern]:
    """An index comparison ANDed with boolean tensors that do not vary along the queries (transformers'
    ``(kv <= q) & (kv > q - w) & padding[b, kv]``): the causal triangle or window, with those tensors as
    ``key_masks`` (none, where each was a constant keeping every key); with no comparison at all (``padding[b, kv]`` expanded over the queries), a ``keys`` pattern.
    Whether a site uses the split is the matcher's choice (``match._uses_key_masks``): SDPA wants a plain causal
    triangle with padding whole, and rebuilding it per call was slower than reading the model's own
    (bench_padding, H100, 2026-11-26)."""
    found = keep_terms(node, negated)
    meta = tensor_meta(node)
    if found is None or meta is None:
        return None
    predicate, tensors = found
    masks = tuple(KeepMask(tensor, polarity) for tensor, polarity in tensors)
    if not all(_constant_along_queries(mask.node) for mask in masks):
        return None
    if predicate == TRUE:  # no comparison of positions: keys alone, if anything was looked through to find them
        return None if masks in ((), (KeepMask(node, negated),)) else MaskPattern("keys", key_masks=masks)
    pattern = _from_inequalities(query_key_inequalities(predicate, tuple(meta.shape)), L, S)
    if pattern is not None and pattern.kind == "all":  # a comparison that keeps every position: keys alone
        return MaskPattern("keys", key_masks=masks) if masks else pattern
    if pattern is None or pattern.kind != "causal":
        return None
    return replace(pattern, key_masks=masks)


def _constant_along_queries(node: Node) -> bool:
    """Whether a tensor broadcast against the scores has one value per key (its query axis is 1 or absent)."""
    meta = tensor_meta(node)
    return meta is not None and (meta.dim() < 2 or (isinstance(meta.shape[-2], int) and meta.shape[-2] == 1))


def classify(mask: KeepMask, L: Size, S: Size) -> MaskPattern:
    """Classify a keep-mask of scores with ``L`` queries and ``S`` keys (once per graph, polarity and sizes)."""
    sizes = _size_key(L, S)
    key = None if sizes is None else (mask.negated, *sizes)
    return memoized(mask.node, "attnfuse_keep_pattern", key, lambda: _classify(mask, L, S))


def _classify(mask: KeepMask, L: Size, S: Size) -> MaskPattern:
    source = mask.node.meta.get(REGROUPED_FROM) if isinstance(mask.node, Node) else None
    if source is not None:
        return _position_only(classify(KeepMask(source, mask.negated), L, S)) or TENSOR
    return (_structural(mask, L, S) or _by_index(mask.node, mask.negated, L, S)
            or _with_key_masks(mask.node, mask.negated, L, S) or _by_value(mask, L, S)
            or _by_sliced_buffer(mask, L, S) or TENSOR)


_ELEMENTWISE_FUNCTIONS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.invert,
                          torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_not)
_ELEMENTWISE_METHODS = ("eq", "ne", "lt", "le", "gt", "ge", "logical_not", "bool", "float", "int", "long", "to")


def _elementwise_input(node: Node) -> Optional[Node]:
    """The one tensor an elementwise op of ``node`` reads (``b == 0``, ``~b``, ``b.bool()``), others being numbers."""
    if not is_call(node, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS) or is_written(node):
        return None
    nodes = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Node)]
    if len(nodes) != 1 or node.args[:1] != (nodes[0],) or tensor_meta(nodes[0]) is None:
        return None
    return nodes[0]


def _buffer_slice(node: Node) -> Optional[tuple[Node, object, object]]:
    """``(buffer, row_start, column_start)`` for ``buffer[:, ..., :, a:, b:]``-style slices of a module buffer
    (starts and stops may be symbolic; a start that wraps around is caught by the per-call buffer guard)."""
    if not (node.op == "call_function" and node.target is operator.getitem) or is_written(node):
        return None
    buffer, index = node.args
    meta = tensor_meta(buffer)
    if not (isinstance(buffer, Node) and BUFFER_VALUE in buffer.meta and isinstance(index, tuple) and meta is not None):
        return None
    full = slice(None, None, None)
    if len(index) != meta.dim() or len(index) < 2 or any(item != full for item in index[:-2]):
        return None
    starts = []
    for item in index[-2:]:
        if not isinstance(item, slice) or item.step not in (None, 1):
            return None
        start = example_value(item.start) if item.start is not None else 0
        if not isinstance(start, (int, torch.SymInt)):
            return None
        starts.append(start)
    return buffer, starts[0], starts[1]


def _triangle_offset(keep: torch.Tensor) -> Optional[int]:
    """``c`` if the ``(H, W)`` boolean ``keep`` is ``ones(H, W).tril(c)`` with some row neither empty nor full."""
    H, W = keep.shape
    counts = keep.sum(-1)
    rows = ((counts > 0) & (counts < W)).nonzero()
    if not len(rows):
        return None
    row = int(rows[0])
    offset = int(counts[row]) - 1 - row
    return offset if torch.equal(keep, torch.ones(H, W, dtype=torch.bool, device=keep.device).tril(offset)) else None


def _by_sliced_buffer(mask: KeepMask, L: Size, S: Size) -> Optional[MaskPattern]:
    """nanoGPT's ``bias[:, :, :T, :T] == 0`` at symbolic sizes: elementwise ops of a slice of a module buffer
    holding a triangle. Evaluated on the whole buffer, the ops give ``j' - i' <= c``; rows from ``a`` and
    columns from ``b`` then keep ``j - i <= c + a - b``. The buffer is guarded on each call (``attnfuse.guards``)."""
    path, node = [], mask.node
    while (inner := _elementwise_input(node)) is not None:
        path.append(node)
        node = inner
    found = _buffer_slice(node)
    meta, sliced = tensor_meta(mask.node), tensor_meta(node)
    if found is None or meta is None or sliced is None or meta.dim() < 2 or tuple(meta.shape) != tuple(sliced.shape):
        return None
    if not (same_size(meta.shape[-2], L) and same_size(meta.shape[-1], S)):
        return None
    buffer, a, b = found
    value = _apply_elementwise(reversed(path), buffer.meta[BUFFER_VALUE])
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() < 2:
        return None
    keep = ~value if mask.negated else value
    planes = keep.reshape(-1, *keep.shape[-2:])
    offset = _triangle_offset(planes[0]) if bool((planes == planes[:1]).all()) else None
    alignment = _alignment(offset + a - b, L, S) if offset is not None else None
    if alignment is None:
        return TENSOR
    return MaskPattern("causal", alignment, guarded_by=tuple(_placeholders_read(mask.node)))


def _apply_elementwise(path, value: torch.Tensor) -> Optional[torch.Tensor]:
    """The ops of ``path`` (first to last) applied to ``value`` in place of their tensor input."""
    for node in path:
        args = (value, *node.args[1:])
        try:
            value = getattr(value, node.target)(*args[1:], **node.kwargs) if node.op == "call_method" \
                else node.target(*args, **node.kwargs)
        except Exception:
            return None
    return value


def _placeholders_read(node: Node) -> list[Node]:
    """The graph inputs ``node`` depends on (module buffers and symbolic sizes), in graph order."""
    found, pending, seen = set(), [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(current)
        pending.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in found]


def read_at_run_time(node: Node) -> bool:
    """Whether ``node`` reads a tensor handed to the graph at run time (an argument, not a module parameter or
    buffer): its values are not known at capture, so only a per-call check can find a triangle in them
    (``attnfuse.guards.RunTimeCausal``)."""
    return any(tensor_meta(p) is not None and "_parameters_" not in p.name and "_buffers_" not in p.name
               for p in _placeholders_read(node))


def classify_additive(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, Optional[float]]]:
    """A constant additive bias holding only 0 and one value <= the masking threshold: ``(pattern, value)``.

    This is how transformers' eager models pass a causal mask (``0`` / ``finfo.min``). Only biases
    that read no graph input are evaluated, so the answer is exact for the graph it was found in. Read
    once per graph and sizes (every layer of a model adds the same mask).
    """
    return memoized(bias, "attnfuse_additive", _size_key(L, S), lambda: _classify_additive(bias, L, S))


def _size_key(L: Size, S: Size) -> Optional[tuple[int, int]]:
    """The memo key of a classification at ``(L, S)``: the sizes where both are plain ints (a symbolic size is
    not hashable), else None (not remembered)."""
    return (L, S) if isinstance(L, int) and isinstance(S, int) else None


def _position_only(pattern: Optional[MaskPattern]) -> Optional[MaskPattern]:
    """``pattern`` where it depends on query and key positions alone (causal, windowed or everything kept, no
    key-padding tensor or guarded buffer), so it reads the same on any regrouping of the leading axes."""
    if pattern is None or pattern.kind not in ("causal", "all") or pattern.key_masks or pattern.guarded_by:
        return None
    return pattern


def _classify_additive(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, Optional[float]]]:
    source = bias.meta.get(REGROUPED_FROM)
    if source is not None:  # a mask added to a reshaped view of the scores (Bloom's 4-d view of batch * heads)
        found = classify_additive(source, L, S)
        return found if found is not None and _position_only(found[0]) is not None else None
    structural = _additive_by_index(bias, L, S) or _additive_triangle(bias, L, S)
    if structural is not None:
        return structural
    if not (isinstance(L, int) and isinstance(S, int)):
        return None
    value = constant_value(bias)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    masked = value != 0
    if not bool(masked.any()):
        return MaskPattern("all"), None
    fill = _uniform_nonzero(value)
    if fill is None or not fill <= MASKING_THRESHOLD:
        return None
    return keep_pattern(~masked, L, S), fill


def _uniform_nonzero(value: torch.Tensor) -> Optional[float]:
    """The one value of ``value``'s nonzero entries (some exist), or None where they differ or one is NaN:
    the smallest entry, if every entry is 0 or it (a linear check where ``unique`` sorts)."""
    lowest = value.amin()
    if not bool(((value == 0) | (value == lowest)).all()):
        return None
    return float(lowest)


def _additive_by_index(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, float]]:
    """``where(keep, 0, fill)`` / ``where(drop, fill, 0)`` with an index-comparison condition."""
    select = canonical(bias)
    if not isinstance(select, Select):
        return None
    for zero, fill, negated in ((select.if_true, select.if_false, False), (select.if_false, select.if_true, True)):
        zero_value, fill_value = _scalar(zero), _scalar(fill)
        if zero_value == 0 and fill_value is not None and fill_value <= MASKING_THRESHOLD:
            pattern = _by_index(select.cond, negated, L, S) or _with_key_masks(select.cond, negated, L, S)
            if pattern is not None and pattern.kind != "tensor":
                return pattern, fill_value
    return None


def _additive_triangle(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, float]]:
    """``full(shape, fill).triu(d)`` (or ``tril``): ``fill`` inside the triangle, 0 outside, at any size."""
    triangle = triangle_arguments(bias) if not is_written(bias) else None
    meta = tensor_meta(bias)
    if triangle is None or meta is None:
        return None
    name, diagonal, source = triangle
    fill = _full_value(source)
    kept = triangle_kept(name, diagonal, meta.dim())
    if fill is None or not fill <= MASKING_THRESHOLD or kept is None:
        return None
    pattern = _from_inequalities(query_key_inequalities(kept.negate(), tuple(meta.shape)), L, S)
    return (pattern, fill) if pattern is not None and pattern.kind != "tensor" else None


def _full_value(node: object) -> Optional[float]:
    """The number an unwritten ``torch.full(shape, value)`` (``x.new_full``, ``ones``) holds everywhere."""
    value = filled_with(node)
    return float(value) if is_scalar(value) and not isinstance(value, (torch.SymInt, torch.SymFloat)) else None


def _scalar(value: object) -> Optional[float]:
    """A Python number, or a constant single-element tensor node (``zeros(())``), as a float."""
    if is_scalar(value):
        return float(value)
    folded = constant_value(value) if isinstance(value, Node) else None
    if isinstance(folded, torch.Tensor) and folded.numel() >= 1 and folded.is_floating_point():
        flat = folded.flatten()
        if bool((flat == flat[0]).all()):
            return float(flat[0])
    return None

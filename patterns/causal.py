"""Causal rules: recognize a keep-mask that is a causal triangle, and which corner it is aligned to.

Two rules, tried in order:
* structural: ``triu``/``tril`` of an all-true ``(L, S)`` tensor with a diagonal offset; works with
  symbolic sizes, because the offset is compared symbolically (``j - i + 1`` is bottom-right);
* by value: a mask that reads no graph input is evaluated (see ``attnfuse.constants``) and compared
  with both triangles; this covers ``arange`` comparisons and any other construction.
Top-left (SDPA's ``is_causal=True``) keeps ``j <= i``; bottom-right keeps ``j <= i + S - L``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.canonical import (bind, canonical, example_value, is_call, is_scalar, is_written, same_size,
                                statically_true)
from attnfuse.constants import buffers_read, constant_value
from attnfuse.patterns.index import keep_inequalities
from attnfuse.patterns.masks import MASKING_THRESHOLD, KeepMask, Select

Size = Union[int, torch.SymInt]


@dataclass(frozen=True)
class MaskPattern:
    """What a keep-mask is: ``causal`` (with ``alignment``), ``all`` (keeps everything) or ``tensor``."""

    kind: str
    alignment: Optional[str] = None
    window: Optional[object] = None
    guarded_by: tuple = ()


TENSOR = MaskPattern("tensor")


def _alignment(offset: object, L: Size, S: Size) -> Optional[str]:
    """The causal corner for a mask keeping ``j - i <= offset``."""
    if same_size(offset, 0):
        return "top_left"
    if same_size(offset, S - L):
        return "bottom_right"
    return None


def _all_true_of_shape(node: object, L: Size, S: Size) -> bool:
    if not isinstance(node, Node) or is_written(node):
        return False
    if is_call(node, (torch.ones,)):
        shape = node.args[0] if len(node.args) == 1 and isinstance(node.args[0], (tuple, list)) else node.args
    elif is_call(node, (torch.full,)):
        shape = node.args[0]
        if node.args[1:2] != (True,) and node.kwargs.get("fill_value") is not True:
            return False
    else:
        return False
    return len(shape) == 2 and same_size(shape[0], L) and same_size(shape[1], S)


def _triangle(node: Node) -> Optional[tuple[str, object, Node]]:
    """``("triu" | "tril", diagonal, source)`` for any spelling of a triangle op."""
    for name in ("triu", "tril"):
        if is_call(node, (getattr(torch, name),), (name, name + "_")):
            args = bind(node, ("x", "diagonal"), diagonal=0)
            return name, args["diagonal"], args["x"]
    return None


def _structural(mask: KeepMask, L: Size, S: Size) -> Optional[MaskPattern]:
    triangle = _triangle(mask.node) if not is_written(mask.node) else None
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
    pattern = _keep_pattern(~value if mask.negated else value, L, S)
    buffers = tuple(buffers_read(mask.node))
    if buffers:  # read from a module buffer: only a causal triangle is used, and only under a guard
        return MaskPattern("causal", pattern.alignment, guarded_by=buffers) if pattern.kind == "causal" else TENSOR
    return pattern


def _keep_pattern(keep: torch.Tensor, L: int, S: int) -> MaskPattern:
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
    for alignment, offset in (("top_left", 0), ("bottom_right", S - L)):
        if torch.equal(keep, ones.tril(offset)):
            return MaskPattern("causal", alignment)
    return TENSOR


def _by_index(node: Node, negated: bool, L: Size, S: Size) -> Optional[MaskPattern]:
    """A single inequality ``j - i <= offset`` over ``arange`` positions (see ``patterns.index``)."""
    found = keep_inequalities(node, negated)
    if found is None:
        return None
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
    size = offset - window[0][2] + 1  # i - j + c <= 0 keeps j >= i + c: ``size`` keys up to the diagonal
    if not statically_true(lambda: size >= 1):
        return TENSOR  # a window of no key masks every row: not a sliding window
    return MaskPattern("causal", alignment, window=size)



def classify(mask: KeepMask, L: Size, S: Size) -> MaskPattern:
    """Classify a keep-mask of scores with ``L`` queries and ``S`` keys."""
    return (_structural(mask, L, S) or _by_index(mask.node, mask.negated, L, S) or _by_value(mask, L, S)
            or TENSOR)


def classify_additive(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, Optional[float]]]:
    """A constant additive bias holding only 0 and one value <= the masking threshold: ``(pattern, value)``.

    This is how transformers' eager models pass a causal mask (``0`` / ``finfo.min``). Only biases
    that read no graph input are evaluated, so the answer is exact for the graph it was found in.
    """
    structural = _additive_by_index(bias, L, S)
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
    fills = value[masked].unique()
    if fills.numel() != 1 or not float(fills[0]) <= MASKING_THRESHOLD:
        return None
    return _keep_pattern(~masked, L, S), float(fills[0])


def _additive_by_index(bias: Node, L: Size, S: Size) -> Optional[tuple[MaskPattern, float]]:
    """``where(keep, 0, fill)`` / ``where(drop, fill, 0)`` with an index-comparison condition."""
    select = canonical(bias)
    if not isinstance(select, Select):
        return None
    for zero, fill, negated in ((select.if_true, select.if_false, False), (select.if_false, select.if_true, True)):
        zero_value, fill_value = _scalar(zero), _scalar(fill)
        if zero_value == 0 and fill_value is not None and fill_value <= MASKING_THRESHOLD:
            pattern = _by_index(select.cond, negated, L, S)
            if pattern is not None and pattern.kind != "tensor":
                return pattern, fill_value
    return None


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

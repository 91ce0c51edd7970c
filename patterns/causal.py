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
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnfuse.canonical import bind, example_value, is_call
from attnfuse.constants import constant_value
from attnfuse.patterns.masks import KeepMask

Size = Union[int, torch.SymInt]


@dataclass(frozen=True)
class MaskPattern:
    """What a keep-mask is: ``causal`` (with ``alignment``), ``all`` (keeps everything) or ``tensor``."""

    kind: str
    alignment: Optional[str] = None


TENSOR = MaskPattern("tensor")


def _same(a: object, b: object) -> bool:
    a, b = example_value(a), example_value(b)
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _alignment(offset: object, L: Size, S: Size) -> Optional[str]:
    """The causal corner for a mask keeping ``j - i <= offset``."""
    if _same(offset, 0):
        return "top_left"
    if _same(offset, S - L):
        return "bottom_right"
    return None


def _all_true_of_shape(node: object, L: Size, S: Size) -> bool:
    if not isinstance(node, Node):
        return False
    if is_call(node, (torch.ones,)):
        shape = node.args[0] if len(node.args) == 1 and isinstance(node.args[0], (tuple, list)) else node.args
    elif is_call(node, (torch.full,)):
        shape = node.args[0]
        if node.args[1:2] != (True,) and node.kwargs.get("fill_value") is not True:
            return False
    else:
        return False
    return len(shape) == 2 and _same(shape[0], L) and _same(shape[1], S)


def _triangle(node: Node) -> Optional[tuple[str, object, Node]]:
    """``("triu" | "tril", diagonal, source)`` for any spelling of a triangle op."""
    for name in ("triu", "tril"):
        if is_call(node, (getattr(torch, name),), (name, name + "_")):
            args = bind(node, ("x", "diagonal"), diagonal=0)
            return name, args["diagonal"], args["x"]
    return None


def _structural(mask: KeepMask, L: Size, S: Size) -> Optional[MaskPattern]:
    triangle = _triangle(mask.node)
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
    value = constant_value(mask.node)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        return None
    keep = ~value if mask.negated else value
    if bool(keep.all()):
        return MaskPattern("all")
    while keep.dim() > 2 and keep.shape[0] == 1:
        keep = keep[0]
    if keep.shape != (L, S):
        return TENSOR
    ones = torch.ones(L, S, dtype=torch.bool)
    for alignment, offset in (("top_left", 0), ("bottom_right", S - L)):
        if torch.equal(keep, ones.tril(offset)):
            return MaskPattern("causal", alignment)
    return TENSOR


def classify(mask: KeepMask, L: Size, S: Size) -> MaskPattern:
    """Classify a keep-mask of scores with ``L`` queries and ``S`` keys."""
    return _structural(mask, L, S) or _by_value(mask, L, S) or TENSOR

"""Readers of mask and position constructions shared by the rule families: ``arange`` positions,
``x[:, None]``-style indexing and tensors filled at construction (``ones``, ``full``), each read one way."""
from __future__ import annotations

from typing import Optional

import operator

import torch
from torch.fx import Node

from attnfuse.fx_utils import bind, example_value, is_call, is_written, tensor_meta

_FULL_SLICE = slice(None, None, None)


def arange_arguments(node: Node) -> dict:
    """``start``, ``end``, ``step`` of any ``torch.arange`` call (``arange(n)``, ``arange(end=n)``, ...)."""
    args = bind(node, ("start", "end", "step"))
    if "end" not in args:
        args = {"start": 0, "end": args.get("start"), **({"step": args["step"]} if "step" in args else {})}
    args.setdefault("start", 0)
    args.setdefault("step", 1)
    return args


def exact_positions(node: Node) -> bool:
    """Whether every position of this ``arange`` is exact in its dtype (no wrap, no rounding)."""
    meta = tensor_meta(node)
    if meta is None:
        return False
    if meta.dtype in (torch.int64, torch.int32):
        return True
    limit = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}.get(meta.dtype)
    length = meta.shape[0] if meta.dim() == 1 else None
    end = example_value(arange_arguments(node)["end"])
    return limit is not None and isinstance(length, int) and isinstance(end, int) and abs(end) + length <= limit


def new_axes_index(node: Node) -> Optional[tuple[object, tuple]]:
    """``(x, items)`` for ``x[items]`` whose items are each ``None`` (a new axis) or a full slice
    (``x[:, None]``, ``x[None, :, None]``, ``x[None]``); None for any other node or index."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not all(item is None or item == _FULL_SLICE for item in items):
        return None
    return node.args[0], items


def filled_with(node: object) -> Optional[object]:
    """The value a tensor holds everywhere by construction: 1 for ``ones`` / ``ones_like`` / ``new_ones``, 0 for
    ``zeros`` / ``zeros_like`` / ``new_zeros``, the fill of ``full`` / ``new_full``; None for any other node or one
    written in place after."""
    if not isinstance(node, Node) or is_written(node):
        return None
    if is_call(node, (torch.ones, torch.ones_like), ("new_ones",)):
        return 1
    if is_call(node, (torch.zeros, torch.zeros_like), ("new_zeros",)):
        return 0
    if is_call(node, (torch.full,)):
        return bind(node, ("size", "fill_value")).get("fill_value")
    if is_call(node, (), ("new_full",)):
        return bind(node, ("x", "size", "fill_value")).get("fill_value")
    return None


def is_all_true(node: object) -> bool:
    """A boolean tensor True everywhere by construction (``torch.ones(..., dtype=bool)``, ``new_full(s, True)``)."""
    meta = tensor_meta(node)
    fill = filled_with(node)
    return meta is not None and meta.dtype == torch.bool and isinstance(fill, (bool, int, float)) and fill == 1

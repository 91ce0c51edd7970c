"""Cast rules: ``.float()``, ``.to(dtype)``, ``.type_as(t)`` around the softmax (precision, not math)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from attnfuse.canonical import canonical, canonicalizer
from attnfuse.fx_utils import is_call, tensor_meta
from attnfuse.patterns.layouts import peel_layout
from attnfuse.vocabulary import Cast, Operand

_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "double": torch.float64}


@canonicalizer
def cast_rule(node: Node) -> Optional[Cast]:
    if node.op == "call_method" and node.target in _DTYPE_METHODS and len(node.args) == 1:
        return Cast(node.args[0], _DTYPE_METHODS[node.target])
    if not is_call(node, (), ("to", "type", "type_as")):
        return None
    out = tensor_meta(node)
    source = tensor_meta(node.args[0])
    if out is None or source is None or out.device != source.device or out.shape != source.shape:
        return None
    return Cast(node.args[0], out.dtype)


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value is exactly a ``target`` value (bf16 -> fp32, fp32 -> fp64, ...)."""
    return source != target and source.is_floating_point and torch.promote_types(source, target) == target


def peel_upcasts(operand: Operand) -> Operand:
    """Follow relabelings and exact widening casts (``q.float()`` of a bf16 ``q``) back to the narrower tensor.

    The widened tensor holds the same values, so the fused call may read the narrower one and choose
    the precision it computes in from the whole site (``attnfuse.precision``).
    """
    while True:
        operand = peel_layout(operand)
        op = canonical(operand.node)
        if not isinstance(op, Cast):
            return operand
        source, target = tensor_meta(op.x), tensor_meta(operand.node)
        if source is None or target is None or not _widens(source.dtype, target.dtype):
            return operand
        operand = Operand(op.x, operand.axes)

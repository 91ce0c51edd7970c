"""Cast rules: ``.float()``, ``.to(dtype)``, ``.type_as(t)`` around the softmax (precision, not math)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from attnfuse.canonical import canonicalizer, is_call, tensor_meta

_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "double": torch.float64}


@dataclass(frozen=True)
class Cast:
    """``x`` converted to ``dtype``; the fused kernel computes the softmax in fp32 whatever the casts say."""

    x: Node
    dtype: torch.dtype


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

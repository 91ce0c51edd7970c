"""Constant folding for the matcher: evaluate a subgraph that reads no graph input.

With static shapes Dynamo bakes sizes into the graph, so a mask built from ``ones``/``triu``/
``arange`` of those sizes is a constant of that compiled graph: evaluating it once is exact for
every call that graph serves (a shape change recompiles it).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node
from torch.fx.node import map_arg

_RANDOM_TARGETS = {"rand", "randn", "randint", "bernoulli", "dropout", "normal", "rand_like", "randn_like"}
# Largest constant evaluated at compile time: masks are evaluated where the model runs, and a GPU
# takes an (8, 1, 8192, 8192) mask in milliseconds.
_MAX_ELEMENTS = {"cuda": 1 << 30, "cpu": 1 << 26}


def _is_foldable_call(node: Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return name not in _RANDOM_TARGETS


def _too_large(meta: Any) -> bool:
    if not isinstance(meta, torch.Tensor):
        return False
    return meta.numel() > _MAX_ELEMENTS.get(meta.device.type, _MAX_ELEMENTS["cpu"])


def constant_value(node: Any) -> Optional[Any]:
    """The value of ``node`` if it depends on no graph input (computed on its own device), else None."""
    if not isinstance(node, Node):
        return node
    cache = node.meta.setdefault("attnfuse_constant", {})
    if "value" in cache:
        return cache["value"]
    cache["value"] = None
    if _too_large(node.meta.get("example_value")):
        return None
    if not _is_foldable_call(node):
        return None
    missing = []

    def resolve(arg: Node) -> Any:
        value = constant_value(arg)
        if value is None:
            missing.append(arg)
        return value

    args = map_arg(node.args, resolve)
    kwargs = map_arg(node.kwargs, resolve)
    if missing:
        return None
    try:
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    except Exception:
        return None
    if isinstance(value, torch.Tensor) and isinstance(value, torch._subclasses.FakeTensor):
        return None
    cache["value"] = value
    return value

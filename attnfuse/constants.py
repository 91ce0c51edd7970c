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
_MAX_ELEMENTS = 1 << 26


def _is_foldable_call(node: Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return name not in _RANDOM_TARGETS


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("cpu")
    return value


def constant_value(node: Any, max_elements: int = _MAX_ELEMENTS) -> Optional[Any]:
    """The value of ``node`` computed on the CPU if it depends on no graph input, else None."""
    if not isinstance(node, Node):
        return node
    cache = node.meta.setdefault("attnfuse_constant", {})
    if "value" in cache:
        return cache["value"]
    cache["value"] = None
    meta = node.meta.get("example_value")
    if isinstance(meta, torch.Tensor) and meta.numel() > max_elements:
        return None
    if not _is_foldable_call(node):
        return None
    missing = []

    def resolve(arg: Node) -> Any:
        value = constant_value(arg, max_elements)
        if value is None:
            missing.append(arg)
        return value

    args = map_arg(node.args, resolve)
    kwargs = map_arg(node.kwargs, resolve)
    if missing:
        return None
    kwargs = {k: _on_cpu(v) for k, v in kwargs.items()}
    args = tuple(_on_cpu(a) for a in args)
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

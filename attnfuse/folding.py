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

from attnfuse.fx_utils import is_written

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


BUFFER_VALUE = "attnfuse_buffer_value"


def constant_value(node: Any, with_buffers: bool = False) -> Optional[Any]:
    """The value of ``node`` if it depends on no graph input (computed on its own device), else None.

    With ``with_buffers``, module buffers count as constants at the value they had when the graph was
    captured (``BUFFER_VALUE`` in their meta); a rewrite that relies on such a value must guard the
    buffers it read (``buffers_read``), since a buffer can change without a recompile.
    """
    if not isinstance(node, Node):
        return node
    if is_written(node):
        return None
    cache = node.meta.setdefault("attnfuse_constant", {})
    key = "with_buffers" if with_buffers else "value"
    if key in cache:
        return cache[key]
    cache[key] = None
    if with_buffers and node.op == "placeholder" and BUFFER_VALUE in node.meta:
        cache[key] = node.meta[BUFFER_VALUE]
        return cache[key]
    if _too_large(node.meta.get("example_value")):
        return None
    if not _is_foldable_call(node):
        return None
    missing = []

    def resolve(arg: Node) -> Any:
        value = constant_value(arg, with_buffers)
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
    cache[key] = value
    return value


def buffers_read(node: Node) -> list[Node]:
    """The buffer placeholders that ``node``'s value depends on."""
    found, pending, seen = [], [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" and BUFFER_VALUE in current.meta:
            found.append(current)
        pending.extend(current.all_input_nodes)
    return found


def forget_values(graph) -> None:
    """Drop the values ``constant_value`` cached in ``graph``'s nodes once matching is done: a folded mask can be
    as large as the scores, and the compiled graph (and the copies of its nodes that sites keep to run their
    original ops, which share these caches) would otherwise hold it for as long as the model lives."""
    for node in graph.nodes:
        cache = node.meta.get("attnfuse_constant")
        if cache:
            cache.clear()

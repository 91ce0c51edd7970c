"""Canonicalize: read an FX node as one of a few canonical operations, whatever its spelling.

Dynamo graphs keep the user's spelling (``torch.einsum`` or ``@``, ``x.softmax`` or ``F.softmax``,
``masked_fill`` or ``torch.where``). The rule families in ``attnfuse.patterns`` each register small
*canonicalizers* here that turn one spelling into a canonical op record; the matcher only ever sees
those records, so a new spelling costs one small rule.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import Node

Canonicalizer = Callable[[Node], Optional[Any]]
_CANONICALIZERS: list[Canonicalizer] = []


def canonicalizer(fn: Canonicalizer) -> Canonicalizer:
    """Register ``fn`` as a spelling rule: it returns a canonical op for nodes it recognizes, else None."""
    _CANONICALIZERS.append(fn)
    return fn


def canonical(node: Any) -> Optional[Any]:
    """The canonical op that ``node`` computes, or None when no rule recognizes it."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    cache = node.meta.setdefault("attnfuse_canonical", {})
    if "op" not in cache:
        cache["op"] = next((op for rule in _CANONICALIZERS if (op := rule(node)) is not None), None)
    return cache["op"]


def is_call(node: Node, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    """Whether ``node`` calls one of ``functions`` or one of the Tensor ``methods``."""
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    if node.op == "call_method":
        return node.target in methods
    return False


def bind(node: Node, names: tuple[str, ...], **defaults: Any) -> dict[str, Any]:
    """Positional and keyword arguments of a call node by name (a method's ``self`` is the first name)."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def example_value(node: Any) -> Any:
    """The fake tensor (or value) Dynamo recorded for ``node``; plain Python values pass through."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    """The example tensor of ``node`` if it produces a tensor, else None."""
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def rank_of(node: Any) -> Optional[int]:
    meta = tensor_meta(node)
    return meta.dim() if meta is not None else None


def is_scalar(value: Any) -> bool:
    """A Python number (or symbolic number) rather than a tensor or graph node."""
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


ARITHMETIC = {
    "mul": (operator.mul, torch.mul, torch.Tensor.mul),
    "div": (operator.truediv, torch.div, torch.true_divide, torch.Tensor.div),
    "add": (operator.add, torch.add, torch.Tensor.add),
    "sub": (operator.sub, torch.sub, torch.Tensor.sub),
}
INPLACE_ARITHMETIC = {
    "mul": (operator.imul,),
    "div": (operator.itruediv,),
    "add": (operator.iadd,),
    "sub": (operator.isub,),
}
METHODS = {"mul": ("mul", "mul_"), "div": ("div", "div_", "true_divide"), "add": ("add", "add_"),
           "sub": ("sub", "sub_")}


def arithmetic_kind(node: Node) -> Optional[str]:
    """'mul', 'div', 'add' or 'sub' for any spelling of that binary op (functional, operator, method, in-place)."""
    for kind in ARITHMETIC:
        if is_call(node, ARITHMETIC[kind] + INPLACE_ARITHMETIC[kind], METHODS[kind]):
            return kind
    return None

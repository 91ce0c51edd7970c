"""Canonicalize: read an FX node as one of a few canonical operations, whatever its spelling.

Dynamo graphs keep the user's spelling (``torch.einsum`` or ``@``, ``x.softmax`` or ``F.softmax``,
``masked_fill`` or ``torch.where``). The rule families in ``attnfuse.patterns`` each register small
*canonicalizers* here that turn one spelling into a canonical op record; the matcher only ever sees
those records, so a new spelling costs one small rule.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
from torch.fx import Graph, Node

from attnfuse.fx_utils import is_call, is_written
from attnfuse.logs import active_clock

Canonicalizer = Callable[[Node], Optional[Any]]
_CANONICALIZERS: list[Canonicalizer] = []


def canonicalizer(fn: Canonicalizer) -> Canonicalizer:
    """Register ``fn`` as a spelling rule: it returns a canonical op for nodes it recognizes, else None."""
    _CANONICALIZERS.append(fn)
    return fn


def canonical(node: Any) -> Optional[Any]:
    """The canonical op that ``node`` computes, or None when no rule recognizes it."""
    return None if is_written(node) else spelling(node)


def spelling(node: Any) -> Optional[Any]:
    """The canonical op ``node`` is spelled as, even if its storage is written in place later (for
    telling whether a softmax sits between two products, not for reading its value)."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    cache = node.meta.setdefault("attnfuse_canonical", {})
    if "op" not in cache:
        clock = active_clock()
        if clock is not None:
            clock.enter("canonicalize")
        try:
            cache["op"] = next((op for rule in _CANONICALIZERS if (op := rule(node)) is not None), None)
        finally:
            if clock is not None:
                clock.leave()
    return cache["op"]


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


_DUNDER = {f"__{name.rstrip('_')}__": getattr(operator, name) for name in (
    "eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
    "and_", "or_", "xor", "neg", "pos", "invert", "getitem")}
_REFLECTED = {f"__r{name.rstrip('_')}__": getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor")}


def normalize_dunder_methods(graph: Graph) -> None:
    """Write ``x.__eq__(0)`` (how some torch versions record ``x == 0``) as ``operator.eq(x, 0)`` and
    ``x.__radd__(y)`` as ``operator.add(y, x)``, so every rule sees one spelling of an operator."""
    for node in graph.nodes:
        if node.op != "call_method" or node.kwargs:
            continue
        if node.target in _DUNDER:
            node.op, node.target = "call_function", _DUNDER[node.target]
        elif node.target in _REFLECTED and len(node.args) == 2:
            node.op, node.target = "call_function", _REFLECTED[node.target]
            node.args = (node.args[1], node.args[0])

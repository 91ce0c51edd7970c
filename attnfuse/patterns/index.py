"""Index rules: masks written as comparisons of ``arange`` positions, read symbolically.

``arange(L)[:, None] >= arange(S)[None, :]`` and its many spellings (offsets for a KV cache,
``unsqueeze`` or ``None`` indexing, ``expand``, ``~``, ``&``, ``|``) are interpreted as linear
inequalities over the query index ``i`` and key index ``j``. This proves what a mask is for every
size at once, so it also holds under dynamic shapes, where the mask cannot be evaluated.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from attnfuse.folding import constant_value
from attnfuse.fx_utils import bind, example_value, is_call, is_scalar, is_written, tensor_meta
from attnfuse.patterns.readers import arange_arguments, exact_positions, is_all_true, new_axes_index

Number = Union[int, torch.SymInt]


@dataclass(frozen=True)
class Linear:
    """An integer tensor whose value at index ``(k_0, ..., k_r)`` is ``sum(coef[d] * k_d) + const``."""

    coef: tuple[int, ...]
    const: object = 0


@dataclass(frozen=True)
class Inequality:
    """The boolean tensor ``sum(coef[d] * k_d) + const <= 0``."""

    coef: tuple[int, ...]
    const: object

    def negate(self) -> "Inequality":
        # not (x <= 0)  <=>  x >= 1  <=>  -x + 1 <= 0, for integers
        return Inequality(tuple(-c for c in self.coef), 1 - self.const)


@dataclass(frozen=True)
class Logic:
    """``all`` (``op == "and"``) or ``any`` (``"or"``) of predicates."""

    op: str
    terms: tuple

    def negate(self) -> "Logic":
        return Logic("or" if self.op == "and" else "and", tuple(_negate(t) for t in self.terms))


Predicate = Union[Inequality, Logic]


def _negate(p: Predicate) -> Predicate:
    return p.negate()


def _pad(coef: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (0,) * (rank - len(coef)) + coef


def _align(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rank = max(len(a), len(b))
    return _pad(a, rank), _pad(b, rank)


def _as_linear(value: object) -> Optional[Linear]:
    if isinstance(value, Linear):
        return value
    value = example_value(value) if isinstance(value, Node) else value
    return Linear((), value) if is_scalar(value) else None


def _combine(a: Linear, b: Linear, sign: int) -> Linear:
    ca, cb = _align(a.coef, b.coef)
    return Linear(tuple(x + sign * y for x, y in zip(ca, cb)), a.const + sign * b.const)


def _insert_dim(p: object, dim: int) -> object:
    if isinstance(p, Linear):
        coef = list(p.coef)
        coef.insert(dim, 0)
        return Linear(tuple(coef), p.const)
    if isinstance(p, Inequality):
        coef = list(p.coef)
        coef.insert(dim, 0)
        return Inequality(tuple(coef), p.const)
    return Logic(p.op, tuple(_insert_dim(t, dim) for t in p.terms))


def _rank(p: object) -> int:
    if isinstance(p, (Linear, Inequality)):
        return len(p.coef)
    return max((_rank(t) for t in p.terms), default=0)


TRUE = Logic("and", ())


_COMPARISONS = {
    "le": (operator.le, torch.le, "le"), "lt": (operator.lt, torch.lt, "lt"),
    "ge": (operator.ge, torch.ge, "ge"), "gt": (operator.gt, torch.gt, "gt"),
}


def _compare(kind: str, a: Linear, b: Linear) -> Optional[Inequality]:
    """``a <= b`` (or ``<``, ``>=``, ``>``) as ``coef . index + const <= 0`` with an integer constant."""
    if kind in ("ge", "gt"):
        a, b, kind = b, a, "le" if kind == "ge" else "lt"
    diff = _combine(a, b, -1)
    const = diff.const
    if isinstance(const, float):  # the index part is an integer: x + c <= 0 iff x <= floor(-c)
        if not math.isfinite(const):
            return None
        const = -math.floor(-const) if kind == "le" else 1 - math.ceil(-const)
        return Inequality(diff.coef, const)
    if not isinstance(const, (int, torch.SymInt)):
        return None
    return Inequality(diff.coef, const + (1 if kind == "lt" else 0))


def _is_int64(node: Node) -> bool:
    """An int64 tensor: a product of positions in it is exact (int32 or float products could wrap or round)."""
    meta = tensor_meta(node)
    return meta is not None and meta.dtype == torch.int64


def _scaled(a: Linear, factor: Linear) -> Optional[Linear]:
    """``a * n`` for an integer ``n`` (a ``Linear`` over no index)."""
    n = factor.const
    if any(factor.coef) or not isinstance(n, int) or isinstance(n, bool):
        return None
    return Linear(tuple(c * n for c in a.coef), a.const * n)


def _equal(a: Linear, b: Linear) -> Optional[Predicate]:
    """``a == b`` over integer positions: ``a <= b`` and ``a >= b``."""
    terms = (_compare("le", a, b), _compare("ge", a, b))
    return Logic("and", terms) if all(t is not None for t in terms) else None


def constant_truth(p: object) -> Optional[bool]:
    """True or False where predicate ``p`` reads no index (every coefficient 0) and its constants are numbers."""
    if isinstance(p, Inequality):
        return bool(p.const <= 0) if not any(p.coef) and isinstance(p.const, (int, float)) else None
    if not isinstance(p, Logic):
        return None
    truths = [constant_truth(t) for t in p.terms]
    if any(t is None for t in truths):
        return None
    return all(truths) if p.op == "and" else any(truths)


IndexRule = Callable[[Node, Callable[[object], Optional[object]]], Optional[object]]
_POSITION_RULES: list[IndexRule] = []


def index_rule(fn: IndexRule) -> IndexRule:
    """Register ``fn(node, interpret_input)`` as one more way to read a node as positions or a predicate
    (``patterns.position_ids`` registers gathers, slices, ``diff`` and ``cumsum`` of positions)."""
    _POSITION_RULES.append(fn)
    return fn


def interpret(node: object, depth: int = 24) -> Optional[object]:
    """``node`` as a ``Linear`` index tensor or a ``Predicate``, or None if it is neither."""
    if not isinstance(node, Node):
        return _as_linear(node)
    if depth == 0 or is_written(node):
        return None
    cache = node.meta.setdefault("attnfuse_index", {})
    if "value" not in cache:
        cache["value"] = _interpret(node, depth)
    return cache["value"]


def _interpret(node: Node, depth: int) -> Optional[object]:
    if node.op not in ("call_function", "call_method"):
        return _as_linear(node)
    sub = lambda x: interpret(x, depth - 1)  # noqa: E731
    if is_call(node, (torch.arange,)):
        args = arange_arguments(node)
        step, start = example_value(args["step"]), example_value(args["start"])
        if not (isinstance(step, int) and isinstance(start, (int, torch.SymInt)) and exact_positions(node)):
            return None
        return Linear((int(step),), start)
    for kind, sign in (("add", 1), ("sub", -1)):
        if is_call(node, (getattr(operator, kind), getattr(torch, kind)), (kind,)) and len(node.args) == 2:
            a, b = _as_linear(sub(node.args[0])), _as_linear(sub(node.args[1]))
            return _combine(a, b, sign) if a and b else None
    if is_call(node, (operator.mul, torch.mul), ("mul",)) and len(node.args) == 2 and _is_int64(node):
        a, b = (_as_linear(sub(x)) for x in node.args)
        return _scaled(a, b) or _scaled(b, a) if a and b else None
    for kind, spellings in _COMPARISONS.items():
        if is_call(node, spellings[:2], (spellings[2],)) and len(node.args) == 2:
            a, b = _as_linear(sub(node.args[0])), _as_linear(sub(node.args[1]))
            return _compare(kind, a, b) if a and b else None
    if is_call(node, (operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "bitwise_and", "__and__")):
        terms = [sub(a) for a in node.args[:2]]
        return Logic("and", tuple(terms)) if all(isinstance(t, (Inequality, Logic)) for t in terms) else None
    if is_call(node, (operator.or_, torch.logical_or, torch.bitwise_or), ("logical_or", "bitwise_or", "__or__")):
        terms = [sub(a) for a in node.args[:2]]
        return Logic("or", tuple(terms)) if all(isinstance(t, (Inequality, Logic)) for t in terms) else None
    if is_call(node, (operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not")):
        inner = sub(node.args[0])
        return inner.negate() if isinstance(inner, (Inequality, Logic)) else None
    if is_call(node, (torch.unsqueeze,), ("unsqueeze",)):
        inner, dim = sub(node.args[0]), node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if inner is None or not isinstance(dim, int):
            return None
        return _insert_dim(inner, dim % (_rank(inner) + 1))
    indexed = new_axes_index(node)
    if indexed is not None:
        inner = sub(node.args[0])
        if inner is None:
            return None
        for position, item in enumerate(indexed[1]):
            if item is None:
                inner = _insert_dim(inner, position)
        return inner
    for kind, negated in (("eq", False), ("ne", True)):
        if is_call(node, (getattr(operator, kind), getattr(torch, kind)), (kind,)) and len(node.args) == 2:
            a, b = _as_linear(sub(node.args[0])), _as_linear(sub(node.args[1]))
            equal = _equal(a, b) if a and b else None
            return equal.negate() if equal is not None and negated else equal
    if is_all_true(node):
        return TRUE
    for rule in _POSITION_RULES:
        found = rule(node, sub)
        if found is not None:
            return found
    triangle = _triangle_of_predicate(node, sub)
    if triangle is not None:
        return triangle
    if is_call(node, (), ("expand",)):
        return _expanded(sub(node.args[0]), tensor_meta(node.args[0]))
    if is_call(node, (), ("contiguous", "to", "bool", "long", "int")):
        inner = sub(node.args[0])
        return inner if _cast_keeps(inner, node) else None
    return None


def triangle_arguments(node: Node) -> Optional[tuple[str, object, object]]:
    """``("tril" | "triu", diagonal, source)`` for any spelling of a triangle op (``torch.tril``, ``x.triu_``)."""
    for name in ("triu", "tril"):
        if is_call(node, (getattr(torch, name),), (name, name + "_")):
            args = bind(node, ("x", "diagonal"), diagonal=0)
            return name, example_value(args["diagonal"]), args["x"]
    return None


def triangle_kept(name: str, diagonal: object, rank: int) -> Optional[Inequality]:
    """Where ``tril(x, diagonal)`` (or ``triu``) keeps ``x``'s values, over the last two of ``rank`` axes:
    ``j - i <= diagonal`` for ``tril``, ``j - i >= diagonal`` for ``triu``."""
    if rank < 2 or not isinstance(diagonal, (int, torch.SymInt)) or isinstance(diagonal, bool):
        return None
    if name == "tril":
        return Inequality(_pad((-1, 1), rank), -diagonal)
    return Inequality(_pad((1, -1), rank), diagonal)


def _triangle_of_predicate(node: Node, sub) -> Optional[Predicate]:
    """``tril`` / ``triu`` of a boolean predicate: the predicate and the triangle's inequality."""
    triangle = triangle_arguments(node)
    meta = tensor_meta(node)
    if triangle is None or meta is None or meta.dtype != torch.bool:
        return None
    name, diagonal, source = triangle
    inner, kept = sub(source), triangle_kept(name, diagonal, meta.dim())
    if not isinstance(inner, (Inequality, Logic)) or kept is None:
        return None
    return kept if inner == TRUE else Logic("and", (inner, kept))


def _cast_keeps(inner: object, node: Node) -> bool:
    """A cast that keeps the value: predicates to bool, positions to a dtype that holds them exactly."""
    out = tensor_meta(node)
    if out is None or inner is None:
        return False
    if isinstance(inner, (Inequality, Logic)):
        return out.dtype == torch.bool
    return out.dtype in (torch.int64, torch.int32, torch.float64)


def _expanded(inner: object, source: Optional[torch.Tensor]) -> object:
    """An ``expand`` repeats size-1 dims: their index no longer varies, so their coefficient is dropped."""
    if inner is None or source is None:
        return None
    if isinstance(inner, Linear):
        return Linear(tuple(0 if _is_one(size) else c for c, size in zip(_pad(inner.coef, source.dim()), source.shape)),
                      inner.const)
    return _relevant(inner, tuple(source.shape))


def _relevant(p: Predicate, shape: tuple) -> Predicate:
    """Drop coefficients along size-1 dims (their index is always 0) and align to ``shape``."""
    if isinstance(p, Logic):
        return Logic(p.op, tuple(_relevant(t, shape) for t in p.terms))
    coef = _pad(p.coef, len(shape))
    return Inequality(tuple(c if not _is_one(s) else 0 for c, s in zip(coef, shape)), p.const)


def _is_one(size: object) -> bool:
    return isinstance(size, int) and size == 1


def keep_inequalities(node: Node, negated: bool) -> Optional[list[tuple[int, int, object]]]:
    """The keep-mask at ``node`` (negated if asked) as a conjunction of ``a*i + b*j + c <= 0``.

    ``i`` and ``j`` are the last two axes (query, key); returns None for anything else.
    """
    predicate = interpret(node)
    meta = tensor_meta(node)
    if not isinstance(predicate, (Inequality, Logic)) or meta is None or meta.dim() < 1:
        return None
    return query_key_inequalities(predicate.negate() if negated else predicate, tuple(meta.shape))


def query_key_inequalities(predicate: Predicate, shape: tuple) -> Optional[list[tuple[int, int, object]]]:
    """``predicate`` over a tensor of ``shape`` (broadcast against the scores) as a conjunction of
    ``a*i + b*j + c <= 0`` over its last two axes, or None if it is not one or varies along another axis."""
    predicate = _relevant(predicate, shape)
    terms = [predicate] if isinstance(predicate, Inequality) else list(predicate.terms)
    if isinstance(predicate, Logic) and predicate.op != "and":
        return None
    result = []
    while terms:
        term = terms.pop()
        if isinstance(term, Logic):
            if term.op != "and":
                return None
            terms.extend(term.terms)
            continue
        coef = _pad(term.coef, 2)
        if any(c != 0 for c in coef[:-2]):
            return None
        result.append((coef[-2], coef[-1], term.const))
    return result


_AND = ((operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "bitwise_and", "__and__"))
_OR = ((operator.or_, torch.logical_or, torch.bitwise_or), ("logical_or", "bitwise_or", "__or__"))
_NOT = ((operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not", "__invert__"))


_VALUE_TESTS = ((operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
                 torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne),
                ("lt", "le", "gt", "ge", "eq", "ne", "to", "bool"))


def _selected_condition(node: Node) -> Optional[tuple[Node, bool]]:
    """``(c, same)`` where the boolean ``node`` tests ``where(c, a, b)`` for numbers ``a``, ``b`` that the test tells
    apart, so ``node`` is ``c`` (``same``) or ``~c``: a cast to bool (MPT's ``where(keep, 0, min).to(torch.bool)``)
    or a comparison with a number (Falcon's ``where(keep, 0, min) < -1``). The test is run on ``a`` and ``b`` as
    the ``where`` stores them, so it decides as it does in the model."""
    meta = tensor_meta(node)
    if meta is None or meta.dtype != torch.bool or not is_call(node, *_VALUE_TESTS) or node.kwargs:
        return None
    selects = [a for a in node.args if isinstance(a, Node)]
    numbers = [a for a in node.args if not isinstance(a, Node)]
    if len(selects) != 1 or not all(_number(x) is not None or isinstance(x, torch.dtype) for x in numbers):
        return None
    source = selects[0]
    if is_written(source) or not is_call(source, (torch.where,), ("where",)) or len(source.args) != 3 or \
            source.kwargs:
        return None
    condition, a, b = source.args
    values = [_number(a), _number(b)]
    condition_meta, source_meta = tensor_meta(condition), tensor_meta(source)
    if condition_meta is None or condition_meta.dtype != torch.bool or None in values or source_meta is None:
        return None
    stored = torch.tensor(values, dtype=torch.float64).to(source_meta.dtype)
    args = tuple(stored if x is source else x for x in node.args)
    tested = getattr(stored, node.target)(*args[1:]) if node.op == "call_method" else node.target(*args)
    if not isinstance(tested, torch.Tensor) or tested.dtype != torch.bool or bool(tested[0]) == bool(tested[1]):
        return None
    return condition, bool(tested[0])


def _number(value: object) -> Optional[float]:
    """A Python number, or a 0-d tensor built from one (``torch.zeros(())``, ``torch.tensor(0.0)``), else None."""
    if is_scalar(value):
        return None if isinstance(value, (torch.SymInt, torch.SymFloat)) else float(value)
    if isinstance(value, Node) and not is_written(value) and tensor_meta(value) is not None \
            and tensor_meta(value).dim() == 0:
        if is_call(value, (torch.zeros,)):
            return 0.0
        if is_call(value, (torch.tensor,)) and is_scalar(value.args[0] if value.args else None):
            return float(value.args[0])
    return None


def keep_terms(node: object, negated: bool, depth: int = 24) -> Optional[tuple[Predicate, tuple[tuple[Node, bool], ...]]]:
    """The keep-mask at ``node`` (negated if asked) as an index predicate ANDed with boolean tensors it does not
    read as positions: ``(kv <= q) & (kv > q - w) & padding[b, kv]`` is ``(j <= i and j > i - w, ((gathered, False),))``.

    Each tensor comes with its polarity (True: it keeps where it is False). ``&`` of keep-masks and ``|`` of drop
    masks are split, ``~``, boolean casts and ``expand`` (which only broadcasts) looked through. None where a
    part is not boolean or is written in place.
    """
    predicate = interpret(node)
    if isinstance(predicate, (Inequality, Logic)):
        return (predicate.negate() if negated else predicate), ()
    meta = tensor_meta(node)
    if not isinstance(node, Node) or depth == 0 or is_written(node) or meta is None or meta.dtype != torch.bool:
        return None
    if is_call(node, *(_OR if negated else _AND)) and len(node.args) == 2 and not node.kwargs:
        parts = [keep_terms(a, negated, depth - 1) for a in node.args]
        if any(p is None for p in parts):
            return None
        return Logic("and", (parts[0][0], parts[1][0])), parts[0][1] + parts[1][1]
    source = node.args[0] if node.args else None
    source_meta = tensor_meta(source)
    selected = _selected_condition(node)
    if selected is not None:  # ``where(c, 0, fill).bool()`` is True exactly where ``c`` is not
        condition, same = selected
        return keep_terms(condition, negated if same else not negated, depth - 1)
    if source_meta is not None and source_meta.dtype == torch.bool:
        if is_call(node, *_NOT):
            return keep_terms(source, not negated, depth - 1)
        if is_call(node, (), ("to", "bool", "contiguous")):
            return keep_terms(source, negated, depth - 1)
        if is_call(node, (), ("expand",)):
            found = keep_terms(source, negated, depth - 1)
            return None if found is None else (_expanded(found[0], source_meta), found[1])
    if _keeps_everything(node, negated):  # a padding mask built inside the model when none was given
        return TRUE, ()
    return TRUE, ((node, negated),)


def _keeps_everything(node: Node, negated: bool) -> bool:
    """A constant boolean tensor of the graph that keeps every position (all True; all False when ``negated``)."""
    value = constant_value(node)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        return False
    return not bool(value.any()) if negated else bool(value.all())

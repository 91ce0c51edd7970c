"""FX plumbing shared by the passes and the rule families: reading a node's call, arguments and recorded
value, whether it writes in place or has a side effect, removing dead nodes, comparing symbolic sizes."""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Hashable, Iterable, Optional

import torch
from torch.fx import Node

WRITTEN = "attnfuse_written"  # node.meta key set by ``attnfuse.effects``: positions of writes to its storage


def is_written(node: Any) -> bool:
    """Whether some op writes ``node``'s storage in place in its graph, so its construction is not its value."""
    return isinstance(node, Node) and bool(node.meta.get(WRITTEN))


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
    """The number of dimensions of ``node``'s example tensor, or None if it produces no tensor."""
    meta = tensor_meta(node)
    return meta.dim() if meta is not None else None


def is_scalar(value: Any) -> bool:
    """A Python number (or symbolic number) rather than a tensor or graph node."""
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)



# Python's in-place operators, with the out-of-place operator each one updates its operand with.
INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                     operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                     operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                     operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
                     operator.irshift: operator.rshift, operator.imatmul: operator.matmul}


def target_name(node: Node) -> str:
    """The name of what ``node`` calls (a method name, a function's ``__name__``, an aten op's name)."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def writes_in_place(node: Node) -> bool:
    """Whether ``node`` writes a tensor in place: an in-place method or operator, ``setitem``, ``out=``,
    ``inplace=True``, a mutable aten op. ``operator.and_`` and friends are not in place."""
    if node.op not in ("call_function", "call_method"):
        return False
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.target in INPLACE_OPERATORS or node.target is operator.setitem:
        return True
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False
    name = target_name(node)
    return name.endswith("_") and not name.endswith("__")


def _changes_functorch_state(node: Node) -> bool:
    """``torch.vmap`` / ``torch.func`` level bookkeeping Dynamo inlines (``_vmap_increment_nesting`` ...)."""
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and module.startswith(("torch._functorch", "torch._C._functorch"))


def has_side_effect(node: Node) -> bool:
    """Whether removing ``node`` could change the program even if nothing reads its result."""
    if node.op in ("placeholder", "output", "get_attr") or node.is_impure():
        return True
    return _changes_functorch_state(node) or writes_in_place(node)


def remove_dead_nodes(nodes: Iterable[Node]) -> None:
    """Erase each of ``nodes`` that nothing reads and that has no side effect, then their dead inputs."""
    pending = list(nodes)
    while pending:
        current = pending.pop()
        if getattr(current, "_erased", False) or current.users or has_side_effect(current):
            continue
        inputs = list(current.all_input_nodes)
        current.graph.erase_node(current)
        pending.extend(inputs)


def statically_true(condition: Callable[[], Any]) -> bool:
    """Whether ``condition()`` over sizes (ints or SymInts) holds for every shape the graph serves."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(condition()))
    except Exception:
        return False


def constant_size(size: Any) -> Optional[int]:
    """``size`` as an int where it is the same number for every shape the graph serves (an int, or a SymInt whose
    expression holds no symbol), else None."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(size) if isinstance(size, int) or (isinstance(size, torch.SymInt) and is_concrete_int(size)) else None


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes (ints, SymInts or the graph nodes computing them) are provably equal."""
    a, b = example_value(a), example_value(b)
    return statically_true(lambda: a == b)


_LIKE = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like)
_NEW = ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")


def reads_only_metadata(user: Node, node: Node) -> bool:
    """Whether ``user`` reads only the dtype, device or shape of ``node`` (``y.type_as(node)``,
    ``m.expand_as(node)``, ``node.new_zeros(...)``, ``torch.zeros_like(node)``, ``node.size()``)."""
    if is_call(user, (), ("type_as", "expand_as", "view_as", "reshape_as")) and len(user.args) == 2 \
            and user.args[1] is node and user.args[0] is not node:
        return True
    if (is_call(user, _LIKE, _NEW)) and user.args and user.args[0] is node and \
            all(a is not node for a in list(user.args[1:]) + list(user.kwargs.values())):
        return True
    if is_call(user, (torch.Tensor.size,), ("size", "dim")) or (
            user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "dtype", "device", "ndim")):
        return True
    return False


def value_users(node: Node) -> list[Node]:
    """The users of ``node`` that read its values."""
    return [user for user in node.users if not reads_only_metadata(user, node)]


_MISSING = object()


def memoized(node: Node, table: str, key: Optional[Hashable], compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered in ``node``'s meta under ``table`` and ``key`` (a graph's nodes are its own, so
    the memo lives and dies with the graph); computed every time where ``key`` is None."""
    if key is None:
        return compute()
    memo = node.meta.setdefault(table, {})
    found = memo.get(key, _MISSING)
    if found is _MISSING:
        found = memo[key] = compute()
    return found


# What Dynamo records on a graph module about where its inputs came from: read by nothing here, never written
_DYNAMO_RECORDS = ("_param_name_to_source", "_source_to_user_stacks", "shape_env")


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``copy.deepcopy(gm)``, sharing Dynamo's records of its inputs' sources instead of copying them."""
    shared = {id(value): value for name, value in gm.__dict__.items() if name in _DYNAMO_RECORDS}
    return copy.deepcopy(gm, shared)

"""Effects: read a captured graph as the functional program it is.

Dynamo graphs keep the user's in-place writes (``m.tril_()``, ``b[:, :2] = -1e9``, ``s.masked_fill_(...)``,
``x += y``) and read the written tensor through its old node afterwards, so a rule that evaluates or
reads a node's construction would see the value before the write. Two passes make that impossible:

* ``functionalize``: a write to a tensor created inside the graph, after which no other alias of it is
  read, becomes a functional op (and a cast back where the op would promote), and every later reader
  reads the new node (exact: same values, same dtype).
* ``mark_writes``: every write that remains (to a graph input, to a view, through an unknown op) marks
  all nodes sharing the written storage (aliasing read from Dynamo's fake tensors), so constant
  folding and the mask readers refuse them and the matcher can tell whether a site's inputs change
  between the QK product and the value product.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
from torch.fx import Graph, Node

from attnfuse.fx_utils import INPLACE_OPERATORS, WRITTEN, example_value, is_written, target_name, writes_in_place
from attnfuse.vocabulary import inplace_on_copy

def written_operand(node: Node) -> Optional[Node]:
    """The tensor node that ``node`` writes in place (in-place method or operator, ``setitem``,
    ``out=``, ``inplace=True``, a mutable aten op), or None."""
    if not writes_in_place(node):
        return None
    target = node.kwargs["out"] if "out" in node.kwargs else (node.args[0] if node.args else None)
    return target if isinstance(target, Node) else None


def storage(node: Any) -> Optional[int]:
    """The identity of the storage ``node``'s tensor lives in (views share their base's), or None.

    Read from the example (fake) tensors Dynamo recorded, which alias exactly as the real ones do;
    they live as long as the graph, so the address identifies the storage.
    """
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def fake_result(target: Any, op: str, args: tuple, kwargs: dict) -> Any:
    """Run ``target`` on the example (fake) values of ``args`` to get the new node's example value."""
    from torch.fx.node import map_arg

    values = map_arg((args, kwargs), example_value)
    fake_mode = next((v.fake_mode for v in values[0] if isinstance(v, torch._subclasses.FakeTensor)), None)
    if fake_mode is None:
        return None
    with fake_mode:
        if op == "call_method":
            return getattr(values[0][0], target)(*values[0][1:], **values[1])
        return target(*values[0], **values[1])


def _functional_call(write: Node) -> Optional[tuple[str, Any, tuple, dict, Optional[torch.dtype]]]:
    """``(op, target, args, kwargs, cast)`` computing what ``write`` leaves in its operand, without
    writing; ``cast`` is the operand's dtype where the functional op's result would be wider."""
    operand = write.args[0]
    if isinstance(write.target, torch._ops.OpOverload):
        return None
    if write.target is operator.setitem:
        return "call_function", inplace_on_copy, ("__setitem__", *write.args), {}, None
    if "out" in write.kwargs or write.kwargs.get("inplace") is True:
        return None
    name = target_name(write)
    functional: Optional[tuple[str, Any]] = None
    if write.target in INPLACE_OPERATORS:
        functional = ("call_function", INPLACE_OPERATORS[write.target])
    elif write.op == "call_method" and callable(getattr(torch.Tensor, name[:-1], None)):
        functional = ("call_method", name[:-1])
    elif write.op == "call_function" and callable(getattr(torch.Tensor, name[:-1], None)) and \
            getattr(torch.Tensor, name, None) is write.target:
        functional = ("call_function", getattr(torch.Tensor, name[:-1]))
    if functional is not None:
        try:
            result = fake_result(functional[1], functional[0], write.args, dict(write.kwargs))
        except Exception:
            result = None
        before = example_value(operand)
        if isinstance(result, torch.Tensor) and isinstance(before, torch.Tensor) and result.shape == before.shape:
            # an in-place op computes in the promoted dtype and rounds into the operand's: op, then a cast
            cast = None if result.dtype == before.dtype else before.dtype
            return functional[0], functional[1], write.args, dict(write.kwargs), cast
    if write.target in INPLACE_OPERATORS:  # ``x += y`` keeps x's dtype where ``x + y`` would promote
        name = f"__{name}__"
    if callable(getattr(torch.Tensor, name, None)):  # any in-place Tensor method, applied to a copy
        return "call_function", inplace_on_copy, (name, *write.args), dict(write.kwargs), None
    return None


def _alias_group(graph: Graph, node: Node) -> list[Node]:
    key = storage(node)
    return [] if key is None else [n for n in graph.nodes if key == storage(n)]


def _same_tensor(operand: Node, group: list[Node]) -> set[Node]:
    """``operand`` and the nodes that are it after in-place ops (``x.add_(y)`` returns ``x``)."""
    same = {operand}
    for node in group:
        if node.target is not operator.setitem and written_operand(node) in same:
            same.add(node)
    return same


def _functionalizable(graph: Graph, write: Node) -> bool:
    """A write after which no alias taken before it is read or written: replacing it is exact.

    The storage must be created in this graph (not a graph input or a view of one); other aliases
    (the ``bmm`` a ``view`` was taken of) may exist, but after the write only the written tensor and
    views taken from it later may be used, and those all read the new node once re-pointed.
    """
    operand = written_operand(write)
    group = _alias_group(graph, operand) if operand is not None else []
    if not group:
        return False
    root = group[0]  # the node that created the storage (a graph input's views share its storage)
    if root.op not in ("call_function", "call_method") or written_operand(root) is not None:
        return False
    same = _same_tensor(operand, group)
    order = {node: i for i, node in enumerate(graph.nodes)}
    rebuilt = set(same)  # tensors that read the new value once later readers are re-pointed
    for node in sorted(group, key=order.__getitem__):
        if node in same or order[node] < order[write]:
            continue
        if not all(source in rebuilt for source in node.all_input_nodes if source in group):
            return False  # an alias taken after the write from an alias that keeps the old value
        rebuilt.add(node)
    stale = set(group) - rebuilt
    after = [node for node in graph.nodes if order[node] > order[write]]
    return not any(written_operand(node) in stale or any(source in stale for source in node.all_input_nodes)
                   for node in after)


def _insert_after(graph: Graph, before: Node, op: str, target: Any, args: tuple, kwargs: dict) -> Node:
    """A new node right after ``before``, with its example value and ``before``'s source location."""
    with graph.inserting_after(before):
        new = graph.create_node(op, target, args, kwargs)
    new.meta.update({k: v for k, v in before.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")})
    try:
        new.meta["example_value"] = fake_result(target, op, args, kwargs)
    except Exception:
        new.meta["example_value"] = None
    return new


def _replace_write(graph: Graph, write: Node, order: dict[Node, int]) -> None:
    operand = written_operand(write)
    same = _same_tensor(operand, _alias_group(graph, operand))
    op, target, args, kwargs, cast = _functional_call(write)
    new = _insert_after(graph, write, op, target, args, kwargs)
    if cast is not None:
        new = _insert_after(graph, new, "call_method", "to", (new, cast), {})
    position = order[write]
    for member in same:
        for user in list(member.users):
            if user is not new and user is not write and order.get(user, -1) > position:
                user.replace_input_with(member, new)
    write.replace_all_uses_with(new)
    graph.erase_node(write)


def functionalize(graph: Graph) -> int:
    """Rewrite every replaceable in-place write into its functional form; returns how many were rewritten."""
    rewritten = 0
    # One pass in program order: replacing a write re-points only the readers after it, so a later write
    # is judged on the graph as it will run.
    for write in [n for n in graph.nodes if written_operand(n) is not None]:
        if _assigns_itself(write):
            graph.erase_node(write)
            rewritten += 1
        elif _functional_call(write) is not None and _functionalizable(graph, write):
            _replace_write(graph, write, {node: i for i, node in enumerate(graph.nodes)})
            rewritten += 1
        elif _functional_call(write) is not None and _view_functionalizable(graph, write):
            _replace_view_write(graph, write, {node: i for i, node in enumerate(graph.nodes)})
            rewritten += 1
    return rewritten


# ----------------------------------------------------------------------------- writes through a slice

def _is_basic_index(index: Any) -> bool:
    """An index of slices, ints, ``None`` and ``...`` (what gives a view), with no tensor in it."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, (int, slice, Node)) and not (
        isinstance(item, Node) and isinstance(example_value(item), torch.Tensor)) for item in items)


def _slice_of(node: Any) -> Optional[tuple[Node, Any]]:
    """``(base, index)`` when ``node`` is ``base[index]`` with a basic index, else None."""
    if isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], Node) and _is_basic_index(node.args[1]):
        return node.args[0], node.args[1]
    return None


def _assigns_itself(write: Node) -> bool:
    """``x[i] = x[i]`` with the very view ``x[i]`` (what Python runs after ``x[i] += y``): writes nothing."""
    if write.target is not operator.setitem or len(write.args) != 3 or write.users:
        return False
    base, index, value = write.args
    found = _slice_of(value)
    return found is not None and found[0] is base and found[1] == index and _is_basic_index(index)


def _view_functionalizable(graph: Graph, write: Node) -> bool:
    """A write into ``base[index]`` of a tensor created in this graph, after which only ``base`` and that view
    (and aliases taken later from them) are read: ``base`` then holds ``setitem(base, index, op(view))``."""
    operand = written_operand(write)
    found = _slice_of(operand)
    group = _alias_group(graph, operand) if found is not None else []
    if not group:
        return False
    base = found[0]
    root = group[0]
    if root.op not in ("call_function", "call_method") or written_operand(root) is not None or \
            base not in _same_tensor(root, group):
        return False
    order = {node: i for i, node in enumerate(graph.nodes)}
    rebuilt = _same_tensor(operand, group) | _same_tensor(base, group)
    for node in sorted(group, key=order.__getitem__):
        if node in rebuilt or order[node] < order[write]:
            continue
        if not all(source in rebuilt for source in node.all_input_nodes if source in group):
            return False
        rebuilt.add(node)
    stale = set(group) - rebuilt
    after = [node for node in graph.nodes if order[node] > order[write]]
    return not any(written_operand(node) in stale or any(source in stale for source in node.all_input_nodes)
                   for node in after)


def _replace_view_write(graph: Graph, write: Node, order: dict[Node, int]) -> None:
    """``op_(base[index])`` becomes ``base' = setitem_on_copy(base, index, op(base[index]))``; later readers of
    ``base`` read ``base'``, later readers of the view read ``base'[index]``."""
    operand = written_operand(write)
    base, index = _slice_of(operand)
    group = _alias_group(graph, operand)
    same_view, same_base = _same_tensor(operand, group), _same_tensor(base, group)
    op, target, args, kwargs, cast = _functional_call(write)
    value = _insert_after(graph, write, op, target, args, kwargs)
    if cast is not None:
        value = _insert_after(graph, value, "call_method", "to", (value, cast), {})
    new_base = _insert_after(graph, value, "call_function", inplace_on_copy, ("__setitem__", base, index, value), {})
    new_view = _insert_after(graph, new_base, "call_function", operator.getitem, (new_base, index), {})
    position = order[write]
    for members, new in ((same_base, new_base), (same_view, new_view)):
        for member in members:
            for user in list(member.users):
                if user not in (write, value, new_base, new_view) and order.get(user, -1) > position:
                    user.replace_input_with(member, new)
    write.replace_all_uses_with(new_view)
    graph.erase_node(write)


def mark_writes(graph: Graph) -> None:
    """Record on every node the graph positions of writes to its storage (``WRITTEN`` in its meta)."""
    writes: dict[int, list[int]] = {}
    nodes = list(graph.nodes)
    for position, node in enumerate(nodes):
        node.meta.pop(WRITTEN, None)
        operand = written_operand(node)
        key = storage(operand) if operand is not None else None
        if key is not None:
            writes.setdefault(key, []).append(position)
    for position, node in enumerate(nodes):
        node.meta["attnfuse_position"] = position
        key = storage(node)
        if key is not None and key in writes:
            node.meta[WRITTEN] = tuple(writes[key])


def position(node: Node) -> int:
    return node.meta.get("attnfuse_position", -1)


def written_between(nodes: Iterable[Node], first: Node, last: Node) -> Optional[Node]:
    """One of ``nodes`` whose storage is written after ``first`` and before ``last`` (graph order), or None."""
    start, end = position(first), position(last)
    for node in nodes:
        if isinstance(node, Node) and any(start < w < end for w in node.meta.get(WRITTEN, ())):
            return node
    return None


def written_or_returned(node: Node) -> bool:
    """Whether ``node``'s value may be written in place after it is computed: some op of the graph writes
    its storage, or the graph returns it or a view of it (the caller may write it)."""
    key = storage(node)
    if key is None or is_written(node):
        return True
    returned = next(n for n in reversed(node.graph.nodes) if n.op == "output")
    return any(key == storage(n) for n in returned.all_input_nodes)

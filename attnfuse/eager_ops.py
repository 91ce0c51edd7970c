"""Dynamo graph ops whose eager run keeps memory until Python's cycle collector runs, and equivalents that free it.

A custom ``torch.autograd.Function`` in a model (Bloom's GELU in training mode) reaches the graph as the
``autograd_function_apply`` higher-order op. Run eagerly, that op defines a new ``Function`` class on every
call and keeps the tensors saved for backward in a closure of that class; a class is always part of a
reference cycle, so those tensors, and through their autograd history every activation of the step, live
until a full garbage collection. Inductor traces the op away; attnfuse's eager route runs it, so the eager
route swaps it for ``apply_graph_pair``: one ``Function`` defined once, the saved tensors held by the
autograd node like the original ``Function`` held them (``ctx.save_for_backward``; other saved values on
``ctx``), freed by reference counting when the step's graph is.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

try:  # the op's Python object (torch 2.11 and 2.13); absent elsewhere, and then nothing is swapped
    from torch._functorch.autograd_function import autograd_function_apply
except ImportError:  # pragma: no cover
    autograd_function_apply = None

# the op's keyword arguments this module knows the meaning of; a call with any other is left as it is
KNOWN_OPTIONS = frozenset({"non_differentiable_idx", "saved_for_backward_idx", "dirty_idx"})
REQUIRED_OPTIONS = frozenset({"non_differentiable_idx", "saved_for_backward_idx"})


def _selected(output: Any, indices: tuple[int, ...]) -> list[Any]:
    """The outputs at ``indices`` (a single output is index 0)."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [x for i, x in enumerate(outputs) if i in indices]


def _without_history(value: Any, outputs: tuple) -> Any:
    """``value`` to keep on ``ctx``; one of the call's own outputs (torch 2.11's graphs save one that way) is kept
    detached, its storage and version counter shared, as the output would otherwise reach ``ctx`` through its own
    ``grad_fn`` (a reference cycle)."""
    if isinstance(value, torch.Tensor) and any(value is out for out in outputs):
        return value.detach()
    return value


class _GraphPair(torch.autograd.Function):
    """A forward graph returning ``(output, saved values)`` and a backward graph taking
    ``(*output grads, *saved values)``, as Dynamo split a custom ``Function`` into them."""

    @staticmethod
    def forward(ctx, fwd, bwd, saved_for_backward, non_differentiable, dirty, *args):
        output, saved = fwd(*args)
        saved = tuple(saved)
        ctx.bwd, ctx.arguments = bwd, len(args)
        # which saved values the original kept with ``save_for_backward`` (version-checked, no reference cycle
        # through an output) and which on ``ctx`` itself
        in_node = [i for i, value in enumerate(saved) if i in saved_for_backward and
                   (value is None or isinstance(value, torch.Tensor))]
        ctx.save_for_backward(*(saved[i] for i in in_node))
        ctx.layout = (len(saved), tuple(in_node))
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        ctx.on_ctx = {i: _without_history(value, outputs) for i, value in enumerate(saved) if i not in in_node}
        if dirty:
            ctx.mark_dirty(*_selected(output, dirty))
        if non_differentiable:
            ctx.mark_non_differentiable(*_selected(output, non_differentiable))
        return output

    @staticmethod
    def backward(ctx, *grads):
        count, in_node = ctx.layout
        from_node = dict(zip(in_node, ctx.saved_tensors))
        saved = [from_node[i] if i in from_node else ctx.on_ctx[i] for i in range(count)]
        result = ctx.bwd(*grads, *saved)
        result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        if len(result) != ctx.arguments:
            raise RuntimeError(f"attnfuse: a custom autograd.Function's backward graph gave {len(result)} gradients "
                               f"for {ctx.arguments} inputs")
        return (None, None, None, None, None, *result)


def apply_graph_pair(fwd: GraphModule, bwd: GraphModule, *args: Any, **options: Any) -> Any:
    """What ``autograd_function_apply(fwd, bwd, *args, **options)`` computes, forward and backward."""
    return _GraphPair.apply(fwd, bwd, frozenset(options["saved_for_backward_idx"]),
                            tuple(options["non_differentiable_idx"]), tuple(options.get("dirty_idx", ())), *args)


def free_saved_tensors_eagerly(gm: GraphModule) -> int:
    """Swap every ``autograd_function_apply`` call of ``gm`` whose options this module knows for
    ``apply_graph_pair``; the number swapped (``gm`` is recompiled where any was)."""
    if autograd_function_apply is None:
        return 0
    swapped = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is autograd_function_apply and \
                REQUIRED_OPTIONS <= set(node.kwargs) <= KNOWN_OPTIONS:
            node.target = apply_graph_pair
            swapped += 1
    if swapped:
        gm.recompile()
    return swapped

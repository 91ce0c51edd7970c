"""A rewritten site's backward, differentiable to any order like the unfused ops it replaces.

The fused kernels' own backward is the first derivative and is not itself differentiable (cuDNN's, flash's and
FlexAttention's have no derivative). A site with gradients therefore runs its kernel on its inputs passed through
one ``_HigherOrderGate``: in a first-order backward the gate hands the kernel's gradients through untouched (the
engine runs the kernel's own backward, no Python but the gate's pass-through); in a backward that is itself
differentiable (``create_graph=True``: gradient penalties, Hessian-vector products) it discards what the kernel's
backward gave and returns the gradients of a differentiable recompute of the site instead, taking the site output's
gradient from a hook on that output. The kernel's backward, whose result has no derivative, never reaches the inputs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from attnfuse.tracing import is_traced


class _Recompute:
    """What a ``create_graph`` backward of one site call needs: the differentiable recompute, whether the kernel drew
    dropout (which no recompute can draw again), and the site output's gradient, taken by a hook on the output."""

    __slots__ = ("recompute", "random", "gated", "grad_out")

    def __init__(self, recompute: Callable[..., torch.Tensor], random: bool, gated: tuple[int, ...]) -> None:
        self.recompute, self.random, self.gated = recompute, random, gated
        self.grad_out: Optional[torch.Tensor] = None

    def take_output_gradient(self, grad: Optional[torch.Tensor]) -> None:
        """The output's hook: keeps its gradient in a ``create_graph`` backward (grad mode on), the only one whose gate
        reads it; a first-order backward's is not kept, so an output the caller holds on to keeps no gradient alive."""
        if torch.is_grad_enabled():
            self.grad_out = grad


class _HigherOrderGate(torch.autograd.Function):
    """Passes the site's inputs that need gradients to the kernel as detached aliases; see the module docstring."""

    @staticmethod
    def forward(ctx, state: _Recompute, *tensors):
        ctx.state = state
        ctx.set_materialize_grads(False)  # an alias no gradient reached passes None on, not a tensor of zeros
        ctx.values = tuple(None if isinstance(t, torch.Tensor) else t for t in tensors)
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in tensors))
        return tuple(tensors[i].detach() for i in state.gated)

    @staticmethod
    def backward(ctx, *grads):
        state, result = ctx.state, [None] * len(ctx.values)
        if not torch.is_grad_enabled():  # first order: the kernel's own gradients
            for i, grad in zip(state.gated, grads):
                result[i] = grad
            return (None, *result)
        grad_out, state.grad_out = state.grad_out, None  # (a create_graph gradient would keep this graph alive)
        if grad_out is None:
            return (None, *result)
        if state.random:
            raise RuntimeError("attnfuse: a backward with create_graph=True needs this attention site's forward "
                               "again, but its dropout mask was drawn inside a fused kernel and cannot be drawn "
                               "again; run it with dropout off (model.eval()) or leave the model unoptimized for "
                               "this computation")
        tensors = [value if saved is None else saved for saved, value in zip(ctx.saved_tensors, ctx.values)]
        wanted = [i for i in state.gated if ctx.needs_input_grad[1 + i]]
        # one tensor in several places (self-attention's ``attn(x, x, x)``): its whole gradient goes to the first
        # place only, as the engine sums what every place returns
        wanted = [i for n, i in enumerate(wanted) if all(tensors[j] is not tensors[i] for j in wanted[:n])]
        out = state.recompute(*tensors)
        grads = torch.autograd.grad(out, [tensors[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return (None, *result)


def differentiable_twice(run: Callable[..., torch.Tensor], recompute: Callable[..., torch.Tensor], tensors: tuple,
                         fresh_output: bool = False, random: bool = False) -> torch.Tensor:
    """``run(*tensors)``, differentiable to any order like the unfused computation it replaces.

    The first backward is the fused kernel's own; a higher-order one (``create_graph=True``) is taken
    through ``recompute``, a differentiable version of ``run``. With ``fresh_output`` the result does
    not share memory with the kernel's saved output, so it may be written in place before backward.
    ``random`` (dropout inside the kernel): a higher-order backward raises, as it cannot be recomputed.
    """
    if not torch.is_grad_enabled():
        return run(*tensors)
    gated = tuple(i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and t.requires_grad)
    if not gated or is_traced(tensors[gated[0]]) or torch._C._are_functorch_transforms_active():
        return run(*tensors)
    state = _Recompute(recompute, random, gated)
    aliases = _HigherOrderGate.apply(state, *tensors)
    args = list(tensors)
    for i, alias in zip(gated, aliases):
        args[i] = alias
    out = run(*args)
    if fresh_output:
        out = out.clone()
    if out.requires_grad:
        out.register_hook(state.take_output_gradient)
    return out

"""``attnfuse.attend``: the fused attention op that every rewritten site calls.

It checks the arguments, builds one ``AttentionCall``, runs it on the first registered kernel that does
not refuse it (``attnfuse.kernels``), and writes the original's answer into rows every key of which is
masked.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Optional, Union

import torch

from attnfuse.context_parallel import attend_context_parallel, context_parallel_active
from attnfuse.kernels import AttentionCall, CallFacts, KernelFailed, kernels as registered_kernels
from attnfuse.kernels.registry import kernel_choices, validate_kernels
from attnfuse.kernels.rows import restore_rows, within_kernel_range
from attnfuse.precision import bias_dtype
from attnfuse.tracing import is_traced

if TYPE_CHECKING:
    from attnfuse.guards import RunTimeCausal

Causal = Optional[Union[bool, Literal["top_left", "bottom_right"]]]
FullyMaskedRows = Literal["zero", "mean", "nan"]


def _sdpa_conventions(mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      causal: Causal) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Causal]:
    """``(keep, bias, causal)`` read as an SDPA user means them: a bool ``mask`` keeps where True, a float
    one is added to the scores (with ``bias``); ``causal=True`` is SDPA's ``is_causal`` (top-left)."""
    causal = "top_left" if causal is True else None if causal is False else causal
    if mask is None or mask.dtype == torch.bool:
        return mask, bias, causal
    if not mask.is_floating_point():
        raise TypeError(f"attend: mask must be bool (True = attend) or floating point (added to the scores, as "
                        f"SDPA's attn_mask), got {mask.dtype}")
    return None, (mask if bias is None else bias + mask), causal


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Causal, fully_masked: str,
           window: Optional[int], kernels: Optional[Iterable[str]] = None) -> None:
    if q.dim() != 4:
        raise ValueError(f"attend: q must be (batch, heads, q_len, head_dim), got shape {tuple(q.shape)}")
    if k.dim() not in (3, 4) or v.dim() != k.dim():
        raise ValueError("attend: k and v must both be (batch, kv_heads, k_len, dim) or single-head (batch, k_len, dim)")
    if causal not in (None, "top_left", "bottom_right"):
        raise ValueError(f"attend: causal must be None, True ('top_left'), 'top_left' or 'bottom_right', got {causal!r}")
    if kernels is not None and not isinstance(kernels, str) and not kernels:
        raise ValueError(f"attend: kernels=[] allows no kernel; pass None or some of {sorted(kernel_choices())}")
    if fully_masked not in ("zero", "mean", "nan"):
        raise ValueError(f"attend: fully_masked_rows must be 'zero', 'mean' or 'nan', got {fully_masked!r}")
    if window is not None and causal is None:
        raise ValueError("attend: a sliding window needs causal='top_left' or 'bottom_right'")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    causal: Causal = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    bias_fn: Optional[Callable[[tuple], torch.Tensor]] = None,
    bias_fill: Optional[float] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    fully_masked_rows: FullyMaskedRows = "zero",
    kernels: Optional[Iterable[str]] = None,
    autotune: bool = False,
    on_kernel: Optional[Callable[[str], None]] = None,
    maybe_causal: Optional["RunTimeCausal"] = None,
) -> torch.Tensor:
    """Fused ``softmax(mods(scale * q k^T) + bias, masked) @ v`` on the fastest valid kernel.

    Args:
        q: ``(B, H, L, E)``. k, v: ``(B, Hk, S, E)`` / ``(B, Hk, S, Ev)`` with ``H % Hk == 0`` (grouped
            or multi-query heads are shared without copying), or single-head ``(B, S, E)``.
        mask: broadcastable to ``(B, H, L, S)``, e.g. ``(B, 1, 1, S)``, as SDPA's ``attn_mask``: boolean
            keep-mask (True = attend), or floating point, added to the scores (``-inf`` masks).
        bias: additive float bias broadcastable to ``(B, H, L, S)``. A bias wider than q (fp32 on bf16 q)
            is added in its own precision, as PyTorch's type promotion adds it (at most the kernels'
            internal fp32 for half-precision q): the call then runs on a kernel that can do so exactly.
        causal: ``"top_left"`` (or ``True``) keeps ``j <= i`` (SDPA's ``is_causal``); ``"bottom_right"`` keeps
            ``j <= i + S - L`` (the ``triu(j - i + 1)`` convention, right for KV caches).
        window: with ``causal``, keep only the last ``window`` keys up to the diagonal (sliding window).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before biases and masks (Gemma 2).
        bias_fn: an additive bias given as a function of broadcastable index tensors ``(b, h, i, j)``
            (ALiBi, relative positions); FlexAttention evaluates it per element, SDPA on a grid.
        bias_fill: a promise that ``bias`` (or a floating ``mask``) holds only 0 and this finite value, which
            absorbs every score (``s + fill == fill``: fp32's or bf16's ``finfo.min``, as transformers fills its
            masks); a call without gradients then reads nothing of the bias on the host (attnfuse's rewrite
            passes it where the graph proves it).
        scale: multiplies ``q k^T``; None means ``1 / sqrt(E)``.
        dropout_p: dropout on the probabilities; pass 0 in eval mode.
        fully_masked_rows: output of a query row whose keys are all masked: ``"zero"`` (SDPA's),
            ``"mean"`` (the mean of v, what a finite ``masked_fill`` gives) or ``"nan"`` (a ``-inf`` fill).
        kernels: restrict to these kernels (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``, ``"flex"``).
        autotune: time the valid SDPA kernels once per call signature and use the fastest.
        on_kernel: called with the name of the kernel that runs (used by the audit).
        maybe_causal: a per-call check of ``bias`` (or the boolean ``mask``) for the causal triangle
            (``attnfuse.guards.RunTimeCausal``, which attnfuse's rewrite passes where the site's one mask is a
            run-time input): on a call where it holds, the call runs causal without it.

    Cost beyond the kernel, per call (each fact is read from the values every call, ``attnfuse.memo``):
    a keep-mask is reduced over its keys to find rows without keys (a pass over the mask); where such
    rows exist they get the original's answer (a ``where`` over the output rows, or, under dropout
    with a finite fill, q zeroed in those rows so the kernel's own dropout applies). When the kernel
    adds its mask to the scores (any mask tensor; ``is_causal`` only on SDPA's math kernel), the output
    is checked for NaN/inf (one reduction over it) and, if a masked key's NaN or inf leaked in, the
    call is computed unfused as the original did; both flags are read in one host read. A key-padding
    call without gradients reads nothing: its masked k rows are zeroed instead (a pass over k). A bias
    tensor is reduced over its keys for rows that are ``-inf`` throughout (a pass over the bias, one
    host read), which the original gives as NaN. On the CPU a host read costs nothing; on CUDA it is
    a synchronization. A negative scale is folded into q (``-q``, a pass over q).

    Inside PyTorch's ``context_parallel`` the call runs on the SDPA kernels context parallel rings over
    the ranks; a call it cannot ring exactly (a mask or bias tensor, a score function, a softcap or
    window, CPU tensors) raises ``attnfuse.context_parallel.ContextParallelError`` (``attnfuse.context_parallel``).
    """
    keep, bias, causal = _sdpa_conventions(mask, bias, causal)
    _check(q, k, v, causal, fully_masked_rows, window, kernels)
    return checked_attend(q, k, v, keep, bias, causal, window, softcap, bias_fn, bias_fill, scale, dropout_p,
                          fully_masked_rows, validate_kernels(kernels), autotune, on_kernel, maybe_causal)


def checked_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], causal: Optional[str], window: Optional[int], softcap: Optional[float],
                   bias_fn: Optional[Callable[[tuple], torch.Tensor]], bias_fill: Optional[float],
                   scale: Optional[float], dropout_p: float, fully_masked_rows: str,
                   allowed: Optional[tuple[str, ...]], autotune: bool,
                   on_kernel: Optional[Callable[[str], None]],
                   maybe_causal: Optional["RunTimeCausal"] = None) -> torch.Tensor:
    """``attend`` on arguments already in its checked form (a boolean ``keep``, ``causal`` None or an alignment,
    validated kernels): what a rewritten site calls, whose plan guarantees that form, without the checks."""
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    B, H, L, E = q.shape  # read once: a shape query costs as much as a small Python call
    kb, Hk, S = k.shape[:3]
    if H % Hk:
        raise ValueError(f"attend: {H} query heads cannot share {Hk} kv heads evenly")
    if kb != B:
        k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
    if bias is not None:
        dtype = q.dtype
        if bias.dtype != dtype and bias.dtype != bias_dtype(dtype, bias.dtype):
            bias, bias_fill = bias.to(bias_dtype(dtype, bias.dtype)), None
    if causal == "bottom_right" and L == 1 and S >= 1 and (window is None or window >= S):
        causal, window = None, None  # ``_keeps_every_key``, inline: a decode step's triangle masks nothing
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    scale_value = E ** -0.5 if scale is None else scale
    facts = CallFacts()
    if bias is not None and bias_fill is not None and not needs_grad:
        bias, bias_fill = within_kernel_range(bias, bias_fill, facts)
    else:
        bias_fill = None
    call = AttentionCall(q, k, v, keep, bias, causal, window, softcap, bias_fn, scale, scale_value, dropout_p,
                         fully_masked_rows, needs_grad, allowed, autotune, on_kernel, facts, bias_fill)
    if context_parallel_active():  # the sequence is sharded: only the ringed kernels, or a clear refusal
        return attend_context_parallel(call)
    if maybe_causal is not None:
        alignment = maybe_causal.causal_reading(call)
        if alignment is not None:
            every_key = _keeps_every_key(alignment, None, L, S)
            call = replace(call, keep=None, bias=None, causal=None if every_key else alignment)
    out, call = _run_first_kernel(call)
    out = restore_rows(out, call)
    facts.folded = None  # the folded call refers to ``facts``: no reference cycle keeps the tensors alive
    return out


def _keeps_every_key(causal: Optional[str], window: Optional[int], L: int, S: int) -> bool:
    """Whether a causal (windowed) triangle masks nothing for ``L`` queries and ``S`` keys: one query
    bottom-right aligned (a decode step) sees every key up to the diagonal, which is the last key, and a
    window reaching back over all of them."""
    return causal == "bottom_right" and L == 1 and S >= 1 and (window is None or window >= S)


def _run_first_kernel(call: AttentionCall) -> tuple[torch.Tensor, AttentionCall]:
    """The output of the first registered kernel that does not refuse ``call`` (nor fail on it), and the
    call in the form it ran (``CallFacts.folded``); each refusal is recorded in ``call.facts.refusals``."""
    for kernel in registered_kernels():
        reason = kernel.refuses(call)
        if reason is None:
            try:
                out = kernel.run(call)
                return out, call if call.facts.folded is None else call.facts.folded
            except KernelFailed as failure:
                reason = failure.reason
        call.facts.refusals += ((kernel.name, reason),)
        call = call if call.facts.folded is None else call.facts.folded
    refusals = "; ".join(f"{name}: {reason}" for name, reason in call.facts.refusals)
    raise RuntimeError(f"attnfuse: every registered kernel refused this call ({refusals})")


# ----------------------------------------------------------------------------- autograd

class _HigherOrderSwitch(torch.autograd.Function):
    """Passes the fused output through; its backward sends the gradient on to the kernel's own backward,
    except in a backward that must itself be differentiable (``create_graph=True``: gradient penalties,
    Hessian-vector products), where it recomputes the site on the differentiable math path and gives
    the inputs' gradients directly (the kernel's path then receives none)."""

    @staticmethod
    def forward(ctx, out, recompute, random, fresh_output, *tensors):
        ctx.recompute, ctx.random = recompute, random
        ctx.values = tuple(None if isinstance(t, torch.Tensor) else t for t in tensors)
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in tensors))
        return out.clone() if fresh_output else out.detach()

    @staticmethod
    def backward(ctx, grad):
        if not torch.is_grad_enabled():
            return (grad, None, None, None, *(None for _ in ctx.values))
        if ctx.random:
            raise RuntimeError("attnfuse: a backward with create_graph=True needs this attention site's forward "
                               "again, but its dropout mask was drawn inside a fused kernel and cannot be drawn "
                               "again; run it with dropout off (model.eval()) or leave the model unoptimized for "
                               "this computation")
        tensors = [value if saved is None else saved for saved, value in zip(ctx.saved_tensors, ctx.values)]
        wanted = [i for i in range(len(tensors)) if ctx.needs_input_grad[4 + i]]
        out = ctx.recompute(*tensors)
        grads = torch.autograd.grad(out, [tensors[i] for i in wanted], grad, create_graph=True, allow_unused=True)
        result = [None] * len(tensors)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, None, None, None, *result)


class _PrivateKernelSwitch(_HigherOrderSwitch):
    """``_HigherOrderSwitch`` for a kernel that ran on detached copies of the inputs: its graph is private,
    so a ``create_graph=True`` backward never reaches it. The engine visits a kernel node even when no
    gradient reaches it, and cuDNN's backward then records an op that has no derivative (measured on an
    H100, torch 2.11, half precision); the first-order backward goes through the private graph instead."""

    @staticmethod
    def forward(ctx, private, recompute, random, fresh_output, *tensors):
        ctx.private_out, ctx.leaves = private
        return _HigherOrderSwitch.forward(ctx, ctx.private_out, recompute, random, fresh_output, *tensors)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _HigherOrderSwitch.backward(ctx, grad)
        wanted = [i for i, leaf in enumerate(ctx.leaves)
                  if ctx.needs_input_grad[4 + i] and isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        grads = torch.autograd.grad(ctx.private_out, [ctx.leaves[i] for i in wanted], grad, retain_graph=True,
                                    allow_unused=True)
        result: list = [None] * len(ctx.leaves)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, None, None, None, *result)


def _private_leaves(tensors: tuple) -> tuple:
    return tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in tensors)


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
    differentiable = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    needs_grad = any(t.requires_grad for t in differentiable)
    if not needs_grad or any(is_traced(t) for t in differentiable) or torch._C._are_functorch_transforms_active():
        return run(*tensors)
    if any(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in differentiable):  # cuDNN may run
        leaves = _private_leaves(tensors)
        return _PrivateKernelSwitch.apply((run(*leaves), leaves), recompute, random, fresh_output, *tensors)
    return _HigherOrderSwitch.apply(run(*tensors), recompute, random, fresh_output, *tensors)

"""``attnfuse.attend``: the fused attention op that every rewritten site calls."""
from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional

import torch

from attnfuse import dispatch
from attnfuse.fallback import index_grid, math_attention
from attnfuse.autotune import autotune_order
from attnfuse.flex import flex_attend
from attnfuse.masking import (combined_keep, dead_key_columns, restore_fully_masked_rows, rows_of_neginf,
                              rows_without_keys, sdpa_mask, uniform_rows_for_dropout, unread_rows_without_keys)
from attnfuse.memo import host_bool, host_bools, host_readable
from attnfuse.precision import bias_dtype, internal_dtype
from attnfuse.tracing import is_traced

Causal = Optional[Literal["top_left", "bottom_right"]]
FullyMaskedRows = Literal["zero", "mean", "nan"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Causal, fully_masked: str,
           window: Optional[int]) -> None:
    if q.dim() != 4:
        raise ValueError(f"attend: q must be (batch, heads, q_len, head_dim), got shape {tuple(q.shape)}")
    if k.dim() not in (3, 4) or v.dim() != k.dim():
        raise ValueError("attend: k and v must both be (batch, kv_heads, k_len, dim) or single-head (batch, k_len, dim)")
    if causal not in (None, "top_left", "bottom_right"):
        raise ValueError(f"attend: causal must be None, 'top_left' or 'bottom_right', got {causal!r}")
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
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    fully_masked_rows: FullyMaskedRows = "zero",
    kernels: Optional[Iterable[str]] = None,
    autotune: bool = False,
    on_kernel: Optional[Callable[[str], None]] = None,
) -> torch.Tensor:
    """Fused ``softmax(mods(scale * q k^T) + bias, masked) @ v`` on the fastest valid kernel.

    Args:
        q: ``(B, H, L, E)``. k, v: ``(B, Hk, S, E)`` / ``(B, Hk, S, Ev)`` with ``H % Hk == 0`` (grouped
            or multi-query heads are shared without copying), or single-head ``(B, S, E)``.
        mask: boolean keep-mask (True = attend) broadcastable to ``(B, H, L, S)``, e.g. ``(B, 1, 1, S)``.
        bias: additive float bias broadcastable to ``(B, H, L, S)``. A bias wider than q (fp32 on bf16 q)
            is added in its own precision, as PyTorch's type promotion adds it (at most the kernels'
            internal fp32 for half-precision q): the call then runs on a kernel that can do so exactly.
        causal: ``"top_left"`` keeps ``j <= i`` (SDPA's ``is_causal``); ``"bottom_right"`` keeps
            ``j <= i + S - L`` (the ``triu(j - i + 1)`` convention, right for KV caches).
        window: with ``causal``, keep only the last ``window`` keys up to the diagonal (sliding window).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before biases and masks (Gemma 2).
        bias_fn: an additive bias given as a function of broadcastable index tensors ``(b, h, i, j)``
            (ALiBi, relative positions); FlexAttention evaluates it per element, SDPA on a grid.
        scale: multiplies ``q k^T``; None means ``1 / sqrt(E)``.
        dropout_p: dropout on the probabilities; pass 0 in eval mode.
        fully_masked_rows: output of a query row whose keys are all masked: ``"zero"`` (SDPA's),
            ``"mean"`` (the mean of v, what a finite ``masked_fill`` gives) or ``"nan"`` (a ``-inf`` fill).
        kernels: restrict to these kernels (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``, ``"flex"``).
        autotune: time the valid SDPA kernels once per call signature and use the fastest.
        on_kernel: called with the name of the kernel that runs (used by the audit).

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
    """
    _check(q, k, v, causal, fully_masked_rows, window)
    allowed = dispatch.validate_kernels(kernels)
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    B, H, L, E = q.shape
    S, Hk = k.shape[-2], k.shape[1]
    if H % Hk:
        raise ValueError(f"attend: {H} query heads cannot share {Hk} kv heads evenly")
    if k.shape[0] != B:
        k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
    keep = mask if mask is None or mask.dtype == torch.bool else mask.bool()
    if bias is not None and bias.dtype != bias_dtype(q.dtype, bias.dtype):
        bias = bias.to(bias_dtype(q.dtype, bias.dtype))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    path = dispatch.choose_path(q, k, softcap=softcap, window=window, bias=bias, bias_fn=bias_fn, dropout_p=dropout_p,
                                needs_grad=needs_grad, allowed=allowed)
    if path != "math" and needs_grad and bias is not None and dispatch.bias_masks_a_whole_row(bias):
        path = "math"
    scale_value = E ** -0.5 if scale is None else scale
    if S == 0 or scale_value == 0:
        path = "math"  # no key to sum over (the original gives 0), or every score 0: nothing to fuse
    elif scale_value < 0 and path != "math":
        # fused kernels track the running maximum of the unscaled scores; -q with |scale| is exact
        q, scale, scale_value = -q, -scale_value, -scale_value
    if path == "flex":
        out = _flex_or_none(q, k, v, keep, bias, bias_fn, causal, window, softcap, scale_value, allowed)
        if out is not None:
            if on_kernel is not None:
                on_kernel("flex")
        else:
            path = "math" if softcap is not None else "sdpa"
    full_keep, dead, dead_known, math_reason = None, None, False, "unfused math"
    if path == "sdpa":
        if bias_fn is not None:
            grid_bias = bias_fn(index_grid(B, H, L, S, q.device))
            bias, bias_fn = (grid_bias if bias is None else bias + grid_bias), None
            bias = bias.to(bias_dtype(q.dtype, bias.dtype))
        bias = _bias_for_sdpa(bias, q)
        if bias is not None and bias.dtype != q.dtype and q.is_cuda:
            # fused CUDA kernels round a wider bias to q's dtype, or give NaN (cuDNN): add it unfused
            if allowed is not None and "math" not in allowed:
                raise RuntimeError(f"attnfuse: the forced kernels {list(allowed)} cannot add this {bias.dtype} bias "
                                   f"to {q.dtype} scores exactly; allow 'math' (or 'flex')")
            path, math_reason = "math", "unfused math (fp32 bias on half-precision q)"
    if path == "sdpa":
        full_keep = None if keep is None else combined_keep(keep, causal, L, S, q.device, window)
        # A key-padding mask without gradients reads nothing on the host: masked k rows are zeroed (a NaN
        # there cannot leak) and rows without keys, whole batch rows at most, are written back with one
        # `where`. With gradients the original's backward reads the masked keys too (0 * NaN), so those
        # calls keep the check and the rerun.
        padding_only = keep is not None and keep.shape[-2] == 1 and causal is None and window is None and \
            not needs_grad
        dead, any_dead = _rows_without_keys_unread(keep, causal, L, S, q.device, window, full_keep, dropout_p)
        q_run, keep_run, bias_run = q, full_keep, bias
        if padding_only and dropout_p == 0:
            any_dead = None
            if fully_masked_rows == "mean" and bias is None and dead is not None:
                # such a row keeps all its (zeroed) keys: its scores are 0, and the kernel itself gives the
                # uniform average, the mean of v, so nothing is written back
                keep_run, dead = full_keep | dead, None
        uniform_rows = dead is not None and any_dead is None and dropout_p > 0 and fully_masked_rows == "mean"
        if uniform_rows:
            whole = full_keep if full_keep is not None else combined_keep(None, causal, L, S, q.device, window)
            q_run, keep_run, bias_run = uniform_rows_for_dropout(q, whole, bias, dead)
        out, leaked = _sdpa(q_run, k, v, keep_run, bias_run, causal, window, scale, dropout_p, needs_grad, allowed,
                            on_kernel, autotune, zero_keys_masked_by=full_keep if padding_only else None)
        dead, leaked = _read_flags(dead, any_dead, leaked)
        dead_known = True
        if leaked:  # a masked key's NaN or inf reached the kernel's output: compute as the original did
            path, math_reason = "math", "unfused math (NaN/inf in masked keys)"
    if path == "math":
        if on_kernel is not None:
            on_kernel(math_reason)
        out = math_attention(q, k, v, keep=keep, bias=bias, bias_fn=bias_fn, causal=causal, window=window,
                             softcap=softcap, scale=scale_value, dropout_p=dropout_p)
    if not dead_known:
        dead = rows_without_keys(keep, causal, L, S, q.device, window, full_keep)
    if dead is not None and not (dropout_p > 0 and fully_masked_rows == "mean"):
        # with dropout a finite fill's row is dropout(uniform) @ v, computed by the kernel or the math path
        out = restore_fully_masked_rows(out, v, dead, fully_masked_rows)
    if bias is not None:
        whole = full_keep if full_keep is not None else combined_keep(keep, causal, L, S, q.device, window)
        neginf_rows = rows_of_neginf(bias, whole, fully_masked_rows == "nan",
                                     zeroed=fully_masked_rows == "zero" and keep is not None)
        if neginf_rows is not None:
            out = restore_fully_masked_rows(out, v, neginf_rows, "nan")
    return out


def _flex_or_none(q, k, v, keep, bias, bias_fn, causal, window, softcap, scale, allowed) -> Optional[torch.Tensor]:
    """FlexAttention, or None when it cannot compile here (remembered, so SDPA takes such calls)."""
    try:
        # fp32: the original added an fp32 bias in fp32, and Flex gathers fp32 27x faster than bf16
        return flex_attend(q, k, v, keep=keep, bias=None if bias is None else bias.to(internal_dtype(q.dtype)),
                           bias_fn=bias_fn, causal=causal, window=window, softcap=softcap, scale=scale,
                           enable_gqa=k.shape[1] != q.shape[1])
    except Exception as error:  # e.g. Triton finds no kernel configuration that fits this GPU
        if is_traced(q) or (allowed is not None and set(allowed) == {"flex"}):
            raise
        dispatch.flex_failed(q, k, error, bias, bias_fn, softcap, window)
        return None


def _rows_without_keys_unread(keep, causal, L, S, device, window, full_keep, dropout_p):
    """``(rows, flag)``: rows without keys and, for a keep-mask, the unread flag saying whether there are
    any (None when known without reading). Under dropout the rows decide how the kernel is called, so
    the flag is read at once."""
    if keep is None or dropout_p > 0:
        return rows_without_keys(keep, causal, L, S, device, window, full_keep), None
    return unread_rows_without_keys(keep, causal, L, S, device, window, full_keep)


def _read_flags(dead, any_dead, leaked):
    """Read the rows-without-keys flag and the leak flag with one host synchronization.

    Returns ``(dead or None, leaked)``; where nothing can be read (a tracer, graph capture) the rows
    are kept (restored unconditionally) and no leak is reported (masked keys were zeroed instead).
    """
    flags = [f for f in (any_dead, leaked) if f is not None]
    values = host_bools(*flags) if flags else []
    if values is None:
        return dead, False
    read = iter(values)
    if any_dead is not None and not next(read):
        dead = None
    return dead, leaked is not None and next(read)


def _sdpa(q, k, v, full_keep, bias, causal, window, scale, dropout_p, needs_grad, allowed, on_kernel,
          autotune=False, zero_keys_masked_by=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """SDPA on the fastest valid kernel, and an unread flag: whether the kernel may have added its mask
    to a masked key's NaN or inf score (any non-finite value in the output, read by the caller; a
    rerun unfused decides). Where every masked key is masked for every query (``zero_keys_masked_by``: a
    key-padding mask), or under a compiler where the output cannot be read, the k rows that every query
    row masks are zeroed instead (a pass over k, no read) and no flag is returned.
    """
    L, S, H, Hk = q.shape[-2], k.shape[-2], q.shape[1], k.shape[1]
    attn_mask, is_causal = sdpa_mask(full_keep, bias, causal, L, S, q, window)
    enable_gqa = Hk != H
    if enable_gqa and q.is_cuda and attn_mask is not None:
        # Only flash and cuDNN share kv heads natively, and flash takes no mask: repeat for the others.
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        enable_gqa = False
    sdpa_allowed = None if allowed is None else tuple(name for name in allowed if name != "flex")
    order = dispatch.kernel_order(q, k, v, attn_mask, needs_grad, sdpa_allowed)
    masked = full_keep is not None or causal is not None or window is not None
    adds_mask = masked and dispatch.kernel_adds_mask(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order)
    checkable = host_readable(q) and zero_keys_masked_by is None
    zeroing = zero_keys_masked_by if zero_keys_masked_by is not None else full_keep
    if adds_mask and not checkable and zeroing is not None:
        k = k.masked_fill(dead_key_columns(zeroing, k.shape[1]).unsqueeze(-1), 0)
    if autotune and not is_traced(q):
        order = autotune_order(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, needs_grad, order)
    if on_kernel is not None:
        on_kernel(dispatch.chosen_kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order))
    rng = _rng_state(q) if adds_mask and checkable and dropout_p > 0 else None
    out = dispatch.run_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order,
                            strict=allowed is not None)
    if not (adds_mask and checkable):
        return out, None
    # one reduction: a NaN or inf anywhere makes the sum non-finite (a huge finite output too: a rerun, not an error)
    total = out.sum(dtype=torch.float32) if out.dtype in (torch.float16, torch.bfloat16) else out.sum()
    leaked = ~torch.isfinite(total)
    if rng is not None:  # an unfused rerun must draw the dropout mask the original would have drawn
        if host_bool(leaked):
            _set_rng_state(q, rng)
            return out, torch.ones((), dtype=torch.bool, device=q.device)
        return out, torch.zeros((), dtype=torch.bool, device=q.device)
    return out, leaked


def _rng_state(q: torch.Tensor) -> torch.Tensor:
    return torch.cuda.get_rng_state(q.device) if q.is_cuda else torch.get_rng_state()


def _set_rng_state(q: torch.Tensor, state: torch.Tensor) -> None:
    if q.is_cuda:
        torch.cuda.set_rng_state(state, q.device)
    else:
        torch.set_rng_state(state)


def _bias_for_sdpa(bias: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """The bias for SDPA: in q's dtype where that loses nothing, else as it is (fp32 on half q).

    The CPU kernels add an fp32 mask to half-precision scores in fp32; the CUDA kernels do not, so there
    a wider bias is narrowed when ``narrowed_exactly`` allows (checked at every call: a pass over the bias
    and a host read, ``attnfuse.memo``); otherwise the caller runs the call unfused.
    """
    if bias is None or bias.dtype == q.dtype or not q.is_cuda or is_traced(q):
        return bias
    narrow = narrowed_exactly(bias, q.dtype)
    return bias if narrow is None else narrow


def narrowed_exactly(bias: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``bias`` in ``dtype`` if that changes no sum with a score, else None (one host read per call).

    ``finfo(bias.dtype).min`` (the usual mask fill) becomes ``dtype``'s lowest value: both absorb any score
    in fp32, so the softmax is the same; every other value must survive the cast exactly.
    """
    lowest = torch.finfo(dtype).min
    absorbing = bias == torch.finfo(bias.dtype).min
    narrow = bias.masked_fill(absorbing, lowest).to(dtype)

    return narrow if host_bool(((narrow.to(bias.dtype) == bias) | absorbing).all()) else None


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
    differentiable = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if not needs_grad or any(is_traced(t) for t in differentiable) or torch._C._are_functorch_transforms_active():
        return run(*tensors)
    if any(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in differentiable):  # cuDNN may run
        leaves = _private_leaves(tensors)
        return _PrivateKernelSwitch.apply((run(*leaves), leaves), recompute, random, fresh_output, *tensors)
    return _HigherOrderSwitch.apply(run(*tensors), recompute, random, fresh_output, *tensors)

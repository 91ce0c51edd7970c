"""``attnfuse.attend``: the fused attention op that every rewritten site calls.

It checks the arguments, builds one ``AttentionCall``, runs it on the first registered kernel that does
not refuse it (``attnfuse.kernels``), and writes the original's answer into rows every key of which is
masked.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Optional, Union

import torch

from attnfuse.caches import Cache
from attnfuse.context_parallel import attend_context_parallel, context_parallel_active
from attnfuse.kernels import AttentionCall, CallFacts, KernelFailed, kernels as registered_kernels
from attnfuse.kernels.registry import kernel_choices, order_changes, validate_kernels
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
    key = _launch_key(call) if _repeatable(call) else None
    if key is not None and call.on_kernel is None:
        launch = _LAUNCHES.peek(key)
        if launch is not None:  # the kernel's launch for this signature, with nothing to check or restore
            return launch(call.q, call.k, call.v, call.scale)
    out, ran = _run_first_kernel(call)
    out = restore_rows(out, ran)
    if key is not None and facts.launch is not None and facts.dead is None and _refused_by_metadata(facts.refusals):
        _LAUNCHES.setdefault(key, facts.launch)
    facts.folded = None  # the folded call refers to ``facts``: no reference cycle keeps the tensors alive
    return out


_LAUNCHES: Cache[Callable[..., torch.Tensor]] = Cache("attend.launches", maxsize=1024)


def _repeatable(call: AttentionCall) -> bool:
    """Whether the call has nothing whose values its kernel reads or its rows depend on (no mask, bias, score
    function, softcap, window, dropout or kernel restriction; a positive scale), so that a launch a kernel recorded
    (``CallFacts.launch``) for a call of the same signature computes it."""
    return call.keep is None and call.bias is None and call.bias_fn is None and call.softcap is None and \
        call.window is None and call.dropout_p == 0 and call.allowed is None and not call.autotune and \
        call.scale_value > 0 and not is_traced(call.q)


def _refused_by_metadata(refusals: tuple[tuple[str, str], ...]) -> bool:
    """Whether every kernel that refused the call did so from its metadata (``Kernel.refuses_by_metadata``): it
    would refuse any call of the same signature."""
    names = {name for name, _ in refusals}
    return all(kernel.refuses_by_metadata for kernel in registered_kernels() if kernel.name in names)


def _launch_key(call: AttentionCall) -> tuple:
    """What a recorded launch depends on: shapes, strides, dtypes and device, the causal alignment, gradients, the
    kernel order."""
    q, k, v = call.q, call.k, call.v
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            call.causal, call.needs_grad, q.requires_grad or k.requires_grad or v.requires_grad, order_changes())


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

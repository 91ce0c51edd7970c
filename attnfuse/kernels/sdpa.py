"""SDPA: PyTorch's fused kernels (cuDNN, flash, memory-efficient, math), fastest valid first, with the
mask, the rows and the checks that make every kernel give the original's result.

The order comes from figures measured on an H100 with torch 2.11 (``benchmarks/bench_ops.py`` and
``benchmarks/bench_kernels.py``; JSON in ``docs/``): in half precision cuDNN was the fastest valid
kernel at every shape of the per-op grid (d 64/128, n 512-16384, no mask, causal, key padding,
forward and forward+backward) and at lengths off the tile grid (129, 257, 513, 1025), flash second;
memory-efficient attention wins for short keys at small head dims (``preferred_order``). Flash first
on Ampere, memory-efficient for fp32. SDPA itself skips a listed kernel that cannot take the call
(``kernel_scope`` sets the priority), so the list is a fallback chain; the rules below only remove
kernels whose *result* would differ from the original (the known traps). ``SdpaKernel`` refuses what
no SDPA kernel computes exactly (a softcap; on CUDA a bias wider than q that narrowing would change).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import CausalBias, causal_lower_right

from attnfuse.caches import Cache

from attnfuse.kernels.autotune import autotune_order
from attnfuse.kernels.call import AttentionCall, Inexact, Kernel, KernelFailed, index_grid, refused_by_fused_kernels
from attnfuse.kernels.kernel_scope import kernel_scope
from attnfuse.kernels.rows import keep_rows_without_keys, rows_without_keys, unread_rows_without_keys
from attnfuse.masking import combined_keep
from attnfuse.tracing import is_traced
from attnfuse.memo import host_bool, host_readable, host_values
from attnfuse.precision import bias_dtype

KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
KERNEL_NAMES = {backend: name for name, backend in KERNELS.items()}
# built once, not under a tracer: the unfused fallback names these in the audit (``Inexact``)
WIDE_BIAS = Inexact("fp32 bias on half-precision q")
LEAKED = Inexact("NaN/inf in masked keys")


def known_traps(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor],
                needs_grad: bool) -> dict[str, str]:
    """Kernels whose result would differ from the original for this call, with the reason (measured traps)."""
    traps = {}
    L, S = q.shape[-2], k.shape[-2]
    if q.is_cuda and attn_mask is not None and needs_grad and (L % 128 == 64 or S % 128 == 64):
        traps["cudnn"] = "cuDNN returns NaN gradients with a mask at lengths 64 mod 128 (pytorch#196678)"
    return traps


# Zeroing a key-padding call's masked k rows copies k; past this size (a decode step's long cache, where the
# copy costs as much as the kernel) the call reads its leak flag on the host instead (one synchronization).
ZEROING_LIMIT_BYTES = 16 * 2 ** 20

# Keys and head dims up to this length run fastest on memory-efficient attention on Hopper.
SHORT_KEYS = 64


def preferred_order(device_type: str, capability: tuple[int, int], dtype: torch.dtype, key_len: int,
                    head_dim: int) -> list[str]:
    """The SDPA kernels fastest first, from the call's facts alone (``docs/bench_kernels_h100.json``).

    Half precision on Hopper: cuDNN first except for short keys at small head dims, where memory-efficient
    attention was faster (H100, 32k tokens, h=16, d=64, 17 to 64 keys: cuDNN took 1.22-1.65x its time
    forward and 1.12-1.57x forward+backward without a mask or causal, 1.17-3.88x with key padding;
    from 80 keys on, or at d=128, cuDNN was fastest forward). ``head_dim`` is the larger of q/k's and v's.
    """
    if device_type != "cuda":
        return ["flash", "math"]
    if dtype not in (torch.float16, torch.bfloat16):
        return ["efficient", "math"]
    if capability[0] < 9:
        return ["flash", "efficient", "cudnn", "math"]
    if key_len <= SHORT_KEYS and head_dim <= SHORT_KEYS:
        return ["efficient", "cudnn", "flash", "math"]
    return ["cudnn", "flash", "efficient", "math"]


_ORDERS: Cache[tuple[SDPBackend, ...]] = Cache("kernels.sdpa.orders", maxsize=1024)


def kernel_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 needs_grad: bool, allowed: Optional[tuple[str, ...]] = None) -> tuple[SDPBackend, ...]:
    """SDPA kernels to try for this call, fastest valid first; raises if every allowed kernel is a trap.

    Remembered per the facts it depends on (device, dtype, short keys and head dim, the allowed kernels,
    the traps that apply): metadata only, never values."""
    traps = known_traps(q, k, attn_mask, needs_grad) if needs_grad and attn_mask is not None else _NO_TRAPS
    short = k.shape[-2] <= SHORT_KEYS and q.shape[-1] <= SHORT_KEYS and v.shape[-1] <= SHORT_KEYS
    key = (q.device, q.dtype, short, allowed, tuple(traps))
    order = _ORDERS.peek(key)
    if order is None:
        order = _ORDERS.setdefault(key, _kernel_order(q, k, v, allowed, traps))
    return order


_NO_TRAPS: dict[str, str] = {}


def _kernel_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[tuple[str, ...]],
                  traps: dict[str, str]) -> tuple[SDPBackend, ...]:
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    order = preferred_order(q.device.type, capability, q.dtype, k.shape[-2], max(q.shape[-1], v.shape[-1]))
    if allowed is not None:
        order = [name for name in order if name in allowed] or list(allowed)
    safe = [name for name in order if name not in traps]
    if not safe:
        reasons = "; ".join(traps[name] for name in order)
        raise RuntimeError(f"attnfuse: the forced kernels {list(order)} would give a wrong result here ({reasons}); "
                           "allow another kernel, e.g. 'efficient' or 'math'")
    return tuple(KERNELS[name] for name in safe)


def chosen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: object, dropout_p: float,
                  is_causal: bool, scale: Optional[float], enable_gqa: bool, order: list[SDPBackend]) -> str:
    """The kernel SDPA picks for this call under ``order`` (for the audit)."""
    if isinstance(attn_mask, CausalBias):
        return "efficient (lower-right causal)" if q.device.type == "cuda" else "cpu-math (lower-right causal)"
    picked = _sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order, Exception)
    name = KERNEL_NAMES[order[0]] if picked is None else KERNEL_NAMES.get(picked, "math")
    return name if q.device.type == "cuda" else f"cpu-{name}"


def _sdp_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: object, dropout_p: float,
                is_causal: bool, scale: Optional[float], enable_gqa: bool, order: list[SDPBackend],
                unknown: type[BaseException]) -> Optional[SDPBackend]:
    """The kernel SDPA's dispatcher picks for this call under ``order``; None where asking it raised ``unknown``."""
    try:
        with kernel_scope(order, q):
            return SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                      enable_gqa=enable_gqa))
    except unknown:
        return None


_CAUSAL_KERNELS: Cache[str] = Cache("kernels.sdpa.causal_kernels", maxsize=1024)


def _causal_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: Optional[float],
                   enable_gqa: bool, order: list[SDPBackend]) -> str:
    """``chosen_kernel`` for an ``is_causal`` call, remembered per call signature (metadata only)."""
    key = (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(-1), k.stride(-1),
           v.stride(-1), dropout_p > 0, enable_gqa, tuple(order), q.requires_grad or k.requires_grad)
    return _CAUSAL_KERNELS.get_or_create(
        key, lambda: chosen_kernel(q, k, v, None, dropout_p, True, scale, enable_gqa, order))


def kernel_adds_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: object, dropout_p: float,
                     is_causal: bool, scale: Optional[float], enable_gqa: bool, order: list[SDPBackend]) -> bool:
    """Whether the kernel taking this call adds its mask to the scores instead of selecting.

    Adding ``-inf`` to the score of a key that holds NaN or inf gives NaN, where the original's
    ``masked_fill`` replaced that score: a masked key's non-finite value then reaches the output.
    Measured (CPU, torch 2.13; H100, torch 2.11): every kernel adds a mask tensor; ``is_causal``
    selects on CPU flash and on GPU flash, memory-efficient and cuDNN, but adds on the math kernel;
    a lower-right ``CausalBias`` selects on GPU flash and memory-efficient and is materialized
    (added) on the CPU and on the other kernels.
    """
    if isinstance(attn_mask, CausalBias):
        return not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if attn_mask is not None:
        return True
    return is_causal and _causal_kernel(q, k, v, dropout_p, scale, enable_gqa, order) in ("math", "cpu-math")


_SHARED_HEADS: Cache[bool] = Cache("kernels.sdpa.shared_heads", maxsize=256)


def _shares_kv_heads_with_a_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                                  dropout_p: float, scale: Optional[float], order: tuple[SDPBackend, ...]) -> bool:
    """Whether the kernel SDPA picks for a masked grouped-query call takes the shared kv heads as they are
    (cuDNN does), so k and v need no repeating: a copy of both per query group, on a decode step's long cache
    many times the kernel's own time (``docs/bench_decode_h100.json``).

    Remembered per call signature (shapes, strides, dtypes, mask layout, dropout, gradients, the order: metadata
    only): the layers of one decode step share it, so one step asks SDPA's dispatcher once, not once a layer. A
    stale answer could only cost speed: a kernel that does not take the shared heads hands the call to the math
    kernel, which computes the same."""
    if is_traced(q):
        return False
    key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, type(attn_mask),
           attn_mask.shape, attn_mask.stride(), attn_mask.dtype, dropout_p > 0, scale, order,
           q.requires_grad or k.requires_grad or v.requires_grad or attn_mask.requires_grad)
    found = _SHARED_HEADS.peek(key)
    if found is None:
        found = _sdp_choice(q, k, v, attn_mask, dropout_p, False, scale, True, list(order), RuntimeError) == \
            SDPBackend.CUDNN_ATTENTION
        _SHARED_HEADS[key] = found
    return found


def run_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
             dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
             order: tuple[SDPBackend, ...], strict: bool = False) -> torch.Tensor:
    """SDPA on the first valid kernel of ``order``; the math kernel if every listed one refuses.

    With ``strict`` (the user forced the kernels) a refusal is an error instead of a fallback.
    """
    try:
        with kernel_scope(order, q):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    except RuntimeError as error:
        if strict:
            names = [KERNEL_NAMES[b] for b in order]
            raise RuntimeError(f"attnfuse: none of the forced kernels {names} can run this call "
                               f"({error}); allow more kernels, e.g. add 'math'") from error
        with kernel_scope([SDPBackend.MATH], q):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if out.requires_grad and out.is_cuda and not is_traced(q):
        out.register_hook(_gradient_in_layout_of(out))
    return out


def _gradient_in_layout_of(out: torch.Tensor):
    """A hook giving the kernel's backward its output gradient in the output's own memory layout.

    Measured on an H100 (torch 2.11, bf16): cuDNN's backward returned gradients off by about 2 when the
    output gradient arrived transposed relative to the output (a model that writes into the attention
    output through a view); flash was exact. A copy is made only when the layouts differ.
    """
    shape, stride = out.shape, out.stride()

    def hook(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if grad is None or grad.stride() == stride:  # None: the engine visits without a gradient
            return None
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)

    return hook




def sdpa_mask(full_keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: Optional[str], L: int,
              S: int, q: torch.Tensor, window: Optional[int] = None) -> tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` for SDPA, building an ``L x S`` tensor only when the inputs force it.

    ``full_keep`` is the call's keep-mask already combined with its causal triangle (``combined_keep``),
    or None when the call has no keep-mask.
    """
    device = q.device
    if full_keep is None and bias is None and window is None:
        if causal is None:
            return None, False
        if causal == "top_left" or L == S:
            return None, True
        if L < S and not is_traced(q):
            return causal_lower_right(L, S), False
    keep = full_keep if full_keep is not None else combined_keep(None, causal, L, S, device, window)
    if bias is None:
        return keep, False
    if keep is None:  # the bias keeps its dtype: attend decided it (an fp32 bias on bf16 q is added in fp32)
        return bias, False
    return bias.masked_fill(~keep, torch.finfo(bias.dtype).min), False


def dead_key_columns(full_keep: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B|1, Hk|1, S)``: True for a key that every query row (of every query head sharing its kv
    head) masks, so its k row is never read by the original and may be zeroed."""
    full = full_keep.reshape((1,) * (4 - full_keep.dim()) + tuple(full_keep.shape))
    dead = ~full.any(-2)
    if dead.shape[1] > kv_heads:
        dead = dead.unflatten(1, (kv_heads, -1)).all(2)
    return dead


def uniform_rows_for_dropout(q: torch.Tensor, full_keep: torch.Tensor, bias: Optional[torch.Tensor],
                             dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(q, keep, bias)`` under which the kernel itself gives a row without keys uniform weights.

    With a finite fill the original computes ``dropout(uniform) @ v`` for such a row (a random
    result), which no write-back can reproduce: the row's q is zeroed, every key is kept and its
    bias set to 0, so its scores are all 0 and the kernel's own dropout applies (on the CPU, where
    SDPA's math kernel draws the same dropout mask as the original, even under the same seed).
    Costs a pass over q and over the mask; gradients reach neither q nor k from such a row, as in
    the original.
    """
    keep = full_keep | dead
    bias = None if bias is None else torch.where(dead, torch.zeros((), dtype=bias.dtype, device=bias.device), bias)
    return q.masked_fill(dead, 0), keep, bias


class SdpaKernel(Kernel):
    """``F.scaled_dot_product_attention`` on the fastest valid of its kernels; the audit names the one
    SDPA picks (``cpu-flash``, ``cudnn``, ...)."""

    name = "sdpa"
    choices = tuple(KERNELS)
    refuses_by_metadata = True

    def refuses(self, call: AttentionCall) -> Optional[str]:
        if call.allowed is not None and not any(name in KERNELS for name in call.allowed):
            return "not among the forced kernels"
        if call.softcap is not None:
            return "SDPA has no softcap"
        reason = refused_by_fused_kernels(call)
        if reason is not None:
            return reason
        bias, q = _folded(call).bias, call.q
        if bias is not None and bias.dtype != q.dtype and q.is_cuda:
            # fused CUDA kernels round a wider bias to q's dtype, or give NaN (cuDNN): add it unfused
            if call.allowed is not None and "math" not in call.allowed:
                raise RuntimeError(f"attnfuse: the forced kernels {list(call.allowed)} cannot add this {bias.dtype} "
                                   f"bias to {q.dtype} scores exactly; allow 'math' (or 'flex')")
            return WIDE_BIAS
        return None

    def run(self, call: AttentionCall) -> torch.Tensor:
        return _run(_folded(call).with_positive_scale())


def _folded(call: AttentionCall) -> AttentionCall:
    """The call as SDPA adds its bias, computed once (``call.facts.folded``): a score function evaluated
    on the score grid and added (SDPA takes no function), a bias wider than q narrowed where that is
    exact (``_bias_for_sdpa``)."""
    if call.facts.folded is None:
        q, bias = call.q, call.bias
        if call.bias_fn is not None:
            B, H, L, _ = q.shape
            grid_bias = call.bias_fn(index_grid(B, H, L, call.k.shape[-2], q.device))
            bias = grid_bias if bias is None else bias + grid_bias
            bias = bias.to(bias_dtype(q.dtype, bias.dtype))
        bias = _bias_for_sdpa(bias, q)
        # nothing to fold (no score function, the bias as it is): the call itself
        unchanged = call.bias_fn is None and bias is call.bias
        call.facts.folded = call if unchanged else replace(call, bias=bias, bias_fn=None)
    return call.facts.folded


def _run(call: AttentionCall) -> torch.Tensor:
    """SDPA on the call, with its rows without keys recorded in ``call.facts`` for the write-back;
    ``KernelFailed`` when a masked key's NaN or inf reached the output (the original never read it)."""
    q, k, keep, causal, window = call.q, call.k, call.keep, call.causal, call.window
    L, S = q.shape[2], k.shape[2]
    if keep is None:  # no row check to read: the triangle's rows come from the shapes
        dead = rows_without_keys(None, causal, L, S, q.device, window) if causal is not None or window is not None \
            else None
        if dead is not None and call.dropout_p > 0 and call.fully_masked_rows == "mean":
            whole = combined_keep(None, causal, L, S, q.device, window)
            q_run, keep_run, bias_run = uniform_rows_for_dropout(q, whole, call.bias, dead)
            return _finish(call, None, dead, None, *_launch(call, q_run, keep_run, bias_run))
        return _finish(call, None, dead, None, *_launch(call, q, None, call.bias))
    full_keep = keep if causal is None else combined_keep(keep, causal, L, S, q.device, window)
    # A key-padding mask without gradients reads nothing on the host: masked k rows are zeroed (a NaN
    # there cannot leak) and rows without keys, whole batch rows at most, are written back with one
    # `where`. With gradients the original's backward reads the masked keys too (0 * NaN), so those
    # calls keep the check and the rerun; so do calls whose k is too large to copy cheaply.
    padding_only = keep.shape[-2] == 1 and causal is None and window is None and not call.needs_grad and \
        k.numel() * k.element_size() <= ZEROING_LIMIT_BYTES
    if call.dropout_p > 0:  # the rows decide how the kernel is called: read at once
        dead, any_dead = rows_without_keys(keep, causal, L, S, q.device, window, full_keep), None
    elif padding_only:  # nothing read: the rows are written back (or kept uniform) unconditionally
        dead, any_dead = keep_rows_without_keys(keep, causal, L, S, q.device, window, full_keep), None
    else:
        dead, any_dead = unread_rows_without_keys(keep, causal, L, S, q.device, window, full_keep)
    q_run, keep_run, bias_run = q, full_keep, call.bias
    if padding_only and call.dropout_p == 0 and call.fully_masked_rows == "mean" and call.bias is None and \
            dead is not None:
        # such a row keeps all its (zeroed) keys: its scores are 0, and the kernel itself gives the
        # uniform average, the mean of v, so nothing is written back
        keep_run, dead = full_keep | dead, None
    if dead is not None and any_dead is None and call.dropout_p > 0 and call.fully_masked_rows == "mean":
        q_run, keep_run, bias_run = uniform_rows_for_dropout(q, full_keep, call.bias, dead)
    out, leaked = _launch(call, q_run, keep_run, bias_run, zero_keys_masked_by=full_keep if padding_only else None)
    return _finish(call, full_keep, dead, any_dead, out, leaked)


def _finish(call: AttentionCall, full_keep: Optional[torch.Tensor], dead: Optional[torch.Tensor],
            any_dead: Optional[torch.Tensor], out: torch.Tensor, leaked: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel's output once the rows-without-keys and leak flags are read (one host read for both), with the
    rows recorded in ``call.facts`` for the write-back."""
    if any_dead is not None or leaked is not None:
        dead, leaked = _read_flags(dead, any_dead, leaked)
    call.facts.full_keep, call.facts.dead, call.facts.dead_known = full_keep, dead, True
    if leaked:  # a masked key's NaN or inf reached the kernel's output: compute as the original did
        raise KernelFailed(LEAKED)
    return out


def _read_flags(dead, any_dead, leaked):
    """Read the rows-without-keys flag and the leak check with one host synchronization.

    ``leaked`` is an unread sum of the output (non-finite: a masked key's NaN or inf may have reached it), or an
    already known bool. Returns ``(dead or None, leaked)``; where nothing can be read (a tracer, graph capture)
    the rows are kept (restored unconditionally) and no leak is reported (masked keys were zeroed instead).
    """
    unread = isinstance(leaked, torch.Tensor)
    if any_dead is None and not unread:
        return dead, bool(leaked)
    if any_dead is None:
        packed = leaked.reshape(1)
    elif unread:
        packed = torch.cat((any_dead.reshape(1), leaked.reshape(1)))  # one read for both (promoted to the sum's dtype)
    else:
        packed = any_dead.reshape(1)
    values = host_values(packed)
    if values is None:
        return dead, False
    if any_dead is not None and not values[0]:
        dead = None
    return dead, (not math.isfinite(values[-1])) if unread else bool(leaked)


def _launch(call: AttentionCall, q: torch.Tensor, full_keep: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            zero_keys_masked_by: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, object]:
    """SDPA on the fastest valid kernel, and the leak check: None, or an unread fp32 sum of the output that is
    non-finite where the kernel may have added its mask to a masked key's NaN or inf score (read by the caller; a
    rerun unfused decides), or a bool already read. Where every masked key is masked for every query
    (``zero_keys_masked_by``: a key-padding mask), or under a compiler where the output cannot be read, the k rows
    that every query row masks are zeroed instead (a pass over k, no read) and no check is returned. ``q``,
    ``full_keep`` and ``bias`` are the call's as the kernel takes them (rows without keys made uniform under
    dropout).
    """
    k, v, causal, window, scale = call.k, call.v, call.causal, call.window, call.scale
    dropout_p, allowed = call.dropout_p, call.allowed
    H, L, Hk, S = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    attn_mask, is_causal = sdpa_mask(full_keep, bias, causal, L, S, q, window)
    enable_gqa = Hk != H
    sdpa_allowed = None if allowed is None else tuple(name for name in allowed if name in KERNELS)
    order = kernel_order(q, k, v, attn_mask, call.needs_grad, sdpa_allowed)
    if enable_gqa and attn_mask is not None and q.is_cuda and not _shares_kv_heads_with_a_mask(
            q, k, v, attn_mask, dropout_p, scale, order):
        # flash takes no mask and memory-efficient attention no shared kv heads: repeat them for it
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        enable_gqa = False
    masked = full_keep is not None or causal is not None or window is not None
    adds_mask = masked and kernel_adds_mask(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order)
    checkable = adds_mask and zero_keys_masked_by is None and host_readable(q)
    if adds_mask and not checkable:
        zeroing = zero_keys_masked_by if zero_keys_masked_by is not None else full_keep
        if zeroing is not None:
            k = k.masked_fill(dead_key_columns(zeroing, k.shape[1]).unsqueeze(-1), 0)
    if call.autotune and not is_traced(q):
        order = autotune_order(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, call.needs_grad,
                               list(order))
    if call.on_kernel is not None:
        call.announce(chosen_kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order))
    rng = _rng_state(q) if checkable and dropout_p > 0 else None
    out = run_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, order, strict=allowed is not None)
    if attn_mask is None and not adds_mask and dropout_p == 0 and allowed is None and not call.autotune and q is call.q:
        call.facts.launch = SdpaLaunch(is_causal, enable_gqa, order)
    if not checkable:
        return out, None
    # one reduction: a NaN or inf anywhere makes the sum non-finite (a huge finite output too: a rerun, not an error)
    total = out.sum(dtype=torch.float32) if out.dtype in (torch.float16, torch.bfloat16) else out.sum()
    if rng is not None:  # an unfused rerun must draw the dropout mask the original would have drawn
        if not math.isfinite(host_values(total)[0]):
            _set_rng_state(q, rng)
            return out, True
        return out, False
    return out, total


class SdpaLaunch:
    """An SDPA launch without a mask or kernel restriction whose kernel order, causal flag and shared heads came from
    the call's metadata alone: any call of the same signature runs as ``launch(q, k, v, scale)``
    (``CallFacts.launch``)."""

    __slots__ = ("is_causal", "enable_gqa", "order")

    def __init__(self, is_causal: bool, enable_gqa: bool, order: tuple[SDPBackend, ...]) -> None:
        self.is_causal, self.enable_gqa, self.order = is_causal, enable_gqa, order

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        return run_sdpa(q, k, v, None, 0.0, self.is_causal, scale, self.enable_gqa, self.order)


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
    and a host read, ``attnfuse.memo``); otherwise ``SdpaKernel`` refuses the call.
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

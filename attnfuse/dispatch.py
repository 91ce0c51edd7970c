"""Dispatch: the SDPA kernels to try, fastest first, for one call's device, dtype, mask and shapes.

The order comes from figures measured on an H100 with torch 2.11 (``benchmarks/bench_ops.py`` and
``benchmarks/bench_kernels.py``; JSON in ``docs/``): in half precision cuDNN was the fastest valid
kernel at every shape of the per-op grid (d 64/128, n 512-16384, no mask, causal, key padding,
forward and forward+backward) and at lengths off the tile grid (129, 257, 513, 1025), flash second;
memory-efficient attention wins for short keys at small head dims (``preferred_order``). Flash first
on Ampere, memory-efficient for fp32. SDPA itself skips a listed kernel that cannot take the call
(``kernel_scope`` sets the priority), so the list is a fallback chain; the rules below only remove
kernels whose *result* would differ from the original (the known traps).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import CausalBias

from attnfuse.kernel_scope import kernel_scope
from attnfuse.memo import host_bool
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import MASKING_THRESHOLD

KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
KERNEL_NAMES = {backend: name for name, backend in KERNELS.items()}
KERNEL_CHOICES = (*KERNELS, "flex")


def validate_kernels(kernels: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    """Check a user's kernel restriction; raises ``ValueError`` naming the valid choices."""
    if kernels is None:
        return None
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    unknown = [k for k in kernels if k not in KERNEL_CHOICES]
    if unknown or not kernels:
        raise ValueError(f"unknown kernel(s) {unknown or kernels}; choose from {sorted(KERNEL_CHOICES)}")
    return kernels


def bias_masks_a_whole_row(bias: torch.Tensor) -> bool:
    """Whether an additive bias masks every key of some query row (a reduction over the bias at every
    call and, eagerly, a host read; see ``attnfuse.memo``).

    Fused kernels recompute the probabilities in the backward pass from a log-sum-exp; for a row of
    ``finfo.min`` entries, ``min + log(S)`` rounds back to ``min`` and the gradients come out ``S``
    times too large (found by the fuzzer, CPU flash; the same recomputation is in the GPU kernels).
    Such calls run unfused, as the original did. Under a compiler the value is unknown: unfused too.
    """
    if not bias.is_floating_point() or bias.shape[-1] == 0:
        return False
    return host_bool((bias.amax(dim=-1) <= MASKING_THRESHOLD).any()) is not False


_FLEX_FAILURES: dict[tuple, str] = {}


def _flex_signature(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], bias_fn: Optional[object],
                    softcap: Optional[float], window: Optional[object]) -> tuple:
    """What a Flex kernel is compiled for: the shapes' head dims and counts, dtypes, and which score
    modifications it carries (a failure for one site's ``score_mod`` says nothing about another's)."""
    return (q.device.type, q.dtype, q.shape[-1], k.shape[-1], q.shape[1], k.shape[1],
            None if bias is None else bias.dtype, None if bias_fn is None else id(bias_fn),
            softcap is not None, window is not None)


def flex_failed(q: torch.Tensor, k: torch.Tensor, error: Exception, bias: Optional[torch.Tensor] = None,
                bias_fn: Optional[object] = None, softcap: Optional[float] = None,
                window: Optional[object] = None) -> None:
    """Remember that FlexAttention could not compile for this kind of call; SDPA takes such calls."""
    _FLEX_FAILURES[_flex_signature(q, k, bias, bias_fn, softcap, window)] = f"{type(error).__name__}: {error}"[:300]


def choose_path(q: torch.Tensor, k: torch.Tensor, *, softcap: Optional[float], window: Optional[int], bias: Optional[torch.Tensor],
                bias_fn: Optional[object], dropout_p: float, needs_grad: bool,
                allowed: Optional[tuple[str, ...]]) -> str:
    """``"sdpa"``, ``"flex"`` or ``"math"`` (unfused) for one call.

    FlexAttention is used on the GPU for what SDPA has no kernel for or runs slower (measured on an
    H100, b=8 h=16 n=4096 d=64 causal: ALiBi 1.04 ms on Flex vs 3.31 ms on cuDNN with the bias
    materialized, a learned (h, n, n) bias 1.39 vs 3.34 ms, a tanh softcap 3.07 ms vs no kernel).
    Flex has no dropout and no CPU backward; there SDPA takes what it can and the rest runs unfused.
    """
    flex_possible = dropout_p == 0 and not (q.device.type == "cpu" and needs_grad)
    flex_only = allowed is not None and set(allowed) == {"flex"}
    if flex_only:
        if not flex_possible:
            raise RuntimeError("attnfuse: the forced kernel 'flex' cannot run this call (FlexAttention has no "
                               "dropout and no backward on the CPU); allow an SDPA kernel too")
        return "flex"
    flex_allowed = flex_possible and (allowed is None or "flex" in allowed) and \
        _flex_signature(q, k, bias, bias_fn, softcap, window) not in _FLEX_FAILURES
    # A plain per-head bias tensor runs faster on Flex too, but only eagerly: under an outer compile a
    # Flex kernel that does not fit the GPU cannot fall back, and SDPA can take the tensor as it is.
    plain_bias_on_flex = bias is not None and bias.dim() >= 3 and bias.shape[-3] > 1 and not is_traced(q)
    # A bias wider than q (fp32 on bf16) must be added in fp32: Flex does; the SDPA kernels on CUDA do not.
    wide_bias_on_flex = bias is not None and bias.dtype != q.dtype and not is_traced(q)
    wants_flex = softcap is not None or bias_fn is not None or window is not None or plain_bias_on_flex or \
        wide_bias_on_flex
    if flex_allowed and wants_flex and q.device.type == "cuda":
        return "flex"
    return "math" if softcap is not None else "sdpa"


def known_traps(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor],
                needs_grad: bool) -> dict[str, str]:
    """Kernels whose result would differ from the original for this call, with the reason (measured traps)."""
    traps = {}
    L, S = q.shape[-2], k.shape[-2]
    if q.is_cuda and attn_mask is not None and needs_grad and (L % 128 == 64 or S % 128 == 64):
        traps["cudnn"] = "cuDNN returns NaN gradients with a mask at lengths 64 mod 128 (pytorch#196678)"
    return traps


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


def kernel_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 needs_grad: bool, allowed: Optional[tuple[str, ...]] = None) -> list[SDPBackend]:
    """SDPA kernels to try for this call, fastest valid first; raises if every allowed kernel is a trap."""
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    order = preferred_order(q.device.type, capability, q.dtype, k.shape[-2], max(q.shape[-1], v.shape[-1]))
    if allowed is not None:
        order = [name for name in order if name in allowed] or list(allowed)
    traps = known_traps(q, k, attn_mask, needs_grad)
    safe = [name for name in order if name not in traps]
    if not safe:
        reasons = "; ".join(traps[name] for name in order)
        raise RuntimeError(f"attnfuse: the forced kernels {list(order)} would give a wrong result here ({reasons}); "
                           "allow another kernel, e.g. 'efficient' or 'math'")
    return [KERNELS[name] for name in safe]


def chosen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: object, dropout_p: float,
                  is_causal: bool, scale: Optional[float], enable_gqa: bool, order: list[SDPBackend]) -> str:
    """The kernel SDPA picks for this call under ``order`` (for the audit)."""
    if isinstance(attn_mask, CausalBias):
        return "efficient (lower-right causal)" if q.device.type == "cuda" else "cpu-math (lower-right causal)"
    try:
        with kernel_scope(order, q):
            index = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                            enable_gqa=enable_gqa)
        name = KERNEL_NAMES.get(SDPBackend(index), "math")
    except Exception:
        name = KERNEL_NAMES[order[0]]
    return name if q.device.type == "cuda" else f"cpu-{name}"


_CAUSAL_KERNELS: dict[tuple, str] = {}


def _causal_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: Optional[float],
                   enable_gqa: bool, order: list[SDPBackend]) -> str:
    """``chosen_kernel`` for an ``is_causal`` call, remembered per call signature (metadata only)."""
    key = (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(-1), k.stride(-1),
           v.stride(-1), dropout_p > 0, enable_gqa, tuple(order), q.requires_grad or k.requires_grad)
    if key not in _CAUSAL_KERNELS:
        _CAUSAL_KERNELS[key] = chosen_kernel(q, k, v, None, dropout_p, True, scale, enable_gqa, order)
    return _CAUSAL_KERNELS[key]


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


def run_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
             dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
             order: list[SDPBackend], strict: bool = False) -> torch.Tensor:
    """SDPA on the first valid kernel of ``order``; the math kernel if every listed one refuses.

    With ``strict`` (the user forced the kernels) a refusal is an error instead of a fallback.
    """
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                  enable_gqa=enable_gqa)
    try:
        with kernel_scope(order, q):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except RuntimeError as error:
        if strict:
            names = [KERNEL_NAMES[b] for b in order]
            raise RuntimeError(f"attnfuse: none of the forced kernels {names} can run this call "
                               f"({error}); allow more kernels, e.g. add 'math'") from error
        with kernel_scope([SDPBackend.MATH], q):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
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

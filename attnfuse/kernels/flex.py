"""Lower to FlexAttention: score modifications SDPA has no kernel for (softcaps, index-function
biases such as ALiBi, learned bias tables) and sliding windows.

The ``score_mod`` of a site is built once and reads its tensors from a holder, so the compiled
kernel is reused across calls; the ``BlockMask`` of a causal or windowed mask is built once per
shape and cached. In eager mode the flex call is compiled (FlexAttention only runs fused when
compiled); under an outer ``torch.compile`` the plain op is traced into the graph.

``FlexKernel`` takes, on CUDA, the calls SDPA has no kernel for or runs slower (measured on an H100,
b=8 h=16 n=4096 d=64 causal: ALiBi 1.04 ms on Flex vs 3.31 ms on cuDNN with the bias materialized, a
learned (h, n, n) bias 1.39 vs 3.34 ms, a tanh softcap 3.07 ms vs no kernel). Flex has no dropout and
no CPU backward; there SDPA takes what it can and the rest runs unfused.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnfuse.caches import Cache
from attnfuse.kernels.call import AttentionCall, Kernel, KernelFailed, refused_by_fused_kernels
from attnfuse.kernels.registry import failure, remember_failure
from attnfuse.precision import internal_dtype
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import causal_offset

_compiled_flex: Cache[Callable] = Cache("kernels.flex.compiled", maxsize=1)
_block_masks: Cache[object] = Cache("kernels.flex.block_masks", maxsize=64)
_score_mods: Cache[tuple[Optional[Callable], "_Holder"]] = Cache("kernels.flex.score_mods", maxsize=256)
_kernel_options: Cache[dict] = Cache("kernels.flex.kernel_options", maxsize=256)
# Triton's default Flex configurations can need more shared memory than the GPU has once the score_mod gathers an
# fp32 bias (H100, d 64, grouped heads: 245760 > 232448 bytes); one pipeline stage fits.
_FEWER_STAGES = {"num_stages": 1}


class _Holder:
    """The tensors a cached ``score_mod`` reads on this call."""

    bias: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None
    leaves: tuple = ()


def _flex() -> Callable:
    return _compiled_flex.get_or_create("flex_attention", lambda: torch.compile(flex_attention, dynamic=False))


def _at(t: torch.Tensor, b, h, i, j):
    """``t[b, h, i, j]`` for a 4-d tensor broadcast against the scores (size-1 dims read index 0)."""
    zero = torch.zeros_like(b)
    return t[tuple(zero if size == 1 else x for size, x in zip(t.shape, (b, h, i, j)))]


def _mask_mod(causal: Optional[str], window: Optional[int], L: int, S: int) -> Callable:
    offset = causal_offset(causal, L, S)

    def keep(b, h, i, j):
        kept = j <= i + offset
        if window is not None:
            kept = kept & (j > i + offset - window)
        return kept

    return keep


def block_mask(causal: Optional[str], window: Optional[int], L: int, S: int, device: torch.device) -> object:
    """The cached ``BlockMask`` of a causal (optionally windowed) mask for ``L`` queries and ``S`` keys."""
    return _block_masks.get_or_create((causal, window, L, S, str(device)), lambda: create_block_mask(
        _mask_mod(causal, window, L, S), None, None, L, S, device=device))


def _score_mod(softcap: Optional[float], has_bias: bool, bias_fn: Optional[Callable], has_keep: bool
               ) -> tuple[Optional[Callable], _Holder]:
    # one holder per thread: two threads running the same kind of site must not read each other's tensors
    key = (softcap, has_bias, id(bias_fn), has_keep, threading.get_ident())
    found = _score_mods.get(key)
    if found is not None:
        return found
    holder = _Holder()
    if softcap is None and not has_bias and bias_fn is None and not has_keep:
        return _score_mods.setdefault(key, (None, holder))

    def score_mod(score, b, h, i, j):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if has_bias:
            score = score + _at(holder.bias, b, h, i, j)
        if bias_fn is not None:
            score = score + bias_fn((b, h, i, j))
        if has_keep:
            score = torch.where(_at(holder.keep, b, h, i, j) > 0, score, -float("inf"))
        return score

    return _score_mods.setdefault(key, (score_mod, holder))


def flex_attend(call: AttentionCall, kernel_options: Optional[dict] = None) -> torch.Tensor:
    """FlexAttention on the call's 4-d q/k/v; masks, biases and softcap as score_mod / BlockMask.

    A bias is gathered in fp32: the original added an fp32 bias in fp32, and Flex gathers fp32 27x
    faster than bf16.
    """
    q, k = call.q, call.k
    L, S = q.shape[-2], k.shape[-2]
    score_mod, holder = _score_mod(call.softcap, call.bias is not None, call.bias_fn, call.keep is not None)
    holder.bias = None if call.bias is None else call.bias.to(internal_dtype(q.dtype))
    # the keep-mask is read as fp32 ones and zeros: a one-byte gather in a score_mod runs many times slower
    holder.keep = None if call.keep is None else call.keep.to(torch.float32)
    blocks = block_mask(call.causal, call.window, L, S, q.device) if call.causal is not None else None
    run = flex_attention if is_traced(q) else _flex()
    return run(q, k, call.v, score_mod=score_mod, block_mask=blocks, scale=call.scale_value,
               enable_gqa=k.shape[1] != q.shape[1], kernel_options=kernel_options)


def _signature(call: AttentionCall) -> tuple:
    """What a Flex kernel is compiled for: the shapes' head dims and counts, dtypes, and which score
    modifications it carries (a failure for one site's ``score_mod`` says nothing about another's)."""
    q, k = call.q, call.k
    return (q.device.type, q.dtype, q.shape[-1], k.shape[-1], q.shape[1], k.shape[1],
            None if call.bias is None else call.bias.dtype, None if call.bias_fn is None else id(call.bias_fn),
            call.softcap is not None, call.window is not None)


class FlexKernel(Kernel):
    """FlexAttention: on CUDA for softcaps, score functions, windows and biases SDPA runs slower or
    rounds; anywhere when forced (``kernels=["flex"]``)."""

    name = "flex"
    choices = ("flex",)
    refuses_by_metadata = True

    def refuses(self, call: AttentionCall) -> Optional[str]:
        q = call.q
        if call.allowed is not None and set(call.allowed) == {"flex"}:
            if call.dropout_p != 0 or (q.device.type == "cpu" and call.needs_grad):
                raise RuntimeError("attnfuse: the forced kernel 'flex' cannot run this call (FlexAttention has no "
                                   "dropout and no backward on the CPU); allow an SDPA kernel too")
            return refused_by_fused_kernels(call)
        if call.dropout_p != 0:
            return "FlexAttention has no dropout"
        if call.needs_grad and q.device.type == "cpu":
            return "FlexAttention has no backward on the CPU"
        if call.allowed is not None and "flex" not in call.allowed:
            return "not among the forced kernels"
        if not _wanted(call):
            return "SDPA runs this call (no softcap, score function, window, per-head or wider bias)"
        if not q.is_cuda:
            return "chosen on CUDA only, where it was measured faster than SDPA"
        failed = failure(self.name, _signature(call))  # after the cheap checks: a look-up a call
        if failed is not None:
            return f"failed before on this kind of call ({failed})"
        return refused_by_fused_kernels(call)

    def run(self, call: AttentionCall) -> torch.Tensor:
        call = call.with_positive_scale()
        signature = _signature(call)
        try:
            out = flex_attend(call, _kernel_options.get(signature))
        except Exception as error:  # e.g. Triton finds no kernel configuration that fits this GPU
            out = self._with_fewer_stages(call, signature, error)
        call.announce(self.name)
        return out

    def _with_fewer_stages(self, call: AttentionCall, signature: tuple, error: Exception) -> torch.Tensor:
        """Compile once more with one pipeline stage where the default configurations ran out of shared memory
        (remembered for the signature); any other failure, or a second one, hands the call on."""
        if "out of resource" in str(error) and _kernel_options.get(signature) is None:
            try:
                out = flex_attend(call, _FEWER_STAGES)
                _kernel_options[signature] = _FEWER_STAGES
                return out
            except Exception as second:
                error = second
        if is_traced(call.q) or (call.allowed is not None and set(call.allowed) == {"flex"}):
            raise error
        remember_failure(self.name, signature, error)
        raise KernelFailed(f"could not compile ({type(error).__name__})") from error


def _wanted(call: AttentionCall) -> bool:
    """Whether the call has what SDPA lacks or runs slower: a softcap, a score function, a window, a
    per-head bias tensor (faster on Flex, but only eagerly: under an outer compile a Flex kernel that
    does not fit the GPU cannot fall back, and SDPA can take the tensor as it is), or a bias wider
    than q (fp32 on bf16), which Flex adds in fp32 and the SDPA kernels on CUDA do not."""
    if call.softcap is not None or call.bias_fn is not None or call.window is not None:
        return True
    bias = call.bias
    if bias is None:
        return False
    per_head = bias.dim() >= 3 and bias.shape[-3] > 1
    return (per_head or bias.dtype != call.q.dtype) and not is_traced(call.q)

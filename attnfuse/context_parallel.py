"""Rewritten sites under PyTorch's context parallel (``torch.distributed.tensor.experimental.context_parallel``).

Inside that context each rank holds a shard of the sequence, and ``F.scaled_dot_product_attention`` is
replaced by a wrapper that hands q, k, v to DTensor, whose handlers ring the CUDA flash, memory-efficient
and cuDNN kernels over the ranks (the math kernel, a mask tensor and CPU kernels are not ringed). A site
rewritten by attnfuse calls SDPA through ``F`` at call time, so its call is the one context parallel
rings; a site whose call cannot be ringed exactly (a mask or bias tensor covers only this rank's shard, a
score function was read at the local length, a per-call check would read only this rank's values) is
refused with ``ContextParallelError`` naming the site, never run locally, which would be silently wrong.

Detection costs one identity comparison per call outside context parallel: ``F.scaled_dot_product_attention``
is the builtin unless context parallel (or another library) replaced it (checked: torch 2.13's
``_context_parallel/_attention.py`` patches ``F`` in ``context_parallel()``; older releases could instead
push a ``TorchFunctionMode``, looked for only while some function mode is on).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from attnfuse.kernels.call import AttentionCall
from attnfuse.kernels.kernel_scope import kernel_scope
from attnfuse.kernels.sdpa import KERNELS, _gradient_in_layout_of, chosen_kernel, kernel_order
from attnfuse.tracing import is_traced

# the builtin itself, not whatever ``F`` holds when attnfuse is imported (possibly inside context parallel)
_PLAIN_SDPA = torch._C._nn.scaled_dot_product_attention
_MODE_ON = torch._C._is_torch_function_mode_enabled
_CP_MODULES = ("torch.distributed.tensor.experimental._context_parallel._attention",
               "torch.distributed.tensor.experimental._attention")
_RINGED = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


class ContextParallelError(RuntimeError):
    """A rewritten site that context parallel cannot run as one GPU would, with the reason and (once known)
    the site: its module path and source line."""

    def __init__(self, reason: str, site: Optional[str] = None) -> None:
        self.reason, self.site = reason, site
        where = f"site {site}" if site else "this attention call"
        super().__init__(f"attnfuse: context parallel cannot run {where}: {reason}. It is refused rather than run "
                         "on this rank's shard alone, which would compute a different function; under context "
                         "parallel a rewritten site may carry a causal mask and nothing else")


_known: dict[int, bool] = {}  # id of a replaced F.scaled_dot_product_attention -> whether context parallel's


def context_parallel_active() -> bool:
    """Whether SDPA calls are being ringed by PyTorch's context parallel right now (one identity check
    when not)."""
    sdpa = F.scaled_dot_product_attention
    if sdpa is _PLAIN_SDPA:
        return _MODE_ON() and _in_function_mode()
    found = _known.get(id(sdpa))
    if found is None:
        found = _known.setdefault(id(sdpa), _replaced_by_context_parallel(sdpa))
    return found


def _replaced_by_context_parallel(sdpa: Callable) -> bool:
    """Whether ``sdpa`` is context parallel's wrapper (its module's record of the functions it replaced)."""
    for name in _CP_MODULES:
        module = sys.modules.get(name)
        replaced = getattr(module, "_replaced_functions", None)
        if replaced is not None and sdpa in replaced:
            return True
    return False


def _in_function_mode() -> bool:
    """Whether a context-parallel ``TorchFunctionMode`` (releases before the monkey-patch dispatch) is on."""
    from torch.overrides import _get_current_function_mode_stack

    return any(type(mode).__module__ in _CP_MODULES for mode in _get_current_function_mode_stack())


def load_balanced() -> bool:
    """Whether context parallel's causal load balancing is on (torch's ``_cp_options``)."""
    for name in _CP_MODULES:
        options = getattr(sys.modules.get(name), "_cp_options", None)
        if options is not None:
            return bool(options.enable_load_balance)
    return False


def refusal(call: AttentionCall) -> Optional[str]:
    """Why context parallel cannot ring ``call`` exactly as one GPU computes it, or None."""
    q, k = call.q, call.k
    if is_traced(q):
        return ("it is being compiled (compiler='inductor' or torch.compile(backend='attnfuse')), which would "
                "fix the call it makes now; use attnfuse.optimize's default compiler='eager' under context parallel")
    if call.keep is not None:
        return ("it carries a mask tensor (padding or another mask) built from this rank's shard: it covers "
                "only this rank's queries and keys, and context parallel rings no mask tensor")
    if call.bias is not None:
        return "it adds a bias tensor built from this rank's shard, and context parallel rings no bias tensor"
    if call.bias_fn is not None:
        return ("it adds a bias computed from positions (ALiBi, relative positions) that was read at this "
                "rank's local length; its values at the global positions are not proven")
    if call.softcap is not None:
        return "it applies a softcap, which the kernels context parallel rings do not have"
    if call.window is not None:
        return "it has a sliding window, which the kernels context parallel rings do not have"
    if q.shape[-2] != k.shape[-2]:
        return (f"its queries ({q.shape[-2]}) and keys ({k.shape[-2]}) differ in length (cross-attention or a "
                "cache): context parallel needs q, k and v sharded alike")
    if call.causal is None and load_balanced():
        return ("it is not causal, and context parallel's load balancing (on) is defined for causal "
                "attention only")
    if not q.is_cuda:
        return (f"its tensors are on {q.device.type}, and context parallel rings only CUDA's flash, "
                "memory-efficient and cuDNN kernels")
    return None


def attend_context_parallel(call: AttentionCall) -> torch.Tensor:
    """The call on the SDPA kernels context parallel rings (never the math kernel, never unfused)."""
    reason = refusal(call)
    if reason is not None:
        raise ContextParallelError(reason)
    call = call.with_positive_scale()
    q, k, v = call.q, call.k, call.v
    allowed = None if call.allowed is None else tuple(name for name in call.allowed if name in KERNELS)
    order = [backend for backend in kernel_order(q, k, v, None, call.needs_grad, allowed)
             if backend in _RINGED] if allowed != () else []
    if not order:
        raise ContextParallelError(f"none of the allowed kernels {list(call.allowed or ())} is one context "
                                   "parallel rings (cudnn, flash, efficient)")
    is_causal, enable_gqa = call.causal is not None, k.shape[1] != q.shape[1]
    if call.on_kernel is not None:  # the kernel each ring step runs (chosen on the local shard)
        name = chosen_kernel(q, k, v, None, call.dropout_p, is_causal, call.scale, enable_gqa, order)
        call.announce(f"{name} (context parallel)")
    try:
        with kernel_scope(order, q):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout_p, is_causal=is_causal,
                                                 scale=call.scale, enable_gqa=enable_gqa)
    except (RuntimeError, AssertionError) as error:  # e.g. no ringed kernel takes these shapes
        raise ContextParallelError(f"context parallel's SDPA failed ({type(error).__name__}: {error})") from error
    if out.requires_grad and not is_traced(q):  # the ring's backward runs the same kernels: same layout trap
        out.register_hook(_gradient_in_layout_of(out))
    return out


def feed_positions(module: torch.nn.Module, positions: torch.Tensor,
                   argument: str = "position_ids") -> torch.utils.hooks.RemovableHandle:
    """Make ``module`` (a rotary embedding) read ``positions`` as its ``argument`` on every call.

    Under context parallel a model that derives positions from its local length computes them for the
    wrong tokens; shard the global positions with the tokens and feed them here (e.g. transformers'
    ``model.model.rotary_emb``). Call ``.remove()`` on the returned handle to stop.
    """
    def pre_hook(_module, args, kwargs):
        if argument in kwargs or len(args) < 2:
            return args, {**kwargs, argument: positions}
        return (args[0], positions, *args[2:]), kwargs

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

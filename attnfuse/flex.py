"""Lower to FlexAttention: score modifications SDPA has no kernel for (softcaps, index-function
biases such as ALiBi, learned bias tables) and sliding windows.

The ``score_mod`` of a site is built once and reads its tensors from a holder, so the compiled
kernel is reused across calls; the ``BlockMask`` of a causal or windowed mask is built once per
shape and cached. In eager mode the flex call is compiled (FlexAttention only runs fused when
compiled); under an outer ``torch.compile`` the plain op is traced into the graph.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnfuse.tracing import is_traced
from attnfuse.vocabulary import causal_offset

_compiled_flex: list[Callable] = []
_block_masks: "OrderedDict[tuple, object]" = OrderedDict()
_score_mods: dict[tuple, tuple[Callable, "_Holder"]] = {}
_CACHE_SIZE = 64


class _Holder:
    """The tensors a cached ``score_mod`` reads on this call."""

    bias: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None
    leaves: tuple = ()


def _flex() -> Callable:
    if not _compiled_flex:
        _compiled_flex.append(torch.compile(flex_attention, dynamic=False))
    return _compiled_flex[0]


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
    key = (causal, window, L, S, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(_mask_mod(causal, window, L, S), None, None, L, S, device=device)
        if len(_block_masks) > _CACHE_SIZE:
            _block_masks.popitem(last=False)
    _block_masks.move_to_end(key)
    return _block_masks[key]


def _score_mod(softcap: Optional[float], has_bias: bool, bias_fn: Optional[Callable], has_keep: bool
               ) -> tuple[Optional[Callable], _Holder]:
    key = (softcap, has_bias, id(bias_fn), has_keep)
    if key in _score_mods:
        return _score_mods[key]
    holder = _Holder()
    if softcap is None and not has_bias and bias_fn is None and not has_keep:
        _score_mods[key] = (None, holder)
        return _score_mods[key]

    def score_mod(score, b, h, i, j):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if has_bias:
            score = score + _at(holder.bias, b, h, i, j)
        if bias_fn is not None:
            score = score + bias_fn((b, h, i, j))
        if has_keep:
            score = torch.where(_at(holder.keep, b, h, i, j), score, -float("inf"))
        return score

    _score_mods[key] = (score_mod, holder)
    return _score_mods[key]


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], bias_fn: Optional[Callable], causal: Optional[str],
                window: Optional[int], softcap: Optional[float], scale: Optional[float],
                enable_gqa: bool) -> torch.Tensor:
    """FlexAttention on 4-d q/k/v; masks, biases and softcap as score_mod / BlockMask."""
    L, S = q.shape[-2], k.shape[-2]
    score_mod, holder = _score_mod(softcap, bias is not None, bias_fn, keep is not None)
    holder.bias = bias
    holder.keep = keep
    blocks = block_mask(causal, window, L, S, q.device) if causal is not None else None
    run = flex_attention if is_traced(q) else _flex()
    return run(q, k, v, score_mod=score_mod, block_mask=blocks, scale=scale, enable_gqa=enable_gqa)

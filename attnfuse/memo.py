"""Facts about a tensor's contents, computed once per unchanged tensor instead of at every call.

A model hands the same mask object to every layer, and a serving loop or benchmark often reuses one
mask for many calls. Some facts about a mask cost a host synchronization to learn (does any query
row lose every key?) or a kernel launch to build (its negation); ``ContentMemo`` keeps them for as
long as the tensor lives and is unchanged. PyTorch bumps a tensor's version counter, shared with
all its views, on every in-place write, so a stored fact is used only while the contents are the
ones it was computed from. Tensors without a version counter (inference mode), tensors seen by a
compiler's tracer and tensors on a stream being captured into a CUDA graph are never memoized.
Writes that bypass the version counter (through ``tensor.data`` or a NumPy view) are not seen.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary


MAX_FACTS_PER_TENSOR = 64


def memoizable(tensor: torch.Tensor) -> bool:
    """Whether facts about ``tensor`` may be stored: a real tensor with a version counter, in eager mode."""
    from attnfuse.masking import is_traced

    if tensor.is_inference() or is_traced(tensor):
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def _base_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage and version counter ``tensor`` shares (itself unless a view)."""
    return tensor if tensor._base is None else tensor._base


class ContentMemo:
    """``get(tensor, key, compute)``: ``compute()`` once per (tensor contents, key).

    Entries are held by the tensor's base (views of one tensor share it) and dropped with it. A
    stored value must not refer to the tensor itself (that would keep it alive forever).
    """

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, tensor: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        if not memoizable(tensor):
            return compute()
        base = _base_of(tensor)
        identity = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype, key)
        facts = self._entries.get(base)
        if facts is None or facts[0] != tensor._version:
            facts = (tensor._version, {})  # an in-place write invalidates everything known about the base
            self._entries[base] = facts
        if identity not in facts[1]:
            if len(facts[1]) >= MAX_FACTS_PER_TENSOR:  # e.g. a long-lived mask sliced anew at every decoding step
                del facts[1][next(iter(facts[1]))]
            facts[1][identity] = compute()
        return facts[1][identity]

    def __len__(self) -> int:
        return len(self._entries)

    def facts_about(self, tensor: torch.Tensor) -> int:
        """How many facts are stored for ``tensor``'s base (for tests)."""
        facts = self._entries.get(_base_of(tensor))
        return 0 if facts is None else len(facts[1])

"""``kernel_scope(order)``: SDPA's ``sdpa_kernel(order, set_priority=True)``, cheap enough for every call.

The public context manager rebuilds its state through string lookups and ``contextlib`` and costs
about 60 us per call on a 2-core CPU (measured with cProfile, torch 2.13) - as much as a whole
small attention call on a GPU. This one sets the same global flags and priority order through
prebound functions and restores them on exit. Under a compiler's tracer the public one is used,
since Dynamo knows how to trace it.
"""
from __future__ import annotations

from typing import ContextManager, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnfuse.tracing import is_traced

_FLAG_NAMES = {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "mem_efficient",
               "MATH": "math", "OVERRIDEABLE": "overrideable"}


def _bind_flags() -> list:
    """(backend id, getter, setter) per SDPA flag, then the priority order's; empty if torch lacks one."""
    try:
        return [(int(getattr(SDPBackend, backend)), getattr(torch._C, f"_get_{name}_sdp_enabled"),
                 getattr(torch._C, f"_set_sdp_use_{name}")) for backend, name in _FLAG_NAMES.items()] + \
            [(None, torch._C._get_sdp_priority_order, torch._C._set_sdp_priority_order)]
    except AttributeError:
        return []


_FLAGS = _bind_flags()


_IDS = {backend: int(backend) for backend in SDPBackend.__members__.values()} if _FLAGS else {}
_GETTERS = tuple(get for _, get, _ in _FLAGS[:-1])
_FLAG_SETTERS = tuple(set_flag for _, _, set_flag in _FLAGS[:-1])
_GET_PRIORITY = _FLAGS[-1][1] if _FLAGS else None
_SET_PRIORITY = _FLAGS[-1][2] if _FLAGS else None


def _current_flags() -> tuple[bool, ...]:
    """Each SDPA flag's current value, in ``_FLAG_NAMES``' order (one C call a flag, no loop)."""
    cudnn, flash, efficient, math, overrideable = _GETTERS
    return cudnn(), flash(), efficient(), math(), overrideable()


class _OrderState:
    """What the scope of one order sets, worked out once per order: each flag's value, and the priority order
    for each priority order found current on entering."""

    __slots__ = ("wanted", "flags", "priorities")

    def __init__(self, order: tuple[SDPBackend, ...]) -> None:
        self.wanted = [_IDS[backend] if backend in _IDS else int(backend) for backend in order]
        self.flags = tuple(backend in self.wanted for backend, _, _ in _FLAGS[:-1])
        self.priorities: dict[tuple[int, ...], list[int]] = {}

    def priority(self, current: list[int]) -> list[int]:
        key = tuple(current)
        found = self.priorities.get(key)
        if found is None:
            found = self.priorities.setdefault(key, self.wanted + [b for b in current if b not in self.wanted])
        return found


_STATES: dict[tuple[SDPBackend, ...], _OrderState] = {}  # per order (a handful: the kernel orders attnfuse tries)


class _Scope:
    """Sets only the flags and priority that differ from the current state, and restores only those (the usual
    call, whose flags already match, compares one tuple)."""

    __slots__ = ("state", "saved_flags", "saved_priority")

    def __init__(self, state: _OrderState) -> None:
        self.state = state

    def __enter__(self) -> None:
        wanted = self.state.flags
        current = _current_flags()
        if current == wanted:
            self.saved_flags = None
        else:
            self.saved_flags = current
            for set_flag, value, was in zip(_FLAG_SETTERS, wanted, current):
                if value != was:
                    set_flag(value)
        priority = _GET_PRIORITY()
        target = self.state.priority(priority)
        if target == priority:
            self.saved_priority = None
        else:
            self.saved_priority = priority
            _SET_PRIORITY(target)

    def __exit__(self, *exc) -> None:
        saved = self.saved_flags
        if saved is not None:
            for set_flag, value, was in zip(_FLAG_SETTERS, saved, self.state.flags):
                if value != was:
                    set_flag(value)
        if self.saved_priority is not None:
            _SET_PRIORITY(self.saved_priority)


def kernel_scope(order: Sequence[SDPBackend], q: torch.Tensor) -> ContextManager:
    """Only the kernels of ``order`` enabled, tried in that order, for SDPA calls inside the scope."""
    if not _FLAGS or is_traced(q):
        return sdpa_kernel(list(order), set_priority=True)
    key = tuple(order)
    state = _STATES.get(key)
    if state is None:
        state = _STATES.setdefault(key, _OrderState(key))
    return _Scope(state)

"""``kernel_scope(order)``: SDPA's ``sdpa_kernel(order, set_priority=True)``, cheap enough for every call.

The public context manager rebuilds its state through string lookups and ``contextlib`` and costs
about 60 us per call on a 2-core CPU (measured with cProfile, torch 2.13) - as much as a whole
small attention call on a GPU. This one sets the same global flags and priority order through
prebound functions and restores them on exit. Under a compiler's tracer the public one is used,
since Dynamo knows how to trace it.
"""
from __future__ import annotations

from typing import ContextManager

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
_GETTERS = tuple(get for _, get, _ in _FLAGS)
_FLAG_SETTERS = tuple(set_flag for _, _, set_flag in _FLAGS[:-1])
_SET_PRIORITY = _FLAGS[-1][2] if _FLAGS else None


class _OrderState:
    """What the scope of one order sets, worked out once per order: each flag's value, and the priority order
    for each priority order found current on entering."""

    __slots__ = ("wanted", "flags", "priorities")

    def __init__(self, order: tuple[SDPBackend, ...]) -> None:
        self.wanted = [_IDS[backend] if backend in _IDS else int(backend) for backend in order]
        self.flags = [backend in self.wanted for backend, _, _ in _FLAGS[:-1]]
        self.priorities: dict[tuple[int, ...], list[int]] = {}

    def priority(self, current: list[int]) -> list[int]:
        key = tuple(current)
        found = self.priorities.get(key)
        if found is None:
            found = self.priorities.setdefault(key, self.wanted + [b for b in current if b not in self.wanted])
        return found


_STATES: dict[tuple[SDPBackend, ...], _OrderState] = {}  # per order (a handful: the kernel orders attnfuse tries)


class _Scope:
    """Sets only the flags and priority that differ from the current state, and restores only those."""

    __slots__ = ("state", "saved", "priority_set")

    def __init__(self, state: _OrderState) -> None:
        self.state = state

    def __enter__(self) -> None:
        saved = self.saved = [get() for get in _GETTERS]
        for set_flag, value, current in zip(_FLAG_SETTERS, self.state.flags, saved):
            if value != current:
                set_flag(value)
        priority = self.state.priority(saved[-1])
        self.priority_set = priority != saved[-1]
        if self.priority_set:
            _SET_PRIORITY(priority)

    def __exit__(self, *exc) -> None:
        saved = self.saved
        for set_flag, value, current in zip(_FLAG_SETTERS, saved, self.state.flags):
            if value != current:
                set_flag(value)
        if self.priority_set:
            _SET_PRIORITY(saved[-1])


def kernel_scope(order: list[SDPBackend], q: torch.Tensor) -> ContextManager:
    """Only the kernels of ``order`` enabled, tried in that order, for SDPA calls inside the scope."""
    if not _FLAGS or is_traced(q):
        return sdpa_kernel(order, set_priority=True)
    key = tuple(order)
    state = _STATES.get(key)
    if state is None:
        state = _STATES.setdefault(key, _OrderState(key))
    return _Scope(state)

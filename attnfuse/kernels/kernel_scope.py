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


class _Scope:
    __slots__ = ("wanted", "saved")

    def __init__(self, order: list[SDPBackend]) -> None:
        self.wanted = [_IDS[backend] if backend in _IDS else int(backend) for backend in order]

    def __enter__(self) -> None:
        self.saved = [get() for _, get, _ in _FLAGS]
        priority = self.saved[-1]
        wanted = self.wanted
        for backend, _, set_flag in _FLAGS[:-1]:
            set_flag(backend in wanted)
        _FLAGS[-1][2](wanted + [backend for backend in priority if backend not in wanted])

    def __exit__(self, *exc) -> None:
        for value, (_, _, set_flag) in zip(self.saved, _FLAGS):
            set_flag(value)


def kernel_scope(order: list[SDPBackend], q: torch.Tensor) -> ContextManager:
    """Only the kernels of ``order`` enabled, tried in that order, for SDPA calls inside the scope."""
    if not _FLAGS or is_traced(q):
        return sdpa_kernel(order, set_priority=True)
    return _Scope(order)

"""The kernels ``attend`` tries, in order, and what it remembers of their failures.

``attend`` runs a call on the first registered kernel that does not refuse it. This module imports only
``attnfuse.caches`` (a leaf), so a kernel module can register itself and record failures without a cycle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from attnfuse.caches import Cache

if TYPE_CHECKING:
    from attnfuse.kernels.call import Kernel

_KERNELS: list["Kernel"] = []
_CHANGES = [0]  # how often the order changed: a call's remembered launch holds for one order only
_FAILURES: Cache[str] = Cache("kernels.failures", maxsize=1024)


def register(kernel: "Kernel", before: Optional[str] = None) -> None:
    """Add ``kernel`` to the order, in front of the kernel named ``before`` (at the end if None)."""
    if any(known.name == kernel.name for known in _KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    names = [known.name for known in _KERNELS]
    if before is not None and before not in names:
        raise ValueError(f"no kernel named {before!r} to register {kernel.name!r} before; registered: {names}")
    _KERNELS.insert(len(_KERNELS) if before is None else names.index(before), kernel)
    _CHANGES[0] += 1


def unregister(name: str) -> "Kernel":
    """Remove the kernel named ``name`` from the order and return it."""
    for i, kernel in enumerate(_KERNELS):
        if kernel.name == name:
            _CHANGES[0] += 1
            return _KERNELS.pop(i)
    raise ValueError(f"no kernel named {name!r} is registered")


def kernels() -> tuple["Kernel", ...]:
    """The registered kernels, in the order ``attend`` tries them."""
    return tuple(_KERNELS)


def order_changes() -> int:
    """How often the order changed (``register``, ``unregister``): part of the key of a remembered launch."""
    return _CHANGES[0]


def kernel_choices() -> tuple[str, ...]:
    """The names a user may force with ``kernels=``: each registered kernel's ``choices``."""
    return tuple(choice for kernel in _KERNELS for choice in kernel.choices)


def validate_kernels(kernels: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    """Check a user's kernel restriction; raises ``ValueError`` naming the valid choices."""
    if kernels is None:
        return None
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    choices = kernel_choices()
    unknown = [k for k in kernels if k not in choices]
    if unknown or not kernels:
        raise ValueError(f"unknown kernel(s) {unknown or kernels}; choose from {sorted(choices)}")
    return kernels


def remember_failure(kernel: str, signature: tuple, error: BaseException) -> None:
    """Remember that ``kernel`` failed for calls of ``signature``; it then refuses such calls."""
    _FAILURES[(kernel, signature)] = f"{type(error).__name__}: {error}"[:300]


def failure(kernel: str, signature: tuple) -> Optional[str]:
    """The error ``kernel`` failed with for calls of ``signature``, or None if it has not failed."""
    return _FAILURES.get((kernel, signature))

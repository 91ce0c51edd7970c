"""Every cache attnfuse keeps between calls, registered by name so that ``attnfuse.reset()`` clears them all.

A module that remembers something across calls (a compiled kernel, a failure, a backend object) makes
one ``Cache(name, maxsize)`` at import time instead of a plain dict: it is bounded (the least recently
used entry goes first), safe to use from several threads, and cleared by ``reset``. Registries that
define behaviour (the spelling rules of ``attnfuse.canonical``) are not caches and are never cleared.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Generic, Hashable, Iterator, TypeVar

import torch

V = TypeVar("V")
_MISSING = object()
_REGISTRY: dict[str, "Cache"] = {}
_REGISTRY_LOCK = threading.Lock()


class Cache(Generic[V]):
    """A bounded, thread-safe mapping registered under ``name``: ``get`` / ``put`` (or ``[]``), ``in``,
    ``len``, ``clear``; reading an entry makes it the most recently used. A key that cannot be hashed (one holding
    sizes a tracer made symbolic, in a graph compiled for dynamic shapes) is never stored and never found."""

    def __init__(self, name: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"Cache {name!r}: maxsize must be at least 1, got {maxsize}")
        self.name, self.maxsize = name, maxsize
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        with _REGISTRY_LOCK:
            if name in _REGISTRY:
                raise ValueError(f"a cache named {name!r} is already registered")
            _REGISTRY[name] = self

    def _locked(self) -> ContextManager:
        """The cache's lock; none while Dynamo traces a caller (it cannot trace a lock, and tracing runs in one
        thread): the entries are then read as plain Python state."""
        return nullcontext() if torch.compiler.is_compiling() else self._lock

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value stored for ``key`` (now the most recently used), else ``default``."""
        if torch.compiler.is_compiling():  # ``_locked``'s choice, made inline: this look-up runs at every fused call
            return self._get(key, default)
        with self._lock:
            return self._get(key, default)

    def peek(self, key: Hashable, default: Any = None) -> Any:
        """The value stored for ``key``, else ``default``, read without the lock and without making the entry the most
        recently used: for caches of values cheap to rebuild, read at every fused call (one dict read is atomic)."""
        try:
            return self._entries.get(key, default)
        except TypeError:  # an unhashable key (symbolic sizes)
            return default

    def _get(self, key: Hashable, default: Any) -> Any:
        try:
            value = self._entries.get(key, _MISSING)
        except TypeError:  # an unhashable key (symbolic sizes)
            return default
        if value is _MISSING:
            return default
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` for ``key``, dropping the least recently used entry beyond ``maxsize``."""
        with self._locked():
            try:
                self._entries[key] = value
            except TypeError:  # an unhashable key (symbolic sizes)
                return
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def setdefault(self, key: Hashable, value: V) -> V:
        """The value stored for ``key``; ``value`` is stored first if there is none (one winner across threads)."""
        with self._locked():
            try:
                found = self._entries.get(key, _MISSING)
            except TypeError:  # an unhashable key (symbolic sizes)
                return value
            if found is not _MISSING:
                self._entries.move_to_end(key)
                return found
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return value

    def get_or_create(self, key: Hashable, create: Callable[[], V]) -> V:
        """The value stored for ``key``, else ``create()``'s, stored. ``create`` runs outside the lock (it may
        compile or take long); if two threads create at once, the first one stored is kept and returned to both.
        A key that cannot be hashed is not stored (``Cache``): ``create()`` runs for it each time."""
        value = self.get(key, _MISSING)
        return self.setdefault(key, create()) if value is _MISSING else value

    def __getitem__(self, key: Hashable) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value: V) -> None:
        self.put(key, value)

    def __contains__(self, key: Hashable) -> bool:
        with self._locked():
            try:
                return key in self._entries
            except TypeError:  # an unhashable key (symbolic sizes)
                return False

    def __len__(self) -> int:
        with self._locked():
            return len(self._entries)

    def items(self) -> list[tuple[Hashable, V]]:
        """A snapshot of the entries, least recently used first."""
        with self._locked():
            return list(self._entries.items())

    def clear(self) -> None:
        with self._locked():
            self._entries.clear()

    def __repr__(self) -> str:
        return f"Cache({self.name!r}, {len(self)}/{self.maxsize})"


def registered() -> Iterator[Cache]:
    """Every cache registered so far."""
    with _REGISTRY_LOCK:
        return iter(list(_REGISTRY.values()))


def reset() -> None:
    """Clear every registered cache: compiled kernels, remembered failures, tuned kernel choices and shared
    backends are rebuilt on next use. Models already optimized keep running; their next new shape or
    re-optimization starts from empty caches."""
    for cache in registered():
        cache.clear()

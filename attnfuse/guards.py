"""Guards: causal masks read from module buffers (nanoGPT's registered ``tril``), kept correct if the
buffer changes after capture.

The rewrite runs such a site on the kernels' causal path. Each call recomputes the mask from the
buffers with the original's own ops and compares it with the causal triangle: the work the original
did per call on its mask (a pass over the ``(L, S)`` slice), one comparison, and, on CUDA, one host
synchronization (``attnfuse.memo``: a check keyed by ``data_ptr`` and ``_version`` misses writes
through ``.data``, whose version counter is separate, and through NumPy views). If the buffer no
longer holds the triangle, the recomputed mask is used as a plain mask for that call. Under a
compiler or CUDA-graph capture, where nothing can be read, the recomputed mask is always used.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from attnfuse.masking import causal_keep
from attnfuse.memo import host_bool, host_readable
from attnfuse.original import original_program

MAX_TRIANGLES = 16  # triangles kept per site, one per (L, S, device) seen


class CausalGuard:
    """Checks, per call, that a buffer-built mask is still the causal triangle it was proven to be."""

    def __init__(self, mask: Node, negated: bool, buffers: list[Node], alignment: str) -> None:
        self.compute, extras = original_program(mask, buffers)
        if extras:  # the matcher reads a buffer mask by value only when it depends on nothing else
            raise ValueError(f"attnfuse: the buffer mask also reads {[n.name for n in extras]}")
        self.negated, self.alignment = negated, alignment
        self._triangles: dict[tuple, torch.Tensor] = {}

    def _triangle(self, L: int, S: int, device: torch.device) -> torch.Tensor:
        key = (L, S, str(device))
        if key not in self._triangles:
            if len(self._triangles) >= MAX_TRIANGLES:
                self._triangles.clear()
            self._triangles[key] = causal_keep(L, S, self.alignment, device)
        return self._triangles[key]

    def changed_mask(self, buffers: tuple, L: int, S: int) -> Optional[torch.Tensor]:
        """None while the mask is still causal; else the keep-mask to use instead of the causal flag."""
        value = self.compute(*buffers)
        keep = ~value if self.negated else value
        if host_readable(keep) and keep.dtype == torch.bool and tuple(keep.shape[-2:]) == (L, S):
            if host_bool((keep == self._triangle(L, S, keep.device)).all()):
                return None
        return keep

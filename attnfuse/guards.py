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
from torch import fx
from torch.fx import Node

from attnfuse.masking import causal_keep
from attnfuse.memo import host_bool, host_readable

MAX_TRIANGLES = 16  # triangles kept per site, one per (L, S, device) seen


def extract_function(output: Node, inputs: list[Node]) -> fx.GraphModule:
    """A small GraphModule computing ``output`` from ``inputs`` with the graph's own ops."""
    graph, env = fx.Graph(), {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    order = {node: i for i, node in enumerate(output.graph.nodes)}
    needed, pending = set(), [output]
    while pending:
        node = pending.pop()
        if node in needed or node in env:
            continue
        needed.add(node)
        pending.extend(node.all_input_nodes)
    for node in sorted(needed, key=order.__getitem__):
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(env[output])
    return fx.GraphModule(torch.nn.Module(), graph)


class CausalGuard:
    """Checks, per call, that a buffer-built mask is still the causal triangle it was proven to be."""

    def __init__(self, mask: Node, negated: bool, buffers: list[Node], alignment: str) -> None:
        self.compute = extract_function(mask, buffers)
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

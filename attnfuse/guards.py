"""Guards: causal masks read from module buffers (nanoGPT's registered ``tril``), kept correct if the
buffer changes after capture.

The rewrite runs such a site on the kernels' causal path. Each call compares the buffers' storage
and version counter with what the mask was proven on (no tensor is read); if a buffer was replaced
or written to, the mask is recomputed from it by the original ops, proven again, and used as a
plain mask if it is no longer the causal triangle.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx
from torch.fx import Node

from attnfuse.masking import causal_keep, is_traced


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


def _state(buffers: tuple) -> tuple:
    return tuple((b.data_ptr(), b._version) for b in buffers)


class CausalGuard:
    """Checks, per call, that a buffer-built mask is still the causal triangle it was proven to be."""

    def __init__(self, mask: Node, negated: bool, buffers: list[Node], alignment: str) -> None:
        self.compute = extract_function(mask, buffers)
        self.negated, self.alignment = negated, alignment
        self.proven = _state(tuple(node.meta["attnfuse_buffer_value"] for node in buffers))

    def changed_mask(self, buffers: tuple, L: int, S: int) -> Optional[torch.Tensor]:
        """None while the mask is still causal; else the keep-mask to use instead of the causal flag."""
        if not is_traced(buffers[0]) and _state(buffers) == self.proven:
            return None
        value = self.compute(*buffers)
        keep = ~value if self.negated else value
        if not is_traced(buffers[0]):
            triangle = causal_keep(L, S, self.alignment, keep.device)
            if keep.shape[-2:] == (L, S) and bool((keep == triangle).all()):
                self.proven = _state(buffers)
                return None
        return keep

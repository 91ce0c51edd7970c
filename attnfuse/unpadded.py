"""A causal (or no) mask ANDed with key padding, run without the padding on the calls where it keeps every key.

transformers' eager models build one ``(B, 1, L, S)`` mask, ``causal & padding[b, kv]``, from the
``attention_mask`` the caller passes, also where it is all ones (data collators and ``generate`` pass one). SDPA
sites take such a mask whole (``match._uses_key_masks``), so every call of every layer adds a dense mask on a kernel
that reads it, where transformers' own ``sdpa`` path reads the padding once a forward and, with none, runs the causal
flag. Here each graph gets one node, ``keeps_every_key(*padding)``, after the padding it reads: one host read per
graph call (a synchronization on CUDA), however many layers read it. On a call where it is True a site runs the
kernels' causal path (or no mask) without its mask; otherwise with the mask, as before.

Exact by construction: where the padding keeps every key, the mask is the triangle, and the matcher proved that the
triangle leaves every row a key and that the site's fill absorbs every score (``match._unpadded``), so the causal
path gives the same weights. The read is a fact of this graph call, of padding the graph built and no op writes
(``attnfuse.memo``'s rule: nothing is remembered across calls). Under a tracer or CUDA-graph capture nothing is read
and the mask is used whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Graph, Node

from attnfuse.memo import host_bools, host_readable
from attnfuse.vocabulary import KeepMask


@dataclass(frozen=True)
class Unpadded:
    """What a site's one mask is where its key padding keeps every key: the causal triangle at ``causal``, or (None)
    nothing; ``padding``: the key-padding keep-masks the mask ANDed in."""

    causal: Optional[str]
    padding: tuple[KeepMask, ...]


class UnpaddedCalls:
    """A site's reading of its padding on each call, and the counts the report shows (``calls``: calls run without
    the mask, ``"causal"``, and with it, ``"as given"``)."""

    def __init__(self, causal: Optional[str]) -> None:
        self.causal = causal
        self.calls = {"causal": 0, "as given": 0, "proven": 0}

    def drops_mask(self, read: Optional[bool]) -> bool:
        """Whether this call runs without its mask (``read``: the graph call's ``keeps_every_key``), counted."""
        if read is None:  # nothing could be read (a tracer): not a call the report counts
            return False
        self.calls["causal" if read else "as given"] += 1
        return read


def keeps_every_key(*padding: torch.Tensor, negated: tuple[bool, ...]) -> Optional[bool]:
    """Whether the boolean key-padding masks keep every key on this call (one host read for all of them); None where
    nothing can be read (under a tracer or CUDA-graph capture). ``negated``: per mask, whether True marks a masked
    key."""
    if not all(host_readable(mask) for mask in padding):
        return None
    values = host_bools(*(mask.any() if flip else mask.all() for mask, flip in zip(padding, negated)))
    if values is None:
        return None
    return all(value != flip for value, flip in zip(values, negated))


def padding_read(graph: Graph, unpadded: Unpadded) -> Node:
    """The graph's ``keeps_every_key`` node for ``unpadded``'s padding: the one already there, or a new one placed
    after the last of the masks it reads (after the graph's inputs where a mask is one)."""
    nodes = tuple(mask.node for mask in unpadded.padding)
    negated = tuple(mask.negated for mask in unpadded.padding)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is keeps_every_key and node.args == nodes and \
                node.kwargs.get("negated") == negated:
            return node
    order = {node: i for i, node in enumerate(graph.nodes)}
    last = max(nodes, key=order.__getitem__)
    if last.op == "placeholder":
        last = [node for node in graph.nodes if node.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return graph.call_function(keeps_every_key, nodes, {"negated": negated})

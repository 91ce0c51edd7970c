"""Key padding that keeps every key on a call is left out of that call: a batch without padding runs unmasked.

Models mask padded keys with a tensor built from the caller's ``attention_mask``, also where it is all ones (data
collators and ``generate`` pass one). That padding reaches a site in one of three shapes:

* transformers' eager masks: one ``(B, 1, L, S)`` mask, ``causal & padding[b, kv]`` (or the padding alone), which
  SDPA sites take whole (``match._uses_key_masks``);
* a key-padding term of its own beside the site's causal flag: a ``(B, 1, 1, S)`` keep-mask filled into the scores
  (``masked_fill(am == 0, fill)``) or bias added to them (BERT's and GPT-2's ``(1 - am) * finfo.min``);
* the padding keep-masks an added window mask is read into, beside the window (``attnfuse.added_masks``).

Either way every call of every layer would run on a kernel that reads a mask, where transformers' own ``sdpa`` path
reads the padding once a forward and, with none, runs the causal flag. Here each graph gets one node,
``keeps_every_key(*padding)``, after the padding it reads: one host read per graph call (a synchronization on
CUDA), however many layers read it. On a call where it is True a site runs without the mask: the causal triangle
the whole mask holds (or nothing), or its own causal flag without the padding term.

Exact by construction: where the padding keeps every key, the whole mask is the triangle, which the matcher proved
to leave every row a key and whose fill it proved to absorb every score (``match._unpadded``); a keep-mask that keeps
every key masks nothing, and an additive term that is 0 everywhere adds nothing. The read is a fact of this graph
call, of padding no op of the graph writes (``attnfuse.memo``'s rule: nothing is remembered across calls). Under a
tracer or CUDA-graph capture nothing is read and the mask is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Graph, Node

from attnfuse.fx_utils import has_side_effect, is_written, target_name
from attnfuse.memo import host_bools, host_readable


KEEPS, MASKS, ZERO = "keeps", "masks", "zero"  # how a padding tensor keeps a key: True keeps it, True masks it, 0


@dataclass(frozen=True)
class Unpadded:
    """What a site runs as on a call whose key padding keeps every key: the causal triangle at ``causal``, or (None)
    no mask; ``padding``: the tensors read, with how each keeps a key (``KEEPS``, ``MASKS``, ``ZERO``). ``whole``: the
    site's one mask holds the triangle and the padding in one tensor (else the padding is the site's one mask or
    bias, beside its own causal flag)."""

    causal: Optional[str]
    padding: tuple[tuple[Node, str], ...]
    whole: bool


class UnpaddedCalls:
    """A site's reading of its padding on each call, and the counts the report shows (``calls``: calls run without
    the mask, ``"causal"``, and with it, ``"as given"``). ``fill_proven``: without the padding the site's fill is
    proven to mask (it absorbs every score; only the padding's values made it a per-call check, ``dominance``)."""

    def __init__(self, causal: Optional[str], fill_proven: bool) -> None:
        self.causal, self.fill_proven = causal, fill_proven
        self.calls = {"causal": 0, "as given": 0, "proven": 0}

    def drops_mask(self, read: Optional[bool]) -> bool:
        """Whether this call runs without its mask (``read``: the graph call's ``keeps_every_key``), counted."""
        if read is None:  # nothing could be read (a tracer): not a call the report counts
            return False
        self.calls["causal" if read else "as given"] += 1
        return read


def keeps_every_key(*padding: torch.Tensor, reads: tuple[str, ...]) -> Optional[bool]:
    """Whether the key-padding tensors keep every key on this call (one host read for all of them); None where
    nothing can be read (under a tracer or CUDA-graph capture). ``reads``: per tensor, how it keeps a key."""
    if not all(host_readable(tensor) for tensor in padding):
        return None
    values = host_bools(*(_keeps_all(tensor, how) for tensor, how in zip(padding, reads)))
    return None if values is None else all(values)


def _keeps_all(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how == KEEPS:
        return tensor.all()
    if how == MASKS:
        return ~tensor.any()
    return (tensor == 0).all()  # an added term: NaN is no 0


def padding_read(graph: Graph, unpadded: Unpadded) -> Node:
    """The graph's ``keeps_every_key`` node for ``unpadded``'s padding: one already there that reads the same values
    (the same tensors, or the same pure ops of the same unwritten inputs: a model that builds its padding mask in
    every layer), or a new one placed after the last of the tensors it reads (after the graph's inputs where one is
    an input)."""
    nodes = tuple(node for node, _ in unpadded.padding)
    reads = tuple(how for _, how in unpadded.padding)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is keeps_every_key and node.kwargs.get("reads") == reads and \
                len(node.args) == len(nodes) and all(_same_value(a, b) for a, b in zip(node.args, nodes)):
            return node
    order = {node: i for i, node in enumerate(graph.nodes)}
    last = max(nodes, key=order.__getitem__)
    if last.op == "placeholder":
        last = [node for node in graph.nodes if node.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return graph.call_function(keeps_every_key, nodes, {"reads": reads})


# ops whose every call makes new values (random draws, uninitialized memory): two such calls are never one value
_FRESH_VALUES = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "poisson", "exponential",
                 "geometric", "cauchy", "empty")


def _same_value(a: object, b: object, depth: int = 12) -> bool:
    """Whether two graph values are equal on every call: one node, or the same pure call of equal arguments, none of
    them written in place (numbers and other constants by equality)."""
    if a is b:
        return True
    if not (isinstance(a, Node) and isinstance(b, Node)):
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
        return not isinstance(a, Node) and not isinstance(b, Node) and type(a) is type(b) and a == b
    if depth == 0 or a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target or \
            has_side_effect(a) or is_written(a) or is_written(b) or a.kwargs.keys() != b.kwargs.keys() or \
            any(word in target_name(a).lower() for word in _FRESH_VALUES):
        return False
    return _same_value(a.args, b.args, depth - 1) and \
        all(_same_value(a.kwargs[key], b.kwargs[key], depth - 1) for key in a.kwargs)

"""The inputs of a fused site call, by name: which graph nodes it reads and how a call's tensors split back.

A rewritten site becomes one call ``attnfuse_site_<n>(q, k, v, *rest)``. ``site_inputs`` lists the nodes of
``rest`` group by group (keep-masks, biases, tensor factors, score-function leaves, guarded buffers, a run-time
dropout p, the graph call's reading of its key padding) and records how many each group has in an ``InputLayout``; at run time ``InputLayout.split`` gives
the call's tensors back under the same names, so the two sides cannot disagree on an order or a count.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

from torch.fx import Node

from attnfuse.site import AttentionSite

_GROUPS = ("masks", "biases", "factors", "leaves", "guards", "dropout", "padding", "original")


class SiteTensors(NamedTuple):
    """One call's inputs by name (tensors at run time, nodes when built from a site). ``dropout`` holds the
    run-time dropout p where the site reads one; ``padding`` whether its key padding keeps every key on this call
    (``attnfuse.unpadded``); ``original`` the inputs only the site's own ops read. A named
    tuple: one is built per fused call, and a tuple is built several times faster than a frozen dataclass."""

    q: object
    k: object
    v: object
    masks: tuple = ()
    biases: tuple = ()
    factors: tuple = ()
    leaves: tuple = ()
    guards: tuple = ()
    dropout: tuple = ()
    padding: tuple = ()
    original: tuple = ()

    def flat(self) -> tuple:
        """Every input in the call's order: q, k, v, then each group in turn."""
        return (self.q, self.k, self.v, *(x for group in _GROUPS for x in getattr(self, group)))


@dataclass(frozen=True)
class InputLayout:
    """How many inputs each group of a site call has (the order is ``SiteTensors.flat``'s)."""

    masks: int = 0
    biases: int = 0
    factors: int = 0
    leaves: int = 0
    guards: int = 0
    dropout: int = 0
    padding: int = 0
    original: int = 0

    def __post_init__(self) -> None:
        # each group's slice of a call's flat inputs, worked out once (a derived field, not compared)
        slices, start = [], 3
        for group in _GROUPS:
            slices.append(slice(start, start + getattr(self, group)))
            start += getattr(self, group)
        object.__setattr__(self, "_slices", tuple(slices))
        object.__setattr__(self, "_count", start)

    @staticmethod
    def of(inputs: SiteTensors) -> "InputLayout":
        return InputLayout(**{group: len(getattr(inputs, group)) for group in _GROUPS})

    def with_original(self, count: int) -> "InputLayout":
        """The layout with ``count`` inputs that only the site's own ops read, appended last."""
        return replace(self, original=count)

    def first(self, group: str) -> int:
        """The position of ``group``'s first input among a call's flat inputs."""
        return self._slices[_GROUPS.index(group)].start

    def split(self, tensors: tuple) -> SiteTensors:
        """A call's flat inputs (q, k, v first) as named groups."""
        if len(tensors) != self._count:
            raise RuntimeError(f"attnfuse: a fused site was called with {len(tensors)} inputs, its layout has "
                               f"{self._count}")
        tensors = tuple(tensors)
        return SiteTensors._make((tensors[0], tensors[1], tensors[2], *[tensors[group] for group in self._slices]))


def site_inputs(site: AttentionSite, padding_read: Optional[Node] = None) -> SiteTensors:
    """The graph nodes the fused call of ``site`` reads, by group; ``padding_read``: the graph's reading of the site's
    key padding (``attnfuse.unpadded.padding_read``), where it has one."""
    terms = site.scores
    dropout: tuple[Node, ...] = (site.dropout_p,) if isinstance(site.dropout_p, Node) else ()
    return SiteTensors(
        site.q.node, site.k.node, site.v.node,
        masks=tuple(m.node for m in terms.keep_masks),
        biases=tuple(b for b, _ in terms.biases),
        factors=tuple(f.value for f in terms.tensor_factors),
        leaves=tuple(leaf for f, _ in terms.functions for leaf in f.leaves),
        guards=tuple(terms.causal_guard[1]) if terms.causal_guard else (),
        dropout=dropout,
        padding=(padding_read,) if padding_read is not None else (),
    )


def dropout_p(inputs: SiteTensors, constant: float) -> float:
    """This call's dropout probability: the run-time p where the site reads one (checked as ``F.dropout`` does),
    else the site's constant."""
    if not inputs.dropout:
        return constant
    p = float(inputs.dropout[0])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p

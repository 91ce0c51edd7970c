"""The canonical ``AttentionSite`` record: everything the rewrite needs, in one axis namespace.

Axis letters come from the QK product: ``batch`` (leading score axes, the last of them the head
axis when there are two or more), ``query``, ``key``, ``head_dim``; ``value_dim`` is v's feature axis.
Scores are ``softmax(scale * q.k + bias, masked by keep-masks and causal)`` followed by dropout and
the value product, laid out as ``out_axes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch.fx import Node

from attnfuse.added_masks import AddedMask
from attnfuse.unpadded import Unpadded
from attnfuse.vocabulary import Factor, KeepMask, Operand, ScoreFunction


@dataclass
class ScoreTerms:
    """What happens to the raw QK product before the softmax, in canonical form."""

    scale: float = 1.0
    tensor_factors: list[Factor] = field(default_factory=list)
    biases: list[tuple[Node, float]] = field(default_factory=list)
    keep_masks: list[KeepMask] = field(default_factory=list)
    causal: Optional[str] = None
    fill: Optional[float] = None
    window: Optional[object] = None
    softcap: Optional[float] = None
    functions: list[tuple[ScoreFunction, float]] = field(default_factory=list)
    causal_guard: Optional[tuple[KeepMask, tuple]] = None  # (mask, buffers) a causal flag was read from
    fill_check: bool = False  # the finite fill is checked to mask on each call (``attnfuse.dominance``)
    scores_dtype: Optional[torch.dtype] = None  # of the scores the softmax reads (what a fill is compared in)
    keys_in_every_row: bool = False  # the causal flag holds only while q_len <= k_len (checked per call)
    after_fill: list[Node] = field(default_factory=list)  # biases added after a finite fill (``fill + bias``)
    live_rows: bool = False  # every row must keep a key whose bias is above the floor (checked per call)
    binary_masks: list[Node] = field(default_factory=list)  # 0/1 float masks checked to be 0/1 on each call
    finite_scores: bool = False  # scores are multiplied by a 0/1 mask: they must be finite (checked per call)
    zeroed_rows: bool = False  # the weights are zeroed by the site's own mask: a row without keys gives 0
    added_mask: Optional[AddedMask] = None  # causal window and keep-masks read from an added 0 / fill bias
    bias_fill: Optional[float] = None  # the only bias holds 0 and this finite fill alone (``masks.zero_or_fill``)
    run_time_causal: Optional[str] = None  # "bias" / "mask": the one mask, a run-time input, may be causal (per call)
    keyless_rows_original: bool = False  # a call with gradients and a row without keys runs the original ops
    filled_bias_kept: Optional[str] = None  # why a bias filled under a mask was added whole (``_split_filled_biases``)
    unpadded: Optional[Unpadded] = None  # the one mask is padding: left out where it keeps every key (``unpadded``)


@dataclass
class AttentionSite:
    """One attention computation found in a graph, ready to be rewritten into one fused call."""

    softmax: Node
    output: Node
    q: Operand
    k: Operand
    v: Operand
    batch: str
    query: str
    key: str
    head_dim: str
    value_dim: str
    out_axes: str
    scores: ScoreTerms
    dropout_p: Union[float, Node] = 0.0  # a node where p is a run-time number (a SymFloat)
    kv_group: int = 1
    nodes: list[Node] = field(default_factory=list)
    dtype: Optional[torch.dtype] = None  # the dtype the fused call computes in (attnfuse.precision)

    def q_axes(self) -> str:
        return self.batch + self.query + self.head_dim

    def kv_axes(self, feature: str) -> str:
        return self.batch + self.key + feature

"""The canonical ``AttentionSite`` record: everything the rewrite needs, in one axis namespace.

Axis letters come from the QK product: ``batch`` (leading score axes, the last of them the head
axis when there are two or more), ``query``, ``key``, ``head_dim``; ``value_dim`` is v's feature axis.
Scores are ``softmax(scale * q.k + bias, masked by keep-masks and causal)`` followed by dropout and
the value product, laid out as ``out_axes``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from attnfuse.fx_utils import tensor_meta
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

    def features(self) -> dict:
        """The audit's description of what this site does."""
        q_meta, k_meta = tensor_meta(self.q.node), tensor_meta(self.k.node)
        head = self.batch[-1] if len(self.batch) >= 2 else None
        q_heads = q_meta.shape[self.q.axes.index(head)] if head else 1
        k_heads = (k_meta.shape[self.k.axes.index(head)] if head and head in self.k.axes else 1) * self.kv_group
        kv_heads = k_heads // self.kv_group
        q_len, k_len = q_meta.shape[self.q.axes.index(self.query)], k_meta.shape[self.k.axes.index(self.key)]
        size = _size_namer(q_len, k_len)
        masks = [self._mask_kind(m, size) for m in self.scores.keep_masks]
        bias_shapes = [_shape_str(tensor_meta(b).shape, size) for b, _ in self.scores.biases]
        runtime_scale = any(tensor_meta(f.value) is not None for f in self.scores.tensor_factors)
        return {
            "causal": self.scores.causal,
            "causal_guarded_by_buffer": bool(self.scores.causal_guard) or None,
            "window": size(self.scores.window) if self.scores.window is not None else None,
            "softcap": self.scores.softcap,
            "score_functions": len(self.scores.functions) or None,
            "mask": ", ".join(masks) or None,
            "bias": ", ".join(bias_shapes) or None,
            "scale": "tensor" if runtime_scale else (round(self.scores.scale, 6) if not self.scores.tensor_factors
                                                     else "run-time number"),
            "q_heads": int(q_heads),
            "kv_heads": int(kv_heads),
            "dropout": "run-time p" if isinstance(self.dropout_p, Node) else self.dropout_p,
            "masked_fill": self.scores.fill,
            "q_len": size(q_len),
            "k_len": size(k_len),
        }

    def _mask_kind(self, mask: KeepMask, size: "Callable[[object], object]") -> str:
        meta = tensor_meta(mask.node)
        shape = tuple(meta.shape)
        query_varies = meta.dim() >= 2 and shape[-2] != 1
        return f"{'full' if query_varies else 'key padding'} {_shape_str(shape, size)}"


def _size_namer(q_len: object, k_len: object) -> Callable[[object], object]:
    """How the audit writes a size: a number; ``L`` / ``S`` for a dynamic query / key length (a symbol
    such as ``s95`` means nothing to a reader); ``L+1``-style for other dynamic sizes where Dynamo's
    expression mentions them, else ``dyn``."""
    names = {}
    for value, name in ((k_len, "S"), (q_len, "L")):
        if isinstance(value, torch.SymInt):
            names[str(value)] = name

    def size(value: object) -> object:
        if isinstance(value, int):
            return value
        text = str(value)
        if text in names:
            return names[text]
        for symbol, name in names.items():
            text = re.sub(rf"\b{symbol}\b", name, text)
        return text.replace(" ", "") if not re.search(r"\bs\d+\b", text) else "dyn"
    return size


def _shape_str(shape: tuple, size: Callable[[object], object]) -> str:
    return "(" + ", ".join(str(size(s)) for s in shape) + ")"

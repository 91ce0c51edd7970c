"""Causal masks proven in the graph that built them, carried with the tensor to the graphs that read it.

A graph break between a model's mask construction and its attention (FSDP2 breaks the graph at every
layer; transformers builds the mask once, before the layers) hands each layer's graph the mask as an
input, whose values no capture-time rule can see. The graph that *built* it can: its output node is read by
the same causal rules the matcher uses (``patterns.causal``), symbolically or from shapes alone, so the
fact holds for every input. Each call of that graph records its mask outputs here, keyed by the tensor
object with its version counter and data pointer; a layer handed the same, unwritten tensor reads a proven
one as the causal triangle without reading its values (``guards.RunTimeCausal``), and so without a host
synchronization. A mask whose values depend on an input (transformers' mask built from ``position_ids``
handed in from another graph) is read by the first layer, which records what it found; the other layers of
that forward reuse it: one host synchronization a forward instead of one a layer.

What the record trusts is what autograd trusts for the tensors it saves: a write that moves no version
counter (through ``.data``, a NumPy view or DLPack) is not seen. The tensor was built inside the model's
own forward by a graph attnfuse compiled and is read moments later by another; a graph that writes one of
its inputs in place drops that input's record before it runs (``forget``), so only a write in Python code
that Dynamo does not capture, bypassing the version counter, between two graphs of one forward, could go
unseen. Anything else (a mask the user passes in, a tensor built eagerly) is read per call as before.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Graph, Node
from torch.utils.weak import WeakIdKeyDictionary

from attnfuse.effects import mark_writes
from attnfuse.fx_utils import is_written, tensor_meta
from attnfuse.patterns.causal import classify, classify_additive
from attnfuse.patterns.masks import zero_or_fill
from attnfuse.tracing import is_traced
from attnfuse.vocabulary import KeepMask


@dataclass(frozen=True)
class CausalProof:
    """A tensor whose every ``(L, S)`` slice is the causal triangle at ``alignment`` (None: keeps every key): a boolean
    keep-mask (``kind="mask"``), or an additive bias of 0 on kept keys and ``fill`` on the others (``kind="bias"``)."""

    kind: str
    alignment: Optional[str]
    fill: Optional[float] = None


def carried_facts(graph: Graph) -> tuple[tuple[tuple[int, Optional[CausalProof]], ...], tuple[int, ...]]:
    """What each call of ``graph`` records and forgets: ``(position, proof)`` for each output built as a mask (a
    boolean tensor, or a 0 / fill ``where``), with its proof where it is a causal triangle for every input (None
    where its values depend on an input: the first layer that reads it records what it found), and the positions
    of the inputs ``graph`` writes in place."""
    mark_writes(graph)
    return _mask_outputs(graph), _written_inputs(graph)


def _mask_outputs(graph: Graph) -> tuple[tuple[int, Optional[CausalProof]], ...]:
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    values = output.args[0] if output is not None else ()
    if not isinstance(values, (tuple, list)):
        values = (values,)
    found = []
    for position, node in enumerate(values):
        if _computed_tensor(node):
            proof = _proof(node)
            if proof is not None or _built_as_a_mask(node):
                found.append((position, proof))
    return tuple(found)


def _written_inputs(graph: Graph) -> tuple[int, ...]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return tuple(i for i, node in enumerate(placeholders) if is_written(node))


def _computed_tensor(value: Any) -> bool:
    """A computed (not handed-in), unwritten boolean or floating tensor of at least two dimensions."""
    if not isinstance(value, Node) or value.op in ("placeholder", "get_attr") or is_written(value):
        return False
    meta = tensor_meta(value)
    return meta is not None and meta.dim() >= 2 and (meta.dtype == torch.bool or meta.dtype.is_floating_point)


def _built_as_a_mask(node: Node) -> bool:
    """Boolean, or an additive mask of 0 and one fill (``masks.zero_or_fill``)."""
    return tensor_meta(node).dtype == torch.bool or zero_or_fill(node) is not None


def _proof(node: Node) -> Optional[CausalProof]:
    meta = tensor_meta(node)
    L, S = meta.shape[-2], meta.shape[-1]
    if meta.dtype == torch.bool:
        pattern, fill = classify(KeepMask(node, False), L, S), None
    else:
        found = classify_additive(node, L, S)
        if found is None:
            return None
        pattern, fill = found
    kind = "mask" if meta.dtype == torch.bool else "bias"
    if pattern.kind == "all" and not pattern.key_masks and not pattern.guarded_by:
        return CausalProof(kind, None, None)
    if pattern.kind != "causal" or pattern.window is not None or pattern.key_masks or pattern.guarded_by:
        return None
    return CausalProof(kind, pattern.alignment, fill) if kind == "mask" or fill is not None else None


@dataclass
class Record:
    """What is known of one tensor a compiled graph built as a mask: its proof, if any, and the causal readings the
    layers that read it found (``(kind, alignment)`` -> the lowest fill threshold its masked entries were found under)."""

    proof: Optional[CausalProof]
    version: int
    address: int
    found: dict = field(default_factory=dict)

    def keeps_a_key_in_every_row(self, L: int, S: int) -> bool:
        """Whether the tensor is known (proved at its build, or found by an earlier layer's read) to be a causal
        triangle that leaves every one of ``L`` query rows a key among ``S`` at 0: the keys every row keeps."""
        alignments = [alignment for (_, alignment) in self.found]
        if self.proof is not None:
            alignments.append(self.proof.alignment)
        return S >= 1 and any(alignment in (None, "top_left") or L <= S for alignment in alignments)


def _geometry(tensor: torch.Tensor) -> Optional[tuple]:
    """What makes two tensors over one storage hold the same values: the storage, where in it, how laid out; None
    for a tensor without a plain storage of its own (a subclass such as a ``DTensor``, a sparse or nested one)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        return None
    return (tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


class CarriedProofs:
    """The tensors compiled graphs built as masks, while they live and stay unwritten.

    A layer may be handed, instead of the tensor a graph returned, another tensor object over the same memory
    (FSDP2 on CUDA does): it is the recorded tensor's twin where it has the same storage, offset, shape, strides
    and dtype, and its version counter reads what the recorded tensor's read when it was built (shared, as
    ``detach`` shares it, or its own, never moved); the recorded tensor itself must still be unwritten.
    """

    def __init__(self) -> None:
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._by_geometry: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def note(self, outputs: Any, masks: tuple[tuple[int, Optional[CausalProof]], ...]) -> None:
        """Record the mask outputs of one call of a graph (``outputs``: what it returned)."""
        values = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for position, proof in masks:
            tensor = values[position] if position < len(values) else None
            geometry = _geometry(tensor) if isinstance(tensor, torch.Tensor) and not is_traced(tensor) else None
            if geometry is not None:
                self._records[tensor] = Record(proof, tensor._version, tensor.data_ptr())
                self._by_geometry[geometry] = tensor

    def record_of(self, tensor: torch.Tensor) -> Optional[Record]:
        """The record of ``tensor`` (or of the recorded tensor it is a twin of), if that tensor is unwritten since
        it was built."""
        record = self._records.get(tensor)
        if record is None:
            geometry = _geometry(tensor) if self._by_geometry else None
            if geometry is None:
                return None
            built = self._by_geometry.get(geometry)
            record = self._records.get(built) if built is not None else None
            if record is None or tensor._version != record.version:
                return None
            tensor = built
        if tensor._version != record.version or tensor.data_ptr() != record.address:
            return None
        return record

    def forget(self, tensors: Any) -> None:
        """Drop the records of ``tensors`` and of the recorded tensors they are twins of (the inputs a graph is
        about to write in place)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._records.pop(tensor, None)
                geometry = _geometry(tensor) if self._by_geometry else None
                built = self._by_geometry.pop(geometry, None) if geometry is not None else None
                if built is not None:
                    self._records.pop(built, None)

    def __len__(self) -> int:
        return len(self._records)


CARRIED = CarriedProofs()

"""Guards: causal masks read from module buffers (nanoGPT's registered ``tril``), kept correct if the
buffer changes after capture; masks and biases handed in at run time, read as causal on the calls where
they hold the causal triangle (``RunTimeCausal``).

The rewrite runs such a site on the kernels' causal path. Each call recomputes the mask from the
buffers with the original's own ops and compares it with the causal triangle: the work the original
did per call on its mask (a pass over the ``(L, S)`` slice), one comparison, and, on CUDA, one host
synchronization (``attnfuse.memo``: a check keyed by ``data_ptr`` and ``_version`` misses writes
through ``.data``, whose version counter is separate, and through NumPy views). If the buffer no
longer holds the triangle, the recomputed mask is used as a plain mask for that call. Under a
compiler or CUDA-graph capture, where nothing can be read, the recomputed mask is always used.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch.fx import Node

from attnfuse.carried import CARRIED, Record
from attnfuse.kernels.rows import Triangle
from attnfuse.masking import causal_keep
from attnfuse.memo import host_bool, host_bools, host_readable
from attnfuse.original import original_program
from attnfuse.precision import bias_dtype
from attnfuse.tracing import holds_values

if TYPE_CHECKING:
    from attnfuse.kernels.call import AttentionCall

MAX_TRIANGLES = 16  # triangles kept per site, one per (L, S, device) seen

# the checks a compile in progress traces as holding their triangle, with its alignment (``traced_as_causal``)
_TRACED_AS_CAUSAL: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("attnfuse_traced_as_causal",
                                                                                     default=None)


@contextlib.contextmanager
def traced_as_causal(alignments: dict["RunTimeCausal", str]) -> Iterator[None]:
    """Within: a traced call of each check in ``alignments`` runs causal at its alignment without its tensor (the
    form a compiler builds for the calls found to hold the triangle before they run, ``attnfuse.causal_inputs``)."""
    token = _TRACED_AS_CAUSAL.set(alignments)
    try:
        yield
    finally:
        _TRACED_AS_CAUSAL.reset(token)


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


def _keeps_every_key(L: int, S: int) -> bool:
    """Whether the causal triangle ``RunTimeCausal`` reads at ``L`` queries and ``S`` keys keeps every key."""
    return (L if L <= S else S) == 1


def _remembered(cache: dict, key: tuple, build: Callable[[], object]):
    """``cache[key]``, built on first use; the cache is emptied once it holds ``MAX_TRIANGLES`` entries."""
    if key not in cache:
        if len(cache) >= MAX_TRIANGLES:
            cache.clear()
        cache[key] = build()
    return cache[key]


def floor_in(value: float, dtype: torch.dtype) -> float:
    """A number of ``dtype`` at or below the negative ``value``: ``value`` rounded to ``dtype``, moved down where it
    rounded up (``-inf`` where ``dtype`` holds nothing that low)."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    while float(rounded) > value:
        rounded = (rounded.double() * (1 + 2.0 ** -6)).to(dtype)
    return float(rounded)


class RunTimeCausal:
    """Reads, per call, a site's one mask or bias that is handed in at run time (a graph input: transformers'
    eager mask reaching a decoder layer's graph across a graph break, FSDP's per-layer one among them) as the
    causal triangle, on the calls where its values are exactly that triangle; the call then runs the kernels'
    causal path without it, and every other call runs with it as before.

    Exact where it applies: a bias of 0 on the triangle's keys and at most ``threshold`` (the fill that masks any
    score, ``dominance.absorbing``: ``finfo.min``, ``-inf``) on the others, in every batch and head slice, gives
    each kept score ``s + 0 == s`` and each masked one a weight of exactly 0, as the causal flag does, as long as
    every row keeps a key; so the alignment read is bottom-right where ``L <= S`` (the KV-cache triangle, equal
    to top-left at ``L == S``) and top-left where ``L > S`` (bottom-right would leave rows without keys, which the
    original gives as ``softmax(s + fill)``). A boolean keep-mask must equal the triangle; its fill stays the
    site's own. A bias that needs a gradient is not read (the causal path gives it none).

    Nothing is remembered across calls (``attnfuse.memo``: a tensor written through ``.data`` or a NumPy view
    keeps its version), so each call compares the tensor it is given: a bias in the host read its rows already
    take (``rows.bias_rows``), a boolean mask in a read of its own (none at one query, where the triangle keeps
    every key: the mask is used as given). The exception is a tensor a compiled graph of the model built in this
    forward, unwritten since (``attnfuse.carried``): it is read as causal without its values where that graph's
    rules proved it so, or where an earlier layer's read found it so. ``calls`` counts the calls read as causal
    (``proven``: of those, the ones that read nothing) and those run with the tensor, for the report. Under a
    tracer or CUDA-graph capture nothing is read: the tensor is used as given.
    """

    def __init__(self, kind: str, threshold: float) -> None:
        if kind not in ("bias", "mask"):
            raise ValueError(f"attnfuse: a run-time causal check reads a 'bias' or a 'mask', not {kind!r}")
        self.kind, self.threshold = kind, threshold
        # ``proven``: the causal calls that read nothing: the tensor's build proved it, or an earlier layer read it
        # (``attnfuse.carried``)
        self.calls = {"causal": 0, "as given": 0, "proven": 0}
        self._triangles: dict[tuple, object] = {}

    def causal_reading(self, call: "AttentionCall") -> Optional[str]:
        """The causal alignment that the call's bias or mask holds on this call, or None (the call keeps it). Calls
        under a tracer or CUDA-graph capture read nothing and are not counted."""
        if not host_readable(call.q):
            return self._traced_as(call)
        alignment = self._candidate(call)
        record = CARRIED.record_of(self._tensor(call)) if alignment is not None else None
        if record is not None and self._proven(record, call.q.shape[-2], call.k.shape[-2], alignment):
            self.calls["proven"] += 1
            found = True
        elif alignment is not None and self.kind == "mask" and _keeps_every_key(call.q.shape[-2], call.k.shape[-2]):
            found = False  # a decode step's triangle keeps every key: a read of its own would cost more than the mask
        else:
            found = alignment is not None and self._holds(call, alignment)
            if found and record is not None:
                self._remember(record, alignment)
        self.calls["causal" if found else "as given"] += 1
        return alignment if found else None

    def read_bias_with(self, bias: torch.Tensor, alignment: str, L: int, S: int,
                       flag: Optional[torch.Tensor]) -> tuple[Optional[str], Optional[bool]]:
        """Whether ``bias``, a call's one mask, holds the triangle ``candidate`` found it could (``alignment``, or None
        where it does not); with ``flag`` (another unread one-element check of the same call, or None) read in the
        same host read, so that a call checking both synchronizes once. The flag's value is None where it was not
        read: the triangle was proven without a read (``attnfuse.carried``). Counted as ``causal_reading`` counts; the
        caller reads nothing more of the bias for the triangle."""
        found, proven, flag_value = self._read_triangle(bias, alignment, L, S, flag)
        self.count_as(alignment if found else None, proven)
        return (alignment if found else None), flag_value

    def input_alignment(self, tensor: torch.Tensor, dtype: torch.dtype,
                        example: bool = False) -> tuple[Optional[str], bool]:
        """What ``causal_reading`` reads on a call whose one bias is ``tensor`` as it is (for scores of ``dtype``: a
        bias attend keeps in its own dtype), decided before the call runs: the alignment (None where the triangle does
        not hold, or where the tensor alone leaves the call's lengths open: a row or key axis of size 1), and whether
        it was proven without a read (``attnfuse.carried``). ``example``: the first call's tensor, read while a backend
        compiles the graph. Not counted for the report (``count_as``)."""
        readable = holds_values(tensor) and not (tensor.is_cuda and torch.cuda.is_current_stream_capturing()) \
            if example else host_readable(tensor)
        if tensor.dim() < 2 or not tensor.is_floating_point() or not readable or \
                tensor.dtype not in (dtype, bias_dtype(dtype, tensor.dtype)):
            return None, False
        L, S = tensor.shape[-2], tensor.shape[-1]
        alignment = None if L == 1 or S == 1 else self.candidate(tensor, None, None, None, None, None, L, S)
        if alignment is None:
            return None, False
        found, proven, _ = self._read_triangle(tensor, alignment, L, S, example=example)
        return (alignment if found else None), proven

    def _read_triangle(self, bias: torch.Tensor, alignment: str, L: int, S: int, flag: Optional[torch.Tensor] = None,
                       example: bool = False) -> tuple[bool, bool, Optional[bool]]:
        """Whether ``bias`` holds the triangle at ``alignment``, whether that was proven without a read (its carried
        record), and ``flag``'s value read in the same host read (None where nothing was read). ``example``: read
        while a backend compiles (``input_alignment``). A triangle found is remembered on the bias's record."""
        record = CARRIED.record_of(bias)
        if record is not None and self._proven(record, L, S, alignment):
            return True, True, None
        holds = self._bias_triangle(L, S, alignment, bias.dtype, bias.device).holds(bias.detach())
        if example:
            found, flag_value = bool(holds), None
        else:
            flags = host_bools(holds, *(() if flag is None else (flag,)))
            found = flags is not None and flags[0]
            flag_value = None if flags is None or flag is None else flags[1]
        if found and record is not None:
            self._remember(record, alignment)
        return found, False, flag_value

    def count_as(self, alignment: Optional[str], proven: bool) -> None:
        """Count a call read as ``alignment`` (None: run with its tensor) for the report; ``proven``: without a read
        of its own (a carried record, or another site's reading of the same tensor)."""
        self.calls["as given" if alignment is None else "causal"] += 1
        if alignment is not None and proven:
            self.calls["proven"] += 1

    def _traced_as(self, call: "AttentionCall") -> Optional[str]:
        return self.traced_alignment(self._candidate(call))

    def traced_alignment(self, candidate: Optional[str]) -> Optional[str]:
        """Under a tracer: the alignment a compile in progress traces this check's calls as (``traced_as_causal``),
        where it is the traced call's ``candidate``; else None (the tensor is used as given)."""
        alignment = (_TRACED_AS_CAUSAL.get() or {}).get(self)
        return alignment if alignment is not None and candidate == alignment else None

    def _proven(self, record: Record, L: int, S: int, alignment: str) -> bool:
        """Whether the call's tensor, which a compiled graph built as a mask (``record``: unwritten since), was proved,
        or found by an earlier read, to be this triangle (``attnfuse.carried``)."""
        threshold = record.found.get((self.kind, alignment))
        if threshold is not None:
            return self.kind == "mask" or threshold <= self.threshold
        proof = record.proof
        if proof is None or proof.kind != self.kind:
            return False
        if proof.alignment is None:  # keeps every key: the triangle where it does too (a decode step's)
            return _keeps_every_key(L, S)
        if proof.alignment != alignment and L != S:
            return False
        return self.kind == "mask" or proof.fill <= self.threshold

    def _remember(self, record: Record, alignment: str) -> None:
        """Record on the tensor's ``attnfuse.carried`` record that it held this triangle."""
        key = (self.kind, alignment)
        record.found[key] = min(record.found.get(key, math.inf), self.threshold)

    def _tensor(self, call: "AttentionCall") -> torch.Tensor:
        return call.bias if self.kind == "bias" else call.keep

    def _candidate(self, call: "AttentionCall") -> Optional[str]:
        return self.candidate(call.bias, call.keep, call.causal, call.window, call.bias_fn, call.bias_fill,
                              call.q.shape[-2], call.k.shape[-2])

    def candidate(self, bias: Optional[torch.Tensor], keep: Optional[torch.Tensor], causal: Optional[str],
                  window: Optional[int], bias_fn: Optional[Callable], bias_fill: Optional[float], L: int,
                  S: int) -> Optional[str]:
        """The one alignment a call's tensor (its bias, or its keep-mask, by ``kind``) could hold, where it is the
        call's only mask (none of the others given beside it) and, for a bias, it needs no gradient and was not raised
        into the kernels' range (``bias_fill``); else None."""
        if causal is not None or window is not None or bias_fn is not None or S == 0 or L == 0:
            return None
        if self.kind == "bias":
            tensor, other = bias, keep
            if tensor is None or bias_fill is not None or (tensor.requires_grad and torch.is_grad_enabled()):
                return None
        else:
            tensor, other = keep, bias
        if tensor is None or other is not None or tuple(tensor.shape[-2:]) != (L, S):
            return None
        return "bottom_right" if L <= S else "top_left"

    def _holds(self, call: "AttentionCall", alignment: str) -> bool:
        L, S, device = call.q.shape[-2], call.k.shape[-2], call.q.device
        if self.kind == "bias":
            return call.bias_rows(self._bias_triangle(L, S, alignment, call.bias.dtype, device)).triangle
        keep = _remembered(self._triangles, (L, S, torch.bool, str(device)),
                           lambda: causal_keep(L, S, alignment, device))
        return host_bool((call.keep == keep).all()) is True

    def _bias_triangle(self, L: int, S: int, alignment: str, dtype: torch.dtype, device: torch.device) -> Triangle:
        """The triangle a bias of ``dtype`` is compared with, built once per shape, dtype and device."""
        return _remembered(self._triangles, (L, S, dtype, str(device)),
                           lambda: self._expected_bias(L, S, alignment, dtype, device))

    def _expected_bias(self, L: int, S: int, alignment: str, dtype: torch.dtype, device: torch.device) -> Triangle:
        floor = floor_in(self.threshold, dtype)
        keep = causal_keep(L, S, alignment, device)
        return Triangle(torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~keep, floor), floor)

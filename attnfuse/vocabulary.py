"""The canonical operations: the records the rule families produce and the matcher reads.

A rule in ``attnfuse.patterns`` turns one spelling into one of these records; the engine (match,
site, lower, the kernels) reads only the records and the constants here. This module imports nothing
of attnfuse, so both sides depend on it and neither on the other's modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch.fx import Node

# A fill at or below this acts as a mask: exp(fill - row_max) is 0 for any sane score.
MASKING_THRESHOLD = -1e4


def causal_offset(alignment: Optional[str], L: Any, S: Any) -> Any:
    """The diagonal ``c`` of a causal mask keeping ``j - i <= c``: 0 top-left (SDPA's ``is_causal``),
    ``S - L`` bottom-right (the last query sees the last key), for ``L`` queries and ``S`` keys."""
    return 0 if alignment == "top_left" else S - L


# ----------------------------------------------------------------------------- layouts and products

@dataclass(frozen=True)
class Operand:
    """A tensor read by a product, with one axis letter per dimension of ``node``."""

    node: Node
    axes: str


@dataclass(frozen=True)
class Permute:
    """``out = x.permute(perm)``: output dim ``k`` is input dim ``perm[k]``."""

    x: Node
    perm: tuple[int, ...]


@dataclass(frozen=True)
class RepeatHeads:
    """``out`` repeats each slice of ``x`` along ``dim`` ``repeats`` times in place (``repeat_interleave``)."""

    x: Node
    dim: int
    repeats: int


@dataclass(frozen=True)
class Product:
    """``out[out_axes] = alpha * sum(lhs[lhs.axes] * rhs[rhs.axes]) + beta * addend`` (einsum semantics)."""

    lhs: Operand
    rhs: Operand
    out_axes: str
    alpha: float = 1.0
    addend: Optional[Node] = None
    beta: float = 0.0

    def operands(self) -> tuple[Operand, Operand]:
        return (self.lhs, self.rhs)


# ----------------------------------------------------------------------------- the softmax and what is around it

@dataclass(frozen=True)
class Softmax:
    """``softmax(x, dim)``, computed in ``dtype`` when given (a cast folded into the softmax)."""

    x: Node
    dim: int
    dtype: Optional[torch.dtype] = None


@dataclass(frozen=True)
class Multiply:
    """``a * b`` or ``a / b`` (``inverse``): which side is the scores is decided by the matcher."""

    a: object
    b: object
    inverse: bool


@dataclass(frozen=True)
class Factor:
    """A factor on the scores: a number, or a node giving a number or tensor at run time (``1 / value`` if ``inverse``)."""

    value: Union[float, Node]
    inverse: bool = False

    def as_float(self) -> Optional[float]:
        if isinstance(self.value, Node):
            return None
        return 1.0 / float(self.value) if self.inverse else float(self.value)


@dataclass(frozen=True)
class Add:
    """``a + alpha * b`` (``sign`` -1 for subtraction); the matcher decides which side is the scores."""

    a: object
    b: object
    alpha: float = 1.0
    sign: float = 1.0


@dataclass(frozen=True)
class Cast:
    """``x`` converted to ``dtype``; the fused kernel computes the softmax in fp32 whatever the casts say."""

    x: Node
    dtype: torch.dtype


@dataclass(frozen=True)
class Dropout:
    """Dropout with probability ``p``; a no-op unless ``training`` (Dynamo bakes ``self.training`` in)."""

    x: Node
    p: Union[float, Node]
    training: bool

    @property
    def active(self) -> bool:
        """Whether it may drop anything: in training, with a run-time ``p`` or a constant one above 0."""
        return self.training and (isinstance(self.p, Node) or self.p > 0)


@dataclass(frozen=True)
class Tanh:
    """``tanh(x)`` of the scores."""

    x: Node


# ----------------------------------------------------------------------------- masks

@dataclass(frozen=True)
class Select:
    """``where(cond, if_true, if_false)``; ``masked_fill(x, m, v)`` is ``Select(m, v, x)``."""

    cond: Node
    if_true: object
    if_false: object


@dataclass(frozen=True)
class KeepMask:
    """A boolean tensor ``node`` whose True entries keep a score (or drop it, if ``negated``)."""

    node: Node
    negated: bool


@dataclass(frozen=True)
class Clamp:
    """``x`` raised to at least ``low``: ``torch.max(x, c)``, ``torch.maximum``, ``clamp(min=c)``, ``clamp_min``."""

    x: Node
    low: object


@dataclass(frozen=True)
class RegionWrite:
    """``base`` with ``base[index] = value`` applied to a copy (an in-place slice write, made functional by
    ``attnfuse.effects``): ``attn[:, :, 1:, 1:] += rel``, ``attn[..., :n] = -inf``, ``attn[mask] = -inf``."""

    base: Node
    index: object
    value: object


def inplace_on_copy(method: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The functional form of any in-place op: the op applied to a copy of ``x`` (exact, dtype kept).
    ``attnfuse.effects`` writes in-place ops as calls of it; ``RegionWrite`` reads its ``__setitem__`` calls."""
    y = x.clone()
    if method == "__setitem__":
        y[args[0]] = args[1]
    else:
        getattr(y, method)(*args, **kwargs)
    return y


@dataclass(frozen=True)
class FilledBias:
    """A bias filled under a mask before it is added to the scores: ``bias.masked_fill(cond, fill)`` (or
    ``where(cond, fill, bias)`` when ``fill_where_true``, ``where(cond, bias, fill)`` otherwise), then cast to each
    of ``casts`` in turn; ``fill`` is the value the filled tensor holds (rounded through those dtypes)."""

    bias: Node
    cond: Node
    fill_where_true: bool
    fill: float
    casts: tuple[torch.dtype, ...] = ()


@dataclass(frozen=True)
class MaskPattern:
    """What a keep-mask is: ``causal`` (with ``alignment``), ``all`` (keeps everything), ``keys`` (keeps what its
    ``key_masks`` keep, every query alike) or ``tensor``.

    ``key_masks``: keep-masks a causal triangle or window is ANDed with (a key-padding mask, constant along the
    queries); the mask keeps what the triangle and every one of them keep."""

    kind: str
    alignment: Optional[str] = None
    window: Optional[object] = None
    guarded_by: tuple = ()
    key_masks: tuple["KeepMask", ...] = ()


# ----------------------------------------------------------------------------- biases computed from positions

@dataclass
class ScoreFunction:
    """``bias(b, h, i, j) = fn(indices, leaves)``; ``leaves`` are graph nodes read by gathers."""

    leaves: list[Node]
    program: Callable[[tuple, list], torch.Tensor]
    uses_positions: bool

    def __call__(self, index: tuple, leaf_values: list) -> torch.Tensor:
        return self.program(index, leaf_values)

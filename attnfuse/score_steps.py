"""The elementwise steps between the QK product and the softmax, one small record each.

``match.walk_to_product`` reads them from the graph in forward order and ``match._apply_steps`` folds them
into the site's score terms (scale, biases, masks, softcap). Each step that reads a tensor names it in
``operand``, so a step re-read on another shape (scores reshaped between the products) is one ``replace``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch
from torch.fx import Node

from attnfuse.patterns.masks import keep_mask
from attnfuse.vocabulary import KeepMask


@dataclass(frozen=True)
class FactorStep:
    """``scores * value`` (``scores / value`` when ``inverse``)."""

    value: object
    inverse: bool

    @property
    def operand(self) -> object:
        return self.value


@dataclass(frozen=True)
class BiasStep:
    """``scores + coefficient * value``."""

    value: object
    coefficient: float

    @property
    def operand(self) -> object:
        return self.value


@dataclass(frozen=True)
class FillStep:
    """``where(cond, value, scores)`` when ``fill_where_true``, else ``where(cond, scores, value)``."""

    cond: object
    value: object
    fill_where_true: bool

    @property
    def operand(self) -> object:
        return self.cond

    def mask(self) -> KeepMask:
        """The keep-mask this fill leaves the scores under."""
        return keep_mask(self.cond, self.fill_where_true)


@dataclass(frozen=True)
class TanhStep:
    """``tanh(scores)`` (with factors around it, a softcap)."""

    operand = None


@dataclass(frozen=True)
class ClampStep:
    """``max(scores, low)`` in ``dtype``."""

    low: object
    dtype: torch.dtype
    operand = None


@dataclass(frozen=True)
class ReshapeStep:
    """A view of the scores with another shape (``node``)."""

    node: Node
    operand = None


Step = Union[FactorStep, BiasStep, FillStep, TanhStep, ClampStep, ReshapeStep]


def with_operand(step: Step, operand: object) -> Step:
    """``step`` reading ``operand`` instead of its own tensor."""
    name = "cond" if isinstance(step, FillStep) else "value"
    return replace(step, **{name: operand})

"""Product rules: every spelling of a two-operand contraction becomes one einsum-style ``Product``.

``torch.einsum`` keeps its letters; ``matmul`` / ``@`` / ``bmm`` / ``baddbmm`` get generated letters
with matmul's right-aligned batch broadcasting. Operands are peeled of transposes and permutes, so
``q @ k.transpose(-2, -1)`` and ``einsum('bhid,bhjd->bhij')`` read the same tensors with the same axes.
"""
from __future__ import annotations

import operator
import string
from typing import Optional

import torch
from torch.fx import Node

from attnfuse.canonical import canonicalizer
from attnfuse.fx_utils import bind, is_call, is_scalar, rank_of
from attnfuse.patterns.layouts import peel_layout
from attnfuse.vocabulary import Operand, Product


def _ellipsis_width(term: str, rank: int) -> Optional[int]:
    width = rank - (len(term) - 3) if "..." in term else 0
    return width if width >= 0 and ("..." in term or len(term) == rank) else None


def parse_einsum(equation: str, ranks: tuple[int, int]) -> Optional[tuple[str, str, str]]:
    """The two input terms and the output term of a two-operand einsum, ellipses spelled out."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    widths = [_ellipsis_width(t, r) for t, r in zip(terms, ranks)]
    if None in widths:
        return None
    fill = "".join(c for c in string.ascii_uppercase if c not in equation)[:8]
    width = max(widths)
    if width > len(fill):
        return None
    lhs, rhs = (t.replace("...", fill[len(fill) - w:] if w else "") for t, w in zip(terms, widths))
    if not arrow:
        letters = lhs + rhs
        output = fill[len(fill) - width:] if width else ""
        output += "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in output))
    else:
        output = output.replace("...", fill[len(fill) - width:] if width else "")
    if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(set(output)) != len(output):
        return None
    return lhs, rhs, output


@canonicalizer
def einsum_rule(node: Node) -> Optional[Product]:
    if not is_call(node, (torch.einsum, torch.functional.einsum)):
        return None
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or not all(isinstance(o, Node) for o in operands):
        return None
    ranks = tuple(rank_of(o) for o in operands)
    if None in ranks:
        return None
    parsed = parse_einsum(equation, ranks)
    if parsed is None:
        return None
    lhs, rhs, out = parsed
    return Product(peel_layout(Operand(operands[0], lhs)), peel_layout(Operand(operands[1], rhs)), out)


def matmul_axes(lhs_rank: int, rhs_rank: int) -> Optional[tuple[str, str, str]]:
    """Einsum letters for ``matmul`` of the given ranks (batch dims broadcast right-aligned)."""
    if lhs_rank < 2 or rhs_rank < 2:
        return None
    batch = "abcdefgh"[: max(lhs_rank, rhs_rank) - 2]
    lhs = batch[len(batch) - (lhs_rank - 2):] + "xy"
    rhs = batch[len(batch) - (rhs_rank - 2):] + "yz"
    return lhs, rhs, batch + "xz"


def _matmul_product(a: Node, b: Node, **extra) -> Optional[Product]:
    if not isinstance(a, Node) or not isinstance(b, Node):
        return None
    axes = matmul_axes(rank_of(a) or 0, rank_of(b) or 0)
    if axes is None:
        return None
    lhs, rhs, out = axes
    return Product(peel_layout(Operand(a, lhs)), peel_layout(Operand(b, rhs)), out, **extra)


@canonicalizer
def matmul_rule(node: Node) -> Optional[Product]:
    if not is_call(node, (operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm", "__matmul__")):
        return None
    return _matmul_product(node.args[0], node.args[1])


@canonicalizer
def baddbmm_rule(node: Node) -> Optional[Product]:
    """``baddbmm(input, a, b, beta=, alpha=)``: ``beta * input + alpha * a @ b`` (diffusers' spelling)."""
    if not is_call(node, (torch.baddbmm,), ("baddbmm",)):
        return None
    args = bind(node, ("input", "batch1", "batch2"), beta=1.0, alpha=1.0)
    if not (is_scalar(args["beta"]) and is_scalar(args["alpha"])):
        return None
    addend = args["input"] if args["beta"] != 0 else None
    return _matmul_product(args["batch1"], args["batch2"], alpha=float(args["alpha"]), addend=addend,
                           beta=float(args["beta"]))

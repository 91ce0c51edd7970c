"""Match: anchor on each softmax, walk back to the QK product and forward to the value product.

Every op between them is read through the rule families (``attnfuse.patterns``) and classified as
scale, bias, mask, causal mask, cast or dropout. The result is an ``AttentionSite`` or a ``Skip``
that says, in words a user can act on, why the softmax was left alone. Softmaxes with no product
on both sides are not attention and are not reported at all.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from torch.fx import Graph, Node

import torch

from attnfuse.canonical import (canonical, is_call, is_written, remove_dead_nodes, spelling, statically_true,
                                tensor_meta, value_users)
from attnfuse.dominance import absorbing, underflow_gap
from attnfuse.effects import functionalize, mark_writes, written_between
from attnfuse.original import NoOriginal, original_program
from attnfuse.patterns.biases import Add, bias_reason
from attnfuse.patterns.casts import Cast, peel_upcasts
from attnfuse.patterns.causal import classify, classify_additive
from attnfuse.patterns.dropout import Dropout
from attnfuse.patterns.layouts import Operand, Permute, peel_scaled_head_repeat
from attnfuse.patterns.masks import KeepMask, Select, fill_value, keep_mask, mask_reason
from attnfuse.patterns.products import Product
from attnfuse.patterns.scales import Factor, Multiply, score_factor
from attnfuse.patterns.score_functions import score_function
from attnfuse.patterns.score_mods import Tanh
from attnfuse.patterns.softmax import Softmax
from attnfuse.precision import site_dtype
from attnfuse.site import AttentionSite, ScoreTerms

_SEARCH_DEPTH = 8


@dataclass
class Skip:
    """A softmax that looks like attention but was left alone, and why."""

    softmax: Node
    reason: str


class NotFusable(Exception):
    """Raised inside the matcher with the reason a site cannot be rewritten."""


def find_sites(graph: Graph) -> Iterator[Union[AttentionSite, Skip]]:
    """Every attention-like softmax in ``graph``, matched into a site or skipped with a reason.

    In-place writes are made functional where that is exact and the remaining ones recorded
    (``attnfuse.effects``); dead values (debug copies such as ``sim.clone()`` kept for inspection and
    never returned) are removed, so they do not count as uses of the scores.
    """
    functionalize(graph)
    remove_dead_nodes(reversed(list(graph.nodes)))
    mark_writes(graph)
    transformed = _under_function_transform(graph)
    for node in list(graph.nodes):
        op = spelling(node)
        if isinstance(op, Softmax) and looks_like_attention(node, op):
            if node in transformed:
                yield Skip(node, f"inside `torch.{transformed[node]}` (a torch.func transform): fused kernels are "
                                 "not rewritten there; the attention runs as written")
                continue
            try:
                yield match_site(node, op)
            except NotFusable as reason:
                yield Skip(node, str(reason))


def _under_function_transform(graph: Graph) -> dict[Node, str]:
    """Nodes Dynamo inlined from inside ``torch.vmap`` / ``torch.func.grad`` / ``jvp``, with the transform's name.

    Their tensors are batched or wrapped at run time (the recorded shapes are per example), so a rewrite
    there would run kernels on the wrong layout or let a tensor escape its transform.
    """
    inside, stack = {}, []
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name.endswith("_increment_nesting"):
            stack.append(_TRANSFORMS.get(name.strip("_").split("_")[0], "func"))
        elif name.endswith("_decrement_nesting") and stack:
            stack.pop()
        elif stack:
            inside[node] = stack[-1]
    return inside


_TRANSFORMS = {"vmap": "vmap", "grad": "func.grad", "jvp": "func.jvp", "func": "func.functionalize"}


# ----------------------------------------------------------------------------- reachability

def _is_passthrough(op: object) -> bool:
    return isinstance(op, (Multiply, Add, Select, Cast, Permute, Dropout, Tanh))


def _score_inputs(op: object) -> list:
    if isinstance(op, (Multiply, Add)):
        return [op.a, op.b]
    if isinstance(op, Select):
        return [op.if_true, op.if_false]
    return [op.x]


def _is_reshape(node: object) -> bool:
    return isinstance(node, Node) and is_call(node, (torch.reshape,), ("view", "reshape"))


def _is_unknown_step(node: Node, source: object) -> bool:
    """A call no rule reads whose result keeps the rank of ``source``, one of its tensor inputs: an
    elementwise op (``torch.max(s, finfo.min)``, ``clamp``), or an op on the key axis (a sink column
    concatenated, sliced off after the softmax). A step on the way between two products."""
    op = canonical(node)
    if isinstance(op, (Product, Softmax)) or _is_passthrough(op) or node.op not in ("call_function", "call_method"):
        return False
    out, into = tensor_meta(node), tensor_meta(source)
    return out is not None and into is not None and out.dim() == into.dim()


def reaches_product(node: object, depth: int = _SEARCH_DEPTH, unknown: int = 0) -> bool:
    """Whether ``node`` is a product, possibly through elementwise score ops (or reshapes), and through
    up to ``unknown`` ops no rule reads that keep the rank (``_is_unknown_step``)."""
    op = spelling(node)
    if isinstance(op, Product):
        return True
    if not depth:
        return False
    if _is_reshape(node):
        return reaches_product(node.args[0], depth - 1, unknown)
    if _is_passthrough(op):
        return any(reaches_product(x, depth - 1, unknown) for x in _score_inputs(op) if isinstance(x, Node))
    return bool(unknown) and isinstance(node, Node) and any(
        reaches_product(x, depth - 1, unknown - 1) for x in node.all_input_nodes if _is_unknown_step(node, x))


def _feeds_product(node: Node, depth: int = _SEARCH_DEPTH) -> bool:
    for user in node.users:
        op = spelling(user)
        if isinstance(op, Product) or (depth and _is_passthrough(op) and _feeds_product(user, depth - 1)):
            return True
        if depth and (op is None or _is_reshape(user) or _is_unknown_step(user, node)) \
                and _feeds_product(user, depth - 1):
            return True
    return False


# Unknown ops allowed between the QK product and the softmax for the softmax to count as attention
# (it is then reported, skipped with the op's name, instead of vanishing from the report).
_UNKNOWN_STEPS = 3


def looks_like_attention(node: Node, op: Softmax) -> bool:
    """A softmax between two products, possibly through a few ops no rule reads: the kind the audit
    reports on (fused, or skipped with a reason)."""
    return reaches_product(op.x, unknown=_UNKNOWN_STEPS) and _feeds_product(node)


# ----------------------------------------------------------------------------- the walk

def _single_user(node: Node, what: str) -> None:
    if len(value_users(node)) != 1:
        raise NotFusable(f"{what}: also used outside the attention (returned, stored or reused)")


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"`{target}`"


def _score_side(a: object, b: object) -> tuple[object, object, bool]:
    """(scores, other, scores_are_first) for a binary op with the scores on one side."""
    if isinstance(a, Node) and reaches_product(a):
        return a, b, True
    if isinstance(b, Node) and reaches_product(b):
        return b, a, False
    raise NotFusable("cannot tell which operand is the attention scores")


def walk_to_product(scores_input: Node) -> tuple[Node, Product, list]:
    """Steps from the QK product to the softmax input, in forward order, and the product itself."""
    steps: list = []
    node = scores_input
    while True:
        if is_written(node):
            raise NotFusable("the attention scores are written in place through a view (e.g. a slice "
                             "assignment into the scores); not supported yet")
        op = canonical(node)
        if isinstance(op, Product):
            steps.reverse()
            return node, op, steps
        if isinstance(op, Multiply):
            scores, other, first = _score_side(op.a, op.b)
            if op.inverse and not first:
                raise NotFusable("the scores are the divisor of a division")
            steps.append(("factor", other, op.inverse))
        elif isinstance(op, Add):
            scores, other, first = _score_side(op.a, op.b)
            if not first and op.alpha * op.sign != 1.0:
                raise NotFusable("the scores are negated or scaled inside an addition")
            steps.append(("bias", other, op.alpha * op.sign if first else 1.0))
        elif isinstance(op, Select):
            scores, other, _ = _score_side(op.if_false, op.if_true)
            steps.append(("fill", op.cond, other, other is op.if_true))
        elif isinstance(op, Tanh):
            scores = op.x
            steps.append(("tanh",))
        elif isinstance(op, Cast):
            scores = op.x
        elif isinstance(op, Permute) and op.perm == tuple(range(len(op.perm))):
            scores = op.x
        elif isinstance(op, Permute):
            raise NotFusable("the scores are transposed between the QK product and the softmax")
        elif _is_reshape(node):
            raise NotFusable("the scores are reshaped between the QK product and the softmax "
                             "(heads split from the batch); not supported yet")
        else:
            raise NotFusable(f"unsupported op {_describe(node)} between the QK product and the softmax")
        _single_user(scores, "the attention scores")
        node = scores


def _apply_steps(product: Product, steps: list, rank: int) -> ScoreTerms:
    """Fold the steps into canonical score terms; raises where the order cannot be proven equal."""
    terms = ScoreTerms(scale=product.alpha)
    if product.addend is not None:
        terms.biases.append((product.addend, product.beta))
    post_tanh: Optional[float] = None  # factors applied after a tanh (the softcap)
    for step in steps:
        kind = step[0]
        if terms.keep_masks and terms.fill != float("-inf") and kind != "fill":
            raise NotFusable("the scores change after a finite mask fill (the fill would not stay a mask)")
        if kind == "tanh":
            if post_tanh is not None or terms.biases or terms.keep_masks or terms.tensor_factors:
                raise NotFusable("tanh is applied after a bias, mask or another tanh (not a softcap)")
            post_tanh = 1.0
        elif kind == "factor" and post_tanh is not None and not terms.biases and not terms.keep_masks:
            value = score_factor(step[1], step[2], rank)
            if isinstance(value, str) or value.as_float() is None:
                raise NotFusable("the softcap is multiplied by a tensor")
            post_tanh *= value.as_float()
        elif kind == "factor" and post_tanh is not None:
            raise NotFusable("the scores are scaled after a softcap and a bias or mask")
        elif kind == "factor":
            factor = score_factor(step[1], step[2], rank)
            if isinstance(factor, str):
                raise NotFusable(factor)
            value = factor.as_float()
            if value is None:
                if terms.biases or terms.keep_masks:
                    raise NotFusable("a tensor scale is applied after a bias or mask")
                terms.tensor_factors.append(factor)
            else:
                if terms.keep_masks and value <= 0:
                    raise NotFusable("masked scores are multiplied by a non-positive number")
                terms.scale *= value
                terms.biases = [(b, c * value) for b, c in terms.biases]
        elif kind == "bias":
            reason = bias_reason(step[1], rank)
            if reason:
                raise NotFusable(reason)
            terms.biases.append((step[1], step[2]))
        else:
            _, cond, fill, fill_where_true = step
            value = fill_value(fill)
            if isinstance(value, str):
                raise NotFusable(value)
            if terms.fill is not None and terms.fill != value:
                raise NotFusable("masks fill different values; a fully masked row would not be uniform")
            mask = keep_mask(cond, fill_where_true)
            reason = mask_reason(mask, rank)
            if reason:
                raise NotFusable(reason)
            terms.fill = value
            terms.keep_masks.append(mask)
    if post_tanh is not None:
        if post_tanh == 0:
            raise NotFusable("the softcap is multiplied by zero")
        terms.softcap, terms.scale = post_tanh, terms.scale * post_tanh
    return terms


def _qk_axes(product: Product, softmax_dim: int) -> tuple[Operand, Operand, str, str, str, str]:
    out = product.out_axes
    if softmax_dim % len(out) != len(out) - 1:
        raise NotFusable("the softmax is not over the last axis of the scores (over the queries?)")
    query, key = out[-2], out[-1]
    lhs, rhs = product.operands()
    q, k = (lhs, rhs) if query in lhs.axes else (rhs, lhs)
    if query not in q.axes or key not in k.axes or key in q.axes or query in k.axes:
        raise NotFusable("the softmax axis is not the key axis of the QK product")
    contracted = [c for c in q.axes if c in k.axes and c not in out]
    if len(contracted) != 1:
        raise NotFusable(f"the QK product contracts {len(contracted)} axes, not one")
    extra = [c for c in q.axes + k.axes if c not in out and c not in contracted]
    if extra:
        raise NotFusable("the QK product sums over an axis other than the head dimension")
    batch = out[:-2]
    if any(c not in q.axes for c in batch):
        raise NotFusable("q lacks a batch axis of the scores")
    return q, k, batch, query, key, contracted[0]


def _walk_to_value_product(softmax: Node) -> tuple[Node, Product, Union[float, Node], Node]:
    """The value product after the softmax, the dropout on the way, and the probabilities node it reads."""
    node, dropout_p = softmax, 0.0
    while True:
        _single_user(node, "the attention weights")
        user = value_users(node)[0]
        op = canonical(user)
        if isinstance(spelling(user), Product):  # writes to its result come after it: not part of the site
            return user, spelling(user), dropout_p, node
        if isinstance(op, Dropout) and op.x is node and op.active and (isinstance(dropout_p, Node) or dropout_p > 0):
            raise NotFusable("the attention weights go through two active dropouts; the fused call applies one")
        if isinstance(op, Dropout) and op.x is node:
            dropout_p = op.p if op.active else dropout_p
        elif not (isinstance(op, Cast) or (isinstance(op, Permute) and op.perm == tuple(range(len(op.perm))))):
            raise NotFusable(f"the attention weights go through {_describe(user)} before the value product")
        node = user


def _value_axes(pv: Product, probs: Node, scores_axes: str, key: str) -> tuple[Operand, str, str]:
    """v in the QK letter namespace, v's feature letter, and the output axes in that namespace."""
    p, v = (pv.lhs, pv.rhs) if pv.lhs.node is probs else (pv.rhs, pv.lhs)
    if p.node is not probs or v.node is probs:
        raise NotFusable("the value product does not read the attention weights directly")
    rename = dict(zip(p.axes, scores_axes))
    contracted = [c for c in p.axes if c in v.axes and c not in pv.out_axes]
    if contracted != [next(c for c, s in rename.items() if s == key)]:
        raise NotFusable("the product after the softmax does not sum over the keys "
                         "(weights mixed across heads or queries?)")
    if any(c not in pv.out_axes for c in p.axes if c not in contracted):
        raise NotFusable("the value product sums the weights over heads or queries")
    free = [c for c in v.axes if c not in p.axes]
    if len(free) != 1 or free[0] not in pv.out_axes:
        raise NotFusable("v must have exactly one feature axis")
    value_dim = next(c for c in "edcba" + string.ascii_lowercase if c not in scores_axes)
    rename[free[0]] = value_dim
    if any(rename.get(c) in (None,) for c in v.axes) or scores_axes[-2] in [rename[c] for c in v.axes]:
        raise NotFusable("v has a query axis")
    v_axes = "".join(rename[c] for c in v.axes)
    out_axes = "".join(rename[c] for c in pv.out_axes)
    return Operand(v.node, v_axes), value_dim, out_axes


def _size_along(operand: Operand, axis: str) -> object:
    return tensor_meta(operand.node).shape[operand.axes.index(axis)]


def _apply_masks(terms: ScoreTerms, L: object, S: object, dtype: torch.dtype) -> None:
    """Turn masks that are causal triangles into the causal flag; drop masks that keep everything.

    Boolean keep-masks and constant additive ``0 / finfo.min`` biases are both read this way.
    """
    biases = []
    for bias, coefficient in terms.biases:
        found = classify_additive(bias, L, S) if coefficient > 0 else None
        if found is None:
            biases.append((bias, coefficient))
            continue
        pattern, fill = found
        if pattern.kind == "all":
            continue
        alone = len(terms.biases) == 1 and not terms.keep_masks and terms.fill is None
        if pattern.kind == "causal" and alone and _absorbs(fill * coefficient, dtype, terms.softcap) and \
                not _some_row_loses_every_key(pattern.alignment, L, S):
            terms.causal, terms.window = pattern.alignment, pattern.window
            # an additive mask over a row of no keys is softmax(s + c), not a masked row: checked per call
            terms.keys_in_every_row = not _every_row_keeps_a_key(pattern.alignment, L, S)
            continue
        biases.append((bias, coefficient))
    terms.biases = biases
    remaining: list[KeepMask] = []
    for mask in terms.keep_masks:
        pattern = classify(mask, L, S)
        if pattern.kind == "all":
            continue
        if pattern.kind == "causal" and terms.causal is None:
            terms.causal, terms.window = pattern.alignment, pattern.window
            if pattern.guarded_by:
                terms.causal_guard = (mask, pattern.guarded_by)
            continue
        remaining.append(mask)
    terms.keep_masks = remaining
    if not remaining and terms.causal is None:
        terms.fill = None


def _every_row_keeps_a_key(alignment: str, L: object, S: object) -> bool:
    """Whether a causal triangle leaves every query row at least one key (so no row is fully masked)."""
    return statically_true(lambda: S >= 1) and (alignment == "top_left" or statically_true(lambda: L <= S))


def _absorbs(value: float, dtype: torch.dtype, softcap: Optional[float]) -> bool:
    """Whether adding ``value`` removes a key from the softmax for any scores: it is at the bottom of
    ``dtype``, or scores bounded by a softcap (``|s| <= cap``) cannot come within the fp64 underflow gap."""
    return value <= absorbing(dtype) or (softcap is not None and value <= -(2 * abs(softcap) + underflow_gap(torch.float64)))


def _some_row_loses_every_key(alignment: str, L: object, S: object) -> bool:
    return statically_true(lambda: S < 1) or (alignment == "bottom_right" and statically_true(lambda: L > S))


def _fill_check(terms: ScoreTerms, dtype: torch.dtype) -> None:
    """Decide how the site's finite fill is known to mask: proven, or checked per call (``attnfuse.dominance``)."""
    finite = terms.fill is not None and terms.fill != float("-inf") and (terms.keep_masks or terms.causal)
    if not finite:
        return
    if terms.fill > absorbing(dtype) and terms.functions:
        raise NotFusable(f"masked scores are set to {terms.fill:g} beside a position-computed bias: whether the fill "
                         "still masks cannot be checked cheaply; use -inf or finfo.min as the fill")
    terms.fill_check = terms.fill > absorbing(dtype) or bool(terms.biases)


def _index_functions(terms: ScoreTerms, batch_rank: int) -> None:
    """Biases computed from positions (ALiBi, relative-position tables) become score functions."""
    kept = []
    for bias, coefficient in terms.biases:
        function = score_function(bias, batch_rank)
        if function is not None and function.uses_positions:
            terms.functions.append((function, coefficient))
        else:
            kept.append((bias, coefficient))
    terms.biases = kept


def _check_no_write_inside(first: Node, last: Node, softmax: Node, operands: list[Node], terms: ScoreTerms) -> None:
    """The fused call reads its tensors where the value product was: none may be written in between."""
    read = operands + [m.node for m in terms.keep_masks] + [b for b, _ in terms.biases] + \
        [f.value for f in terms.tensor_factors] + [leaf for f, _ in terms.functions for leaf in f.leaves]
    if terms.causal_guard:
        read += list(terms.causal_guard[1])
    if terms.fill_check or terms.keys_in_every_row:
        try:
            original_program(last, read)
        except NoOriginal as error:
            raise NotFusable(f"the additive mask or finite fill must be checked on each call, and the site's own "
                             f"ops cannot be kept for calls where the check fails ({error})")
    node = written_between(read, first, last)
    if node is not None:
        raise NotFusable(f"`{node.name}` is written in place between the QK product and the value product; "
                         "the fused call would read the new values")
    probs = softmax
    while probs is not last:
        if is_written(probs):
            raise NotFusable("the attention weights are written in place before the value product")
        probs = value_users(probs)[0]
def _chain(product_node: Node, pv_node: Node) -> list[Node]:
    """The nodes from the QK product up to (not including) the value product: one value user each."""
    nodes, node = [], product_node
    while node is not pv_node and len(nodes) <= 4 * _SEARCH_DEPTH:
        nodes.append(node)
        users = value_users(node)
        if len(users) != 1:
            break
        node = users[0]
    return nodes


def _site_dtype(q: Operand, k: Operand, v: Operand, chain: list[Node], pv_node: Node):
    """The dtype the fused call computes in (``attnfuse.precision``)."""
    scores = [m.dtype for m in map(tensor_meta, chain) if m is not None and m.is_floating_point()]
    output = tensor_meta(pv_node)
    if output is None or not output.is_floating_point():
        raise NotFusable("the value product does not give a floating-point tensor")
    return site_dtype([tensor_meta(t.node).dtype for t in (q, k, v)], output.dtype, scores)


def _shared_head_repeat(k: Operand, v: Operand, head_axis: str, terms: ScoreTerms) -> tuple[Operand, Operand, int]:
    """k and v before a head repeat they share (grouped-query attention), and the group size.

    A number multiplying k after its repeat (``repeat(k) * s``) scales every score of the product, so it
    moves into the scale. Where k and v do not repeat alike (only one is repeated, or k is multiplied by a
    tensor after its repeat), the repeated tensors are read as they are.
    """
    k_repeat, v_repeat = peel_scaled_head_repeat(k, head_axis), peel_scaled_head_repeat(v, head_axis)
    if k_repeat.group != v_repeat.group or v_repeat.factors or not all(
            _foldable_factor(value, terms) for value, _ in k_repeat.factors):
        return k, v, 1
    for value, inverse in k_repeat.factors:
        if isinstance(value, Node):
            terms.tensor_factors.append(Factor(value, inverse))
        else:
            terms.scale = terms.scale / value if inverse else terms.scale * value
    return peel_upcasts(k_repeat.source), peel_upcasts(v_repeat.source), k_repeat.group


def _foldable_factor(value: object, terms: ScoreTerms) -> bool:
    """A finite nonzero number, or a run-time number where no softcap follows (as for run-time scales)."""
    if isinstance(value, Node):
        return terms.softcap is None
    return math.isfinite(value) and value != 0


def match_site(softmax: Node, op: Softmax) -> AttentionSite:
    """Match one softmax into an ``AttentionSite``; raises ``NotFusable`` with the reason otherwise."""
    _single_user(op.x, "the attention scores")
    product_node, product, steps = walk_to_product(op.x)
    _single_user(product_node, "the QK product")
    scores_meta, product_meta = tensor_meta(op.x), tensor_meta(product_node)
    if scores_meta is None or product_meta is None or tuple(scores_meta.shape) != tuple(product_meta.shape):
        raise NotFusable("a bias or mask broadcasts the scores to a different shape")
    q, k, batch, query, key, head_dim = _qk_axes(product, op.dim)
    terms = _apply_steps(product, steps, product_meta.dim())
    pv_node, pv, dropout_p, probs = _walk_to_value_product(softmax)
    v, value_dim, out_axes = _value_axes(pv, probs, product.out_axes, key)
    metas = [tensor_meta(t.node) for t in (q, k, v)]
    if any(m is None or not m.is_floating_point() for m in metas):
        raise NotFusable("q, k and v must be floating-point tensors")
    q, k, v = peel_upcasts(q), peel_upcasts(k), peel_upcasts(v)
    kv_group = 1
    if len(batch) >= 2:
        k, v, kv_group = _shared_head_repeat(k, v, batch[-1], terms)
    _apply_masks(terms, _size_along(q, query), _size_along(k, key), scores_meta.dtype)
    _index_functions(terms, len(batch))
    terms.scores_dtype = scores_meta.dtype
    _fill_check(terms, scores_meta.dtype)
    _check_no_write_inside(product_node, pv_node, softmax, [q.node, k.node, v.node], terms)
    return AttentionSite(softmax=softmax, output=pv_node, q=q, k=k, v=v, batch=batch, query=query, key=key,
                         head_dim=head_dim, value_dim=value_dim, out_axes=out_axes, scores=terms,
                         dropout_p=dropout_p, kv_group=kv_group,
                         dtype=_site_dtype(q, k, v, _chain(product_node, pv_node), pv_node))

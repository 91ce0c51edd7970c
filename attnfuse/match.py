"""Match: anchor on each softmax, walk back to the QK product and forward to the value product.

Every op between them is read through the rule families (``attnfuse.patterns``) and classified as
scale, bias, mask, causal mask, cast or dropout. The result is an ``AttentionSite`` or a ``Skip``
that says, in words a user can act on, why the softmax was left alone. Softmaxes with no product
on both sides are not attention and are not reported at all.
"""
from __future__ import annotations

import math
import operator
import string
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from torch.fx import Graph, Node

import torch

from attnfuse import logs
from attnfuse.added_masks import AddedMask, absorbs_every_score
from attnfuse.canonical import canonical, normalize_dunder_methods, spelling
from attnfuse.dominance import absorbing, half_live_floor, underflow_gap
from attnfuse.effects import fake_result, functionalize, mark_writes, storage, written_between
from attnfuse.folding import constant_value
from attnfuse.fx_utils import (WRITTEN, has_side_effect, is_call, is_written, remove_dead_nodes, same_size,
                               statically_true, tensor_meta, value_users)
from attnfuse.original import NoOriginal, original_program
from attnfuse.patterns.bias_fills import cast_bias, filled_bias
from attnfuse.patterns.biases import bias_reason
from attnfuse.patterns.casts import peel_upcasts
from attnfuse.patterns.causal import classify, classify_additive, keep_pattern, read_at_run_time
from attnfuse.patterns.layouts import (REGROUPED_FROM, keeps_query_key_axes, peel_scaled_head_repeat, regroup,
                                      regroup_recipe, reshape_blocks)
from attnfuse.patterns.masks import (binary_mask, clamp_floor, complement_value, drops_where_zero, fill_value, full_index,
                                     keep_mask, mask_reason, pad_region, same_keep_mask, weights_zeroing, zero_or_fill)
from attnfuse.patterns.scales import score_factor
from attnfuse.patterns.softmax import calls_softmax
from attnfuse.patterns.score_functions import score_function
from attnfuse.precision import site_dtype
from attnfuse.score_steps import (BiasStep, ClampStep, FactorStep, FillStep, ReshapeStep, Step, TanhStep,
                                  with_operand)
from attnfuse.site import AttentionSite, ScoreTerms
from attnfuse.unpadded import KEEPS, MASKS, ZERO, Unpadded
from attnfuse.vocabulary import (MASKING_THRESHOLD, Add, Cast, Clamp, Dropout, Factor, FilledBias, KeepMask, MaskPattern,
                                 Multiply, Operand, Permute, Product, RegionWrite, Select, Softmax, Tanh)

_SEARCH_DEPTH = 8
BUILT_FOR = "attnfuse_built_for"  # node.meta key: a node built while matching a site (erased if it is skipped)


@dataclass
class Skip:
    """A softmax that looks like attention but was left alone, and why."""

    softmax: Node
    reason: str


class NotFusable(Exception):
    """Raised inside the matcher with the reason a site cannot be rewritten."""


def find_sites(graph: Graph, reads_values: bool = True) -> Iterator[Union[AttentionSite, Skip]]:
    """Every attention-like softmax in ``graph``, matched into a site or skipped with a reason.

    In-place writes are made functional where that is exact and the remaining ones recorded
    (``attnfuse.effects``); dead values (debug copies such as ``sim.clone()`` kept for inspection and
    never returned) are removed, so they do not count as uses of the scores. ``reads_values``: the rewritten
    graph runs eagerly, where per-call checks read values (under Inductor they cannot; see ``match_site``).
    """
    with logs.phase("effects"):
        normalize_dunder_methods(graph)
        functionalize(graph)
        remove_dead_nodes(reversed(list(graph.nodes)))
        mark_writes(graph)
        transformed = _under_function_transform(graph)
    for node in list(graph.nodes):
        if not calls_softmax(node):  # no other node reads as a softmax: not canonicalized here
            continue
        op = spelling(node)
        if isinstance(op, Softmax) and looks_like_attention(node, op):
            if node in transformed:
                yield Skip(node, f"inside `torch.{transformed[node]}` (a torch.func transform): fused kernels are "
                                 "not rewritten there; the attention runs as written")
                continue
            try:
                yield match_site(node, op, reads_values)
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
    return isinstance(op, (Multiply, Add, Select, Cast, Permute, Dropout, Tanh, Clamp))


def _score_inputs(op: object) -> list:
    if isinstance(op, (Multiply, Add)):
        return [op.a, op.b]
    if isinstance(op, Select):
        return [op.if_true, op.if_false]
    return [op.x]


def _is_reshape(node: object) -> bool:
    return isinstance(node, Node) and is_call(node, (torch.reshape, torch.flatten, torch.unflatten),
                                              ("view", "reshape", "flatten", "unflatten"))


def _keeps_dtype(node: Node) -> bool:
    """Whether a reshape keeps its input's dtype (``x.view(torch.int32)`` reinterprets the bits instead)."""
    source, out = tensor_meta(node.args[0]), tensor_meta(node)
    return source is not None and out is not None and source.dtype == out.dtype


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
    users = [user for user in value_users(node) if not _reads_written_region(user, node)]
    if len(users) != 1:
        raise _used_elsewhere(what, users)


def _used_elsewhere(what: str, users: list[Node]) -> NotFusable:
    """Why a value of the site cannot be fused away: what else reads it, in words a user can act on."""
    if any(user.op == "output" for user in users):
        return NotFusable(f"{what}: returned by the graph (output_attentions=True, need_weights, a cache of them, or a Dynamo "
                          "graph break right after the attention keeps them alive); return only the output to fuse it")
    others = sorted({_describe(user) for user in users})
    return NotFusable(f"{what}: also read by {', '.join(others)} besides the attention (stored or reused); "
                      "the fused kernel never materializes them")


def _reads_written_region(user: Node, node: Node) -> bool:
    """``user`` is ``node[index]`` and ``node``'s region ``index`` is written with a value computed from it
    (``attn[:, :, 1:, 1:] += rel``): one use of the scores, checked by ``_region_steps``."""
    if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node):
        return False
    return any(isinstance(canonical(other), RegionWrite) and canonical(other).base is node and
               canonical(other).index == user.args[1] for other in node.users if other is not user)


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"`{target}`"


def _score_side(a: object, b: object, node: Node) -> tuple[object, object, bool]:
    """(scores, other, scores_are_first) for the binary op ``node`` with the scores on one side."""
    a_scores, b_scores = (isinstance(x, Node) and reaches_product(x) for x in (a, b))
    if a_scores and b_scores:
        raise NotFusable(f"both operands of {_describe(node)} are computed from the scores (the scores minus their "
                         "own row maximum, or two products combined); only a tensor that does not read the scores "
                         "can be added, multiplied or selected")
    if a_scores:
        return a, b, True
    if b_scores:
        return b, a, False
    unread = next((found for found in map(_unread_step, (a, b)) if found is not None), None)
    if unread is not None:
        raise _unsupported(unread)
    raise NotFusable(f"{_describe(node)} is between the QK product and the softmax, but neither of its operands is "
                     "read back to the product through ops attnfuse knows")


def _unread_step(node: object, depth: int = _SEARCH_DEPTH) -> Optional[Node]:
    """The first op no rule reads on the way from ``node`` back to the QK product (a sink ``cat``), if any."""
    if not isinstance(node, Node) or not depth or isinstance(spelling(node), Product):
        return None
    op = spelling(node)
    if _is_reshape(node) or _is_passthrough(op):
        inputs = [node.args[0]] if _is_reshape(node) else _score_inputs(op)
        return next((found for found in (_unread_step(x, depth - 1) for x in inputs) if found is not None), None)
    if any(reaches_product(x, depth - 1, _UNKNOWN_STEPS) for x in node.all_input_nodes if _is_unknown_step(node, x)):
        return node
    return None


# What an op no rule reads usually is, when it sits between the QK product and the softmax.
_UNSUPPORTED_HINTS = {
    "cat": "the scores are concatenated with another tensor (an attention-sink column, or global and local keys); "
           "not supported yet",
    "logsumexp": "the scores' logsumexp is taken (an attention sink applied as a rescaling); not supported yet",
    "sigmoid": "the scores go through a sigmoid, not a softmax",
    "relu": "the scores go through a relu (attention without softmax normalisation is not fused)",
}


def _unsupported(node: Node) -> NotFusable:
    name = _describe(node).strip("`")
    hint = _UNSUPPORTED_HINTS.get(name)
    return NotFusable(f"unsupported op {_describe(node)} between the QK product and the softmax" +
                      (f": {hint}" if hint else ""))


def walk_to_product(scores_input: Node) -> tuple[Node, Product, list[Step]]:
    """Steps from the QK product to the softmax input, in forward order, and the product itself."""
    steps: list[Step] = []
    node = scores_input
    while True:
        if is_written(node):
            raise NotFusable("the attention scores are written in place through a view (e.g. a slice "
                             "assignment into the scores); not supported yet")
        op = canonical(node)
        if isinstance(op, Product):
            steps.reverse()
            return node, op, _on_product_shape(node, op, steps, scores_input)
        if isinstance(op, Multiply):
            scores, other, first = _score_side(op.a, op.b, node)
            if op.inverse and not first:
                raise NotFusable("the scores are the divisor of a division")
            steps.append(FactorStep(other, op.inverse))
        elif isinstance(op, Add):
            scores, other, first = _score_side(op.a, op.b, node)
            if not first and op.alpha * op.sign != 1.0:
                raise NotFusable("the scores are negated or scaled inside an addition")
            steps.append(BiasStep(other, op.alpha * op.sign if first else 1.0))
        elif isinstance(op, Select):
            scores, other, _ = _score_side(op.if_false, op.if_true, node)
            steps.append(FillStep(op.cond, other, other is op.if_true))
        elif isinstance(op, Tanh):
            scores = op.x
            steps.append(TanhStep())
        elif isinstance(op, Clamp):
            scores = op.x
            if tensor_meta(node) is None or tensor_meta(scores) is None or \
                    tensor_meta(node).dtype != tensor_meta(scores).dtype:
                raise NotFusable("the clamp of the scores changes their dtype")
            steps.append(ClampStep(op.low, tensor_meta(node).dtype))
        elif isinstance(op, Cast):
            scores = op.x
        elif isinstance(op, Permute) and op.perm == tuple(range(len(op.perm))):
            scores = op.x
        elif isinstance(op, RegionWrite):
            scores = op.base
            steps.extend(reversed(_region_steps(node, op)))
        elif isinstance(op, Permute):
            raise NotFusable("the scores are transposed between the QK product and the softmax")
        elif _is_reshape(node):
            scores = node.args[0]
            steps.append(ReshapeStep(node))
        else:
            raise _unsupported(node)
        _single_user(scores, "the attention scores")
        node = scores


def _shape(node: object) -> Optional[tuple]:
    meta = tensor_meta(node)
    return tuple(meta.shape) if meta is not None else None


def _same_shape(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and len(a) == len(b) and \
        all(statically_true(lambda: x == y) for x, y in zip(a, b))


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


_BROADCAST = "a bias or mask broadcasts the scores to a different shape"


def _on_product_shape(product_node: Node, product: Product, steps: list[Step], scores_input: Node) -> list[Step]:
    """The steps with each tensor that was read on a reshaped view of the scores re-read on the QK product's
    own shape (a ``regroup`` node: the bias, mask or factor expanded and reshaped as the scores were).

    A reshape only relabels where each element of the flat scores sits, so an elementwise step on the
    view is the same step on the product with its tensor reshaped alike; the softmax rows stay the rows
    of the product when the view keeps the key axis last. Raises where that cannot be proven."""
    scores = _shape(product_node)
    if scores is None:
        raise NotFusable(_BROADCAST)
    view, blocks, kept = scores, None, []
    for step in steps:
        if isinstance(step, ReshapeStep):
            view, blocks = _reshaped(step.node, view, scores)
        elif blocks is None:
            kept.append(step)
        else:
            kept.append(_regrouped_step(step, view, blocks, product_node, product, scores_input))
    if not _same_shape(_shape(scores_input), view):
        raise NotFusable(_BROADCAST)
    if not statically_true(lambda: view[-1] == scores[-1]):
        raise NotFusable(f"the softmax runs over the last axis of the scores reshaped to {_shape_text(view)}, "
                         f"not over the {scores[-1]} keys of the QK product {_shape_text(scores)}")
    return kept


def _reshaped(node: Node, before: tuple, scores: tuple) -> tuple[tuple, Optional[list]]:
    """The shape a reshape of the scores gives, and how it regroups the product's axes (None: not at all)."""
    source, meta = tensor_meta(node.args[0]), tensor_meta(node)
    if not _keeps_dtype(node):
        raise NotFusable(f"the scores are reinterpreted by {_describe(node)} (a view as another dtype)")
    if not _same_shape(tuple(source.shape), before):
        raise NotFusable(_BROADCAST)
    view = tuple(meta.shape)
    if _same_shape(view, scores):
        return view, None
    blocks = reshape_blocks(scores, view)
    if blocks is None:
        raise NotFusable(f"the scores {_shape_text(scores)} are reshaped to {_shape_text(view)} before the softmax, "
                         "which does not only split or merge whole axes")
    return view, blocks


def _regrouped_step(step: Step, view: tuple, blocks: list, product_node: Node, product: Product,
                    scores_input: Node) -> Step:
    """``step`` with its tensor (bias, factor or mask) re-read on the product's shape."""
    meta = tensor_meta(step.operand) if step.operand is not None else None
    if meta is not None and meta.dim() > 0:  # a 0-d tensor reads the same on any shape (and promotes no dtype)
        return with_operand(step, _regroup_node(step.operand, view, blocks, product_node, product, scores_input))
    return step


def _regroup_node(tensor: Node, view: tuple, blocks: list, product_node: Node, product: Product,
                  scores_input: Node) -> Node:
    """A new graph node (before ``scores_input``) computing ``tensor`` read on the product's shape."""
    scores, meta = _shape(product_node), tensor_meta(tensor)
    operands = product.operands()

    def size_source(axis: int) -> Optional[tuple]:
        letter = product.out_axes[axis]
        return next(((i, o.axes.index(letter)) for i, o in enumerate(operands) if letter in o.axes
                     and same_size(tensor_meta(o.node).shape[o.axes.index(letter)], scores[axis])), None)

    recipe = regroup_recipe(meta, view, scores, blocks, size_source)
    if isinstance(recipe, str):
        raise NotFusable(recipe)
    sources = [o.node for o in operands] if any(isinstance(s, tuple) for s in recipe.shape) else []
    shape = [scores[a] if isinstance(s, tuple) else s for a, s in enumerate(recipe.shape)]
    example = tensor_meta(product_node).new_empty(shape, dtype=meta.dtype, device=meta.device)
    node = _built(scores_input, regroup, (tensor, recipe.rank, recipe.expand, recipe.shape, recipe.blocks, *sources),
                  example)
    if WRITTEN in tensor.meta:  # the node may be a view of ``tensor``: it sees the same writes
        node.meta[WRITTEN] = tensor.meta[WRITTEN]
    if keeps_query_key_axes(view, scores, blocks):
        node.meta[REGROUPED_FROM] = tensor
    return node


def _region_steps(node: Node, op: RegionWrite) -> list[Step]:
    """The steps a write into a region of the scores applies, in forward order, each operand padded to the
    whole scores (a bias with 0, a mask with "keep" outside the region), which is exact: ``s + 0 == s``.
    A region set to a value that does not read the scores (``attn[..., :n] = -inf``) is a fill of it."""
    meta = tensor_meta(op.base)
    sizes = tuple(meta.shape) if meta is not None else ()
    if isinstance(op.index, Node):
        return _mask_index_fill(op)
    index = full_index(op.index, len(sizes))
    if index is None:
        raise NotFusable("the scores are written in place through an index other than slices and integers "
                         "(`None`, a tensor, a computed bound); write the change as a mask or a bias")
    if not all(isinstance(size, int) for size in sizes):
        raise NotFusable("a region of the scores is written in place under dynamic shapes; not supported yet "
                         "(add a zero-padded bias or a mask instead)")
    inner = _region_chain(op.value, op.base, op.index)
    if inner is None:
        value = tensor_meta(op.value)
        if value is not None and value.numel() != 1:
            raise NotFusable("a region of the scores is overwritten with a tensor (`attn[...] = x`); only a constant "
                             "<= -1e4 written into a region acts as a mask")
        drop = _built(node, pad_region, (True, index, sizes, False, meta.device))
        return [FillStep(drop, op.value, True)]
    steps = []
    for step in inner:
        if isinstance(step, BiasStep):
            term = tensor_meta(step.value)
            region_rank = len(torch.empty(sizes, device="meta")[index].shape)
            if term is None or term.dtype != meta.dtype or term.dim() > region_rank:
                raise NotFusable("a bias of another dtype or shape is added into a region of the scores")
            steps.append(BiasStep(_built(node, pad_region, (step.value, index, sizes, 0)), step.coefficient))
        else:
            mask = step.mask()
            if tensor_meta(mask.node) is None or tensor_meta(mask.node).dtype != torch.bool:
                raise NotFusable("a region of the scores is filled through a mask that is not boolean")
            padded = _built(node, pad_region, (mask.node, index, sizes, not mask.negated))
            steps.append(FillStep(padded, step.value, mask.negated))
    return steps


def _mask_index_fill(op: RegionWrite) -> list[Step]:
    """``attn[mask] = c`` with a boolean ``mask`` of the scores' whole shape: ``masked_fill(mask, c)``."""
    mask, scores = tensor_meta(op.index), tensor_meta(op.base)
    if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != tuple(scores.shape):
        raise NotFusable("the scores are written in place through a tensor index; only a boolean mask of the "
                         "scores' whole shape (`attn[mask] = value`) is read, as a mask fill")
    return [FillStep(op.index, op.value, True)]


def _region_chain(value: object, base: Node, index: object) -> Optional[list[Step]]:
    """The bias and fill steps from ``base[index]`` to ``value`` (forward order), or None when ``value``
    does not read ``base`` at all (the region is set)."""
    steps, node = [], value
    while True:
        if isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem and \
                node.args[0] is base and node.args[1] == index:
            _single_user(node, "the region of the scores written in place")
            steps.reverse()
            return steps
        op = canonical(node)
        if isinstance(op, Add) and _reads(op.a, base) and not _reads(op.b, base):
            steps.append(BiasStep(op.b, op.alpha * op.sign))
            scores = op.a
        elif isinstance(op, Add) and _reads(op.b, base) and not _reads(op.a, base) and op.sign == op.alpha == 1.0:
            steps.append(BiasStep(op.a, 1.0))
            scores = op.b
        elif isinstance(op, Select) and _reads(op.if_false, base) and not _reads(op.if_true, base):
            steps.append(FillStep(op.cond, op.if_true, True))
            scores = op.if_false
        elif isinstance(op, Select) and _reads(op.if_true, base) and not _reads(op.if_false, base):
            steps.append(FillStep(op.cond, op.if_false, False))
            scores = op.if_true
        elif not _reads(node, base):
            if steps:
                raise NotFusable("a region of the scores is written with a value that does not read it")
            return None
        else:
            raise NotFusable(f"a region of the scores is written in place with {_describe(node)} of it; only "
                             "additions (`+=`) and mask fills of the region are read")
        if isinstance(node, Node) and node is not value:
            _single_user(node, "the region of the scores written in place")
        node = scores


def _reads(value: object, base: Node, depth: int = _SEARCH_DEPTH) -> bool:
    """Whether ``value`` is computed from ``base``."""
    if value is base:
        return True
    return isinstance(value, Node) and depth > 0 and any(_reads(x, base, depth - 1) for x in value.all_input_nodes)


def _built(before: Node, target: object, args: tuple, example: Optional[torch.Tensor] = None) -> Node:
    """A node computing ``target(*args)`` inserted before ``before`` for the site being matched (a padded
    bias or mask, a regrouped tensor); erased again if the site is skipped (``match_site``). Its example
    value is ``example``, else computed on the fake values of ``args``."""
    graph = before.graph
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in before.meta.items()
                      if k in ("stack_trace", "nn_module_stack", "source_fn_stack")})
    try:
        node.meta["example_value"] = example if example is not None else \
            fake_result(target, "call_function", args, {})
        if node.meta["example_value"] is None and not any(isinstance(a, Node) for a in args):
            node.meta["example_value"] = target(*args)  # a constant region mask: small, computed once
    except Exception:
        node.meta["example_value"] = None
    node.meta[BUILT_FOR] = True
    return node


def _built_nodes(graph: Graph) -> set[Node]:
    return {node for node in graph.nodes if node.meta.get(BUILT_FOR)}


def discard_unused_built(graph: Graph) -> bool:
    """Erase the nodes built while matching sites that were then not rewritten (rolled back by verify);
    whether there were any."""
    return _erase_built(graph, set())


def _erase_built(graph: Graph, kept: set[Node]) -> bool:
    """Erase the nodes built since ``kept`` was taken, for a site that was then skipped (nothing reads them)."""
    erased = False
    for node in reversed(list(graph.nodes)):
        if node.meta.get(BUILT_FOR) and node not in kept and not node.users:
            graph.erase_node(node)
            erased = True
    return erased


def _apply_steps(product: Product, steps: list[Step], rank: int) -> ScoreTerms:
    """Fold the steps into canonical score terms; raises where the order cannot be proven equal."""
    terms = ScoreTerms(scale=product.alpha)
    if product.addend is not None:
        terms.biases.append((product.addend, product.beta))
    post_tanh: Optional[float] = None  # factors applied after a tanh (the softcap)
    product_mask: Optional[Node] = None  # a 0/1 mask multiplying the scores, completed by the next step
    for step in steps:
        if product_mask is not None:
            _complete_product_mask(terms, product_mask, step, rank)
            product_mask = None
            continue
        if terms.keep_masks and terms.fill != float("-inf") and not isinstance(step, (FillStep, BiasStep, ClampStep)):
            raise NotFusable("the scores change after a finite mask fill (the fill would not stay a mask)")
        if isinstance(step, TanhStep):
            # a tensor factor before the tanh is folded into q: it scales the scores the tanh reads, as written
            if post_tanh is not None or terms.biases or terms.keep_masks:
                raise NotFusable("tanh is applied after a bias, mask or another tanh (not a softcap)")
            post_tanh = 1.0
        elif isinstance(step, FactorStep) and post_tanh is not None and not terms.biases and not terms.keep_masks:
            value = score_factor(step.value, step.inverse, rank)
            if isinstance(value, str) or value.as_float() is None:
                raise NotFusable("the softcap is multiplied by a tensor")
            post_tanh *= value.as_float()
        elif isinstance(step, FactorStep) and post_tanh is not None:
            raise NotFusable("the scores are scaled after a softcap and a bias or mask")
        elif isinstance(step, FactorStep):
            factor = score_factor(step.value, step.inverse, rank)
            if isinstance(factor, str):
                product_mask = _product_mask(terms, step, factor, rank)
                continue
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
        elif isinstance(step, BiasStep) and isinstance(step.value, (int, float)) and step.value == 0:
            continue  # ``scores + 0`` (DeBERTa without relative attention): the same scores
        elif isinstance(step, BiasStep):
            reason = bias_reason(step.value, rank)
            if reason:
                raise NotFusable(reason)
            terms.biases.append((step.value, step.coefficient))
            if terms.keep_masks and terms.fill != float("-inf"):
                terms.after_fill.append(step.value)  # masked entries hold ``fill + bias``: checked per call
        elif isinstance(step, ClampStep):
            _apply_clamp(terms, step.low, step.dtype)
        else:
            _add_fill(terms, step.mask(), step.value, rank)
    if product_mask is not None:
        raise NotFusable(_UNFINISHED_PRODUCT_MASK)
    if post_tanh is not None:
        if post_tanh == 0:
            raise NotFusable("the softcap is multiplied by zero")
        terms.softcap, terms.scale = post_tanh, terms.scale * post_tanh
    return terms


def _add_fill(terms: ScoreTerms, mask: KeepMask, fill: object, rank: int, binary: bool = False) -> None:
    """Record a fill of ``fill`` outside the keep-mask ``mask`` (``binary``: a 0/1 float mask, not a bool)."""
    value = fill_value(fill)
    if isinstance(value, str):
        raise NotFusable(value)
    if terms.after_fill:
        raise NotFusable("a mask fill follows a bias that follows another finite fill; combine the masks into one")
    if terms.fill is not None and terms.fill != value:
        raise NotFusable("masks fill different values; a fully masked row would not be uniform")
    reason = None if binary else mask_reason(mask, rank)
    if reason:
        raise NotFusable(reason)
    terms.fill = value
    terms.keep_masks.append(mask)


_UNFINISHED_PRODUCT_MASK = ("the scores are multiplied by a 0/1 mask (`s * m`) that is not completed into a mask "
                            "fill: follow it with `+ c * (1 - m)` or `.masked_fill(m == 0, c)` (c <= -1e4)")


def _product_mask(terms: ScoreTerms, step: FactorStep, reason: str, rank: int) -> Node:
    """A tensor factor that varies along the keys: a 0/1 mask (GPT's ``w * b + -1e4 * (1 - b)``), to be
    completed by the next step, or the reason it is not a scale."""
    other = step.value
    proof = None if step.inverse else binary_mask(other)
    if proof is None or (tensor_meta(other).dim() > rank):
        raise NotFusable(reason)
    if terms.biases or terms.keep_masks or terms.tensor_factors or terms.scale <= 0:
        raise NotFusable("the scores are multiplied by a 0/1 mask after a bias, mask or tensor scale; multiply "
                         "the raw scores, or write the mask as a `masked_fill`")
    if not proof:
        terms.binary_masks.append(other)  # a 0/1 mask read from a buffer or an input: checked on each call
    return other


def _complete_product_mask(terms: ScoreTerms, mask: Node, step: Step, rank: int) -> None:
    """``s * m + c * (1 - m)`` is ``where(m, s, c)`` for 0/1 ``m``, finite ``c`` and finite ``s`` (``s * 0`` of an
    infinite score is NaN: checked per call); ``(s * m).masked_fill(m == 0, c)`` is exact for any ``s``."""
    if isinstance(step, BiasStep):
        value = complement_value(step.value, mask)
        if value is None:
            raise NotFusable(_UNFINISHED_PRODUCT_MASK)
        fill = value * step.coefficient
        if not math.isfinite(fill):
            raise NotFusable("the masked scores are set through `c * (1 - m)` with an infinite c, which is NaN "
                             "where m is 1; use a finite c or `masked_fill`")
        terms.finite_scores = True
        _add_fill(terms, KeepMask(mask, False), fill, rank, binary=True)
        return
    if isinstance(step, FillStep) and drops_where_zero(step.mask(), mask):
        _add_fill(terms, step.mask(), step.value, rank)
        return
    raise NotFusable(_UNFINISHED_PRODUCT_MASK)


def _apply_clamp(terms: ScoreTerms, low: object, dtype: torch.dtype) -> None:
    """``max(s, finfo.min)`` (XGLM) changes only ``-inf`` scores, into the lowest finite value: a ``-inf`` fill
    becomes that finite fill, and a ``-inf`` bias entry is finite there, which differs from the fused call only
    in a row with no key above the masking floor (checked on each call)."""
    value = clamp_floor(low, dtype)
    if isinstance(value, str):
        raise NotFusable(value)
    if value == float("-inf"):
        return
    if terms.softcap is not None or terms.functions:
        raise NotFusable("the scores are clamped after a softcap or a position-computed bias")
    if terms.fill == float("-inf"):
        terms.fill = value
    if terms.biases:
        terms.live_rows = True


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


def _walk_to_value_product(softmax: Node, scores: tuple) -> tuple[Node, Product, Union[float, Node], Node]:
    """The value product after the softmax, the dropout on the way (p a number or a run-time value), and
    the probabilities node it reads.

    The weights may be reshaped on the way (back to the QK product's shape ``scores``), and transposed
    right before the product, which then reads them through the transpose (``v @ attn.transpose(-2, -1)``)."""
    node, dropout_p = softmax, 0.0
    while True:
        user = _weights_user(node)
        op = canonical(user)
        if isinstance(spelling(user), Product):  # writes to its result come after it: not part of the site
            return user, spelling(user), dropout_p, _weights_read(node, scores)
        if isinstance(op, Permute) and op.perm != tuple(range(len(op.perm))) and op.x is node:
            product_node = _product_through_permutes(user, node)
            if product_node is not None:
                return product_node, spelling(product_node), dropout_p, _weights_read(node, scores)
        if isinstance(op, Dropout) and op.x is node and op.active and (isinstance(dropout_p, Node) or dropout_p > 0):
            raise NotFusable("the attention weights go through two active dropouts; the fused call applies one")
        if isinstance(op, Dropout) and op.x is node:
            dropout_p = op.p if op.active else dropout_p
        elif not (isinstance(op, Cast) or _zeroes_weights(user, node)
                  or (isinstance(op, Permute) and op.perm == tuple(range(len(op.perm))))
                  or (_is_reshape(user) and _keeps_dtype(user))):
            raise NotFusable(f"the attention weights go through {_describe(user)} before the value product")
        node = user


def _weights_user(node: Node) -> Node:
    """The one op that reads the attention weights ``node`` on their way to the value product. A use whose
    result is only read for its dtype or shape (fair-esm's ``w = attn.type_as(w); attn.type_as(w)``) does
    not count: it goes away with the weights."""
    users = [user for user in value_users(node) if has_side_effect(user) or value_users(user)]
    if len(users) != 1:
        raise _used_elsewhere("the attention weights", users)
    return users[0]


def _product_through_permutes(node: Node, probs: Node) -> Optional[Node]:
    """The product that reads ``probs`` through the permutes starting at ``node`` (its operand peeled back to
    ``probs``, the axes carried along), or None."""
    while isinstance(canonical(node), Permute) and not is_written(node):
        user = _weights_user(node)
        if isinstance(spelling(user), Product):
            return user if any(o.node is probs for o in spelling(user).operands()) else None
        node = user
    return None


def _weights_read(probs: Node, scores: tuple) -> Node:
    """``probs``, checked to hold the weights on the QK product's shape (reshaped back where they were reshaped)."""
    shape = _shape(probs)
    if not _same_shape(shape, scores):
        raise NotFusable(f"the attention weights reach the value product reshaped to {_shape_text(shape or ())}, "
                         f"not on the QK product's shape {_shape_text(scores)}")
    return probs


def _zeroes_weights(user: Node, weights: Node) -> bool:
    """Whether ``user`` zeroes some of ``weights`` by a mask (``masked_fill(~mask, 0)``, ``* mask``): allowed on the
    way to the value product, and checked against the site's masks by ``_apply_zeroing``."""
    found = weights_zeroing(user)
    return found is not None and found[2] is weights


def _apply_zeroing(terms: ScoreTerms, softmax: Node, probs: Node) -> None:
    """Weights zeroed after the softmax by the site's own mask (CPM-Ant's ``masked_fill(~mask, 0)``).

    The zeroed weights are those of masked keys, which are already 0 in every row that keeps a key; a row
    that keeps none is 0 in the original after a replacing zeroing (or a product after a finite fill), and
    the fused call gives 0 there too. A product with a ``-inf`` fill leaves such a row NaN, as the fused
    call does without the zeroing.
    """
    zeroings, node = [], softmax
    while node is not probs:
        user = _weights_user(node)
        if _zeroes_weights(user, node):
            zeroings.append(weights_zeroing(user)[:2])
        node = user
    if not zeroings:
        return
    for mask, kind in zeroings:
        if not any(same_keep_mask(mask, kept) for kept in terms.keep_masks):
            raise NotFusable(f"the attention weights are zeroed (`{'* mask' if kind == 'multiply' else 'masked_fill'}`"
                             f" after the softmax) by a mask that is not one the scores were masked with; zero "
                             f"them with the same mask (the same tensor or the same expression)")
    kinds = {kind for _, kind in zeroings}
    if kinds == {"multiply"} and terms.fill == float("-inf"):
        return  # a row without keys is NaN in the original either way
    if len(kinds) > 1:
        raise NotFusable("the attention weights are zeroed both by `masked_fill` and by a product with the mask")
    if not all(any(same_keep_mask(kept, mask) for mask, _ in zeroings) for kept in terms.keep_masks):
        raise NotFusable("the attention weights are zeroed by one of the masks of the scores, not all of them: a row "
                         "that only another mask empties would not be zero in the original; zero with every mask")
    terms.zeroed_rows = True


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


def _apply_masks(terms: ScoreTerms, L: object, S: object, dtype: torch.dtype, batch_rank: int) -> None:
    """Turn masks that are causal triangles into the causal flag; drop masks that keep everything.

    Boolean keep-masks and constant additive ``0 / finfo.min`` biases are both read this way; a causal triangle or
    window ANDed with a key-padding tensor (``(kv <= q) & (kv > q - w) & padding[b, kv]``) gives the triangle and
    keeps the padding as a keep-mask, where the site uses that split (``_uses_key_masks``).
    """
    found = [classify_additive(bias, L, S) if coefficient > 0 else None for bias, coefficient in terms.biases]
    positions = [bias for (bias, _), read in zip(terms.biases, found) if read is None]  # biases that are no mask
    on_flex = _runs_on_flex(terms, positions, batch_rank)
    whole: dict[Node, tuple[MaskPattern, Optional[float]]] = {}  # masks with padding SDPA takes whole, read how
    biases = []
    for (bias, coefficient), read in zip(terms.biases, found):
        if read is None:
            biases.append((bias, coefficient))
            continue
        pattern, fill = read
        # the site's one mask: beside it at most biases computed from positions (ALiBi; then a Flex site), which the
        # fill absorbs like the scores
        sole = not terms.keep_masks and terms.fill is None and all(
            b in positions and _position_function(b, batch_rank) is not None for b, _ in terms.biases if b is not bias)
        if pattern.key_masks:
            if not (sole and _uses_key_masks(pattern, on_flex)
                    and _read_added_key_masks(terms, bias, coefficient, pattern, fill)):
                biases.append((bias, coefficient))
                whole[bias] = (pattern, fill * coefficient)
            continue
        if pattern.kind == "all":
            continue
        if pattern.kind == "causal" and sole and _absorbs(fill * coefficient, dtype, terms.softcap) and \
                not _some_row_loses_every_key(pattern.alignment, L, S):
            terms.causal, terms.window = pattern.alignment, pattern.window
            # an additive mask over a row of no keys is softmax(s + c), not a masked row: checked per call
            terms.keys_in_every_row = not _every_row_keeps_a_key(pattern.alignment, L, S)
            continue
        biases.append((bias, coefficient))
    terms.biases = biases
    remaining: list[KeepMask] = []
    for mask in terms.keep_masks:
        boolean = tensor_meta(mask.node).dtype == torch.bool
        pattern = classify(mask, L, S) if boolean else _product_mask_pattern(mask, L, S)
        if pattern.kind == "all":
            continue
        if pattern.key_masks and not _uses_key_masks(pattern, on_flex):
            remaining.append(mask)  # a plain causal triangle with padding, on SDPA: the mask whole
            if boolean:
                whole[mask.node] = (pattern, None)
            continue
        if pattern.kind == "keys":
            remaining.extend(pattern.key_masks)
            continue
        if pattern.kind == "causal" and terms.causal is None:
            terms.causal, terms.window = pattern.alignment, pattern.window
            if pattern.guarded_by:
                terms.causal_guard = (mask, pattern.guarded_by)
            remaining.extend(pattern.key_masks)  # ``window & padding``: the padding stays a keep-mask
            continue
        remaining.append(mask)
    terms.keep_masks = remaining
    if not remaining and terms.causal is None:
        terms.fill = None
    terms.bias_fill = _only_bias_fill(terms)
    terms.unpadded = _unpadded(terms, whole, L, S, dtype)


def _unpadded(terms: ScoreTerms, whole: dict[Node, tuple[MaskPattern, Optional[float]]], L: object, S: object,
              dtype: torch.dtype) -> Optional[Unpadded]:
    """How the site runs on a call whose key padding keeps every key (``attnfuse.unpadded``), where its one mask is
    padding: a causal triangle (or nothing) ANDed with key padding that SDPA takes whole (``whole``), a key-padding
    keep-mask or bias beside the site's own causal flag, or the padding an added window mask was read into. None
    where the site has anything beside it, or where the whole mask's triangle could leave a row without keys or its
    fill would not absorb every score. The padding must be computed by the graph and unwritten: one read of it serves
    every site of the graph call; padding handed in (a graph input, or a view of one) is left to ``RunTimeCausal``,
    since a graph per layer (FSDP's) would read it in every layer, where ``attnfuse.carried`` lets the later layers of
    a forward read nothing. Boolean padding is read for keys kept, an added term for being 0 throughout."""
    if terms.functions or terms.softcap is not None or terms.binary_masks:
        return None
    found = _unpadded_added(terms) if terms.added_mask is not None else _unpadded_one_mask(terms, whole, L, S, dtype)
    if found is None or not all(_built_in_the_graph(node) and not is_written(node) and
                                (how == ZERO or tensor_meta(node).dtype == torch.bool) for node, how in found.padding):
        return None
    return found


def _unpadded_one_mask(terms: ScoreTerms, whole: dict[Node, tuple[MaskPattern, Optional[float]]], L: object,
                       S: object, dtype: torch.dtype) -> Optional[Unpadded]:
    """The site's one mask or bias as padding: whole (``_unpadded_whole``), or a key-padding term of its own."""
    masks = [bias for bias, _ in terms.biases] + [mask.node for mask in terms.keep_masks]
    if len(masks) != 1 or is_written(masks[0]):
        return None
    found = _unpadded_whole(terms, *whole[masks[0]], L, S, dtype) if masks[0] in whole else None
    if found is not None or _varies_by_query(masks[0]) or tensor_meta(masks[0]) is None:
        return found
    padding = (masks[0], ZERO) if terms.biases else _padding_read_of(terms.keep_masks[0])
    return Unpadded(terms.causal, (padding,), whole=False)


def _padding_read_of(mask: KeepMask) -> tuple[Node, str]:
    """A boolean key-padding keep-mask as ``Unpadded.padding`` reads it."""
    return mask.node, MASKS if mask.negated else KEEPS


def _built_in_the_graph(node: Node) -> bool:
    """Whether ``node``'s tensor is computed by its graph into memory of its own (not an input, nor a view of one)."""
    own = storage(node)
    return node.op != "placeholder" and own is not None and \
        all(storage(other) != own for other in node.graph.nodes if other.op == "placeholder")


def _unpadded_added(terms: ScoreTerms) -> Optional[Unpadded]:
    """An added ``0 / fill`` mask read as the causal triangle or window and key-padding keep-masks (``added_masks``):
    without the padding on a call where it keeps every key. Exact: the added mask is then the triangle or window
    alone, which a call with gradients rebuilds from the shapes (``AddedMask.bias``)."""
    if terms.biases or not terms.keep_masks or \
            any(tensor_meta(mask.node) is None or _varies_by_query(mask.node) for mask in terms.keep_masks):
        return None
    return Unpadded(terms.causal, tuple(_padding_read_of(mask) for mask in terms.keep_masks), whole=False)


def _unpadded_whole(terms: ScoreTerms, pattern: MaskPattern, fill: Optional[float], L: object, S: object,
                    dtype: torch.dtype) -> Optional[Unpadded]:
    """The whole mask ``causal & padding`` as the triangle alone on calls whose boolean padding keeps every key; beside
    the site's own causal flag (GPT-Neo's causal buffer) a whole mask of that triangle, or of padding alone, adds
    nothing the flag does not mask on such a call (its fill absorbs every score)."""
    if terms.window is not None or pattern.window is not None or pattern.guarded_by or \
            (fill is not None and not _absorbs(fill, dtype, None)):
        return None
    if terms.causal is not None:  # the flag's own per-call checks decide its rows, as they do with the mask
        keeps_a_key = pattern.kind == "keys" or (pattern.kind == "causal" and pattern.alignment == terms.causal)
        causal = terms.causal
    elif pattern.kind == "causal":
        keeps_a_key, causal = _every_row_keeps_a_key(pattern.alignment, L, S), pattern.alignment
    else:
        keeps_a_key, causal = pattern.kind == "keys" and statically_true(lambda: S >= 1), None
    if not keeps_a_key or not all(tensor_meta(mask.node) is not None and tensor_meta(mask.node).dtype == torch.bool
                                  and not is_written(mask.node) for mask in pattern.key_masks):
        return None  # (a key-shaped whole mask may still be read as a term of its own)
    return Unpadded(causal, tuple(_padding_read_of(mask) for mask in pattern.key_masks), whole=True)


def _only_bias_fill(terms: ScoreTerms) -> Optional[float]:
    """The fill of the site's one additive term where it is an added mask of 0 and a fill that absorbs every score
    (``masks.zero_or_fill``, ``added_masks.absorbs_every_score``): its rows of fill are the original's uniform rows,
    which a kernel computes itself once the fill is within its range (``attend``'s ``bias_fill``). Only where the
    bias is the site's one mask: beside a keep-mask or a causal flag, a row's kept keys may all hold the fill while
    its masked ones do not, and the original's answer is then not the kernel's (the per-call reads decide)."""
    if len(terms.biases) != 1 or terms.functions or terms.added_mask is not None or terms.keep_masks or \
            terms.fill is not None or terms.causal is not None or terms.window is not None:
        return None
    bias, coefficient = terms.biases[0]
    fill = zero_or_fill(bias) if coefficient == 1.0 else None
    if fill is None or not fill <= MASKING_THRESHOLD or not absorbs_every_score(fill, _addition_dtypes(bias)):
        return None
    return fill


def _runs_on_flex(terms: ScoreTerms, biases: list[Node], batch_rank: int) -> bool:
    """Whether the site carries what only FlexAttention computes fused: a softcap, or a bias computed from
    positions (which becomes a score function, ``_index_functions``). SDPA cannot take either as it is."""
    if terms.softcap is not None:
        return True
    return any(_position_function(bias, batch_rank) is not None for bias in biases)


def _position_function(bias: Node, batch_rank: int):
    """``bias`` as a score function computed from positions (ALiBi, relative tables), or None."""
    function = score_function(bias, batch_rank)
    return function if function is not None and function.uses_positions else None


def _uses_key_masks(pattern: MaskPattern, on_flex: bool) -> bool:
    """Whether a mask read as a causal triangle (or window, or nothing) ANDed with key-padding masks is used
    split: always with a window (a kernel's window path beats a dense bias everywhere); a plain causal triangle or
    padding alone only on Flex sites, where the block mask comes from the structure and the key mask is gathered
    per key, while SDPA takes the model's own mask whole (rebuilding it per call was slower: bench_padding, H100)."""
    return pattern.window is not None or on_flex


def _read_added_key_masks(terms: ScoreTerms, bias: Node, coefficient: float, pattern: MaskPattern,
                          fill: float) -> bool:
    """transformers' ``where(causal & window & padding[b, kv], 0, finfo.min)`` added to the scores, the site's only
    mask: read as the causal triangle or window (or none, for padding alone) and the padding keep-masks with
    ``fill`` (``attnfuse.added_masks`` says when that is exact). A fill that does not absorb every score, or one
    scaled after the addition, stays a bias."""
    if coefficient != 1.0 or not math.isfinite(fill) or not absorbs_every_score(fill, _addition_dtypes(bias)):
        return False
    terms.causal, terms.window = (pattern.alignment, pattern.window) if pattern.kind == "causal" else (None, None)
    terms.keep_masks, terms.fill = list(pattern.key_masks), fill
    terms.added_mask = AddedMask(fill, tensor_meta(bias).dtype)
    return True


def _addition_dtypes(bias: Node) -> list[torch.dtype]:
    """The dtypes of the additions that read ``bias`` (the one of this site among them); none where it is read
    otherwise (then no row without keys is proven uniform)."""
    dtypes = []
    for user in bias.users:
        op = canonical(user)
        if not (isinstance(op, Add) and bias in (op.a, op.b) and tensor_meta(user) is not None):
            return []
        dtypes.append(tensor_meta(user).dtype)
    return dtypes


def _product_mask_pattern(mask: KeepMask, L: object, S: object) -> MaskPattern:
    """What a 0/1 float mask that multiplied the scores keeps: a constant one is read by value."""
    value = constant_value(mask.node) if isinstance(L, int) and isinstance(S, int) else None
    if not isinstance(value, torch.Tensor):
        return MaskPattern("tensor")
    keep = value != 0
    return keep_pattern(~keep if mask.negated else keep, L, S)


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
        terms.after_fill = []
        return
    if terms.after_fill:
        kept = [b for b, _ in terms.biases]
        if terms.functions and any(b not in kept for b in terms.after_fill):
            raise NotFusable("a position-computed bias is added after a finite mask fill; whether the fill still "
                             "masks cannot be checked cheaply: add the bias before the fill")
        terms.after_fill = [b for b in terms.after_fill if b in kept]
        terms.live_rows = terms.live_rows or bool(terms.after_fill)
    if terms.fill > absorbing(dtype) and terms.functions:
        raise NotFusable(f"masked scores are set to {terms.fill:g} beside a position-computed bias: whether the fill "
                         "still masks cannot be checked cheaply; use -inf or finfo.min as the fill")
    terms.fill_check = terms.fill > absorbing(dtype) or bool(terms.biases) or terms.finite_scores


def _run_time_causal(terms: ScoreTerms) -> Optional[str]:
    """``"bias"`` or ``"mask"`` where the site's one mask is an additive bias or a boolean keep-mask read from a run-time
    input (not provable at capture: a mask built before a graph break, or passed in), which each call checks for the
    causal triangle (``attnfuse.guards.RunTimeCausal``); None where the site has anything beside it, or none, or where
    the mask is a triangle with padding that one read of the padding per graph call decides (``terms.unpadded``)."""
    if terms.functions or terms.causal is not None or terms.window is not None or terms.added_mask is not None or \
            terms.live_rows or terms.after_fill or terms.bias_fill is not None or terms.binary_masks or \
            terms.unpadded is not None:
        return None
    if len(terms.biases) == 1 and not terms.keep_masks and terms.fill is None:
        return "bias" if read_at_run_time(terms.biases[0][0]) else None
    if len(terms.keep_masks) == 1 and not terms.biases and tensor_meta(terms.keep_masks[0].node).dtype == torch.bool:
        return "mask" if read_at_run_time(terms.keep_masks[0].node) else None
    return None


def _half_bias_rows(terms: ScoreTerms, dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    """Half-precision additions of a mask whose fill fp32 does not absorb: a row whose every key holds the fill (a
    left-padded query under a ``0 / fill`` mask) is uniform in the original, where ``s + fill`` rounds to the fill,
    but not in a kernel that adds the bias in fp32; such calls run the site's own ops (checked per call). Any bias
    added in fp16 (fp16's lowest value, -65504, is such a fill), and in bf16 a ``0 / fill`` mask with a finite
    fill such as -1e4 or -65504, or a bias handed in at run time (its values are not known). The addition's dtype
    decides, also where the sum is upcast before the softmax (``(s + mask).float()``, as LLaMA's reference code
    writes it); a bias whose additions are not all known counts as added in its own dtype. With fp16 q, also a
    wider bias: the kernels take it in fp16, where a fill below -65504 (-1e9) becomes ``-inf``."""
    if not terms.biases:
        return
    if dtype == torch.float16 or q_dtype == torch.float16 or \
            any(_added_in(bias, torch.float16) for bias, _ in terms.biases):
        terms.live_rows = True
    elif terms.bias_fill is None and any(_added_in(bias, torch.bfloat16) and
                                         (_fill_lost_in_fp32(bias) or read_at_run_time(bias))
                                         for bias, _ in terms.biases):
        terms.live_rows = True


def _added_in(bias: Node, dtype: torch.dtype) -> bool:
    dtypes = _addition_dtypes(bias)
    if dtypes:
        return dtype in dtypes
    meta = tensor_meta(bias)
    return meta is not None and meta.dtype == dtype


def _fill_lost_in_fp32(bias: Node) -> bool:
    """Whether ``bias`` is a ``0 / fill`` mask whose finite masking fill fp32 does not absorb (-1e4, -65504)."""
    fill, meta = zero_or_fill(bias), tensor_meta(bias)
    return fill is not None and fill <= half_live_floor(meta.dtype) and not absorbs_every_score(fill, [torch.float32])


def _index_functions(terms: ScoreTerms, batch_rank: int) -> None:
    """Biases computed from positions (ALiBi, relative-position tables) become score functions."""
    kept = []
    for bias, coefficient in terms.biases:
        function = score_function(bias, batch_rank)
        if function is not None and function.uses_positions and bias not in terms.after_fill:  # its values are read
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
    if terms.fill_check or terms.keys_in_every_row or terms.live_rows or terms.binary_masks or \
            terms.keyless_rows_original:
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
        probs = _weights_user(probs)


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


def match_site(softmax: Node, op: Softmax, reads_values: bool = True) -> AttentionSite:
    """Match one softmax into an ``AttentionSite``; raises ``NotFusable`` with the reason otherwise.
    ``reads_values``: per-call checks can read values (an eager graph; not under Inductor's tracer)."""
    built = _built_nodes(softmax.graph)
    try:
        return _match_with_filled_biases(softmax, op, reads_values)
    except NotFusable:
        _erase_built(softmax.graph, built)  # padded biases built for this site: nothing reads them
        raise


def _match_with_filled_biases(softmax: Node, op: Softmax, reads_values: bool) -> AttentionSite:
    """The site with each bias filled under a mask read as its bias and its mask (``_split_filled_biases``) where
    that helps: the mask is then read as a causal triangle, window or padding, and no per-call check has to read
    values where none can be read. Else the site as written, with the reason in ``filled_bias_kept``."""
    built = _built_nodes(softmax.graph)
    split: list[FilledBias] = []
    try:
        site = _match_site(softmax, op, split)
        why = _split_unhelpful(site.scores, split, reads_values) if split else None
        if why is None:
            return _reads_on_calls(site, reads_values)
    except NotFusable as error:
        if not split:
            raise
        why = f"read as its bias and its mask the site is not fused ({error})"
    _erase_built(softmax.graph, built)
    site = _match_site(softmax, op, None)
    site.scores.filled_bias_kept = why
    return _reads_on_calls(site, reads_values)


def _reads_on_calls(site: AttentionSite, reads_values: bool) -> AttentionSite:
    """``site``, without the readings that need a value read on each call where none can be read (under Inductor):
    a mask with padding is then used whole on every call."""
    if not reads_values:
        site.scores.unpadded = None
    return site


def _split_filled_biases(steps: list[Step], split: list[FilledBias], L: object,
                         S: object) -> tuple[list[Step], Optional[str]]:
    """Each bias filled under a mask (``patterns.bias_fills``), ``s + where(m, fill, b)``, as the bias and a fill of
    the scores, ``where(m, fill, s + b)``, where that is exact (``_split_refused``); each one split is appended to
    ``split``. Returns the steps and why a filled bias was kept whole (None if none was).

    The two hold the same values: ``s + fill`` rounds to ``fill`` (an absorbing fill; the scores below 1e30, as
    ``added_masks`` takes them) or is ``-inf``. The bias's gradient is the original's (0 where filled); the scores'
    gradient differs only in rows whose masked entries weigh something in the original: rows without a key whose
    bias is above the masking floor. Finite fills with a bias are checked per call for those (``dominance``), and
    ``keyless_rows_original`` runs the original ops for a call with gradients where a row keeps no key."""
    out: list[Step] = []
    why = None
    for step in steps:
        filled = filled_bias(step.value) if isinstance(step, BiasStep) else None
        if filled is not None and _is_added_mask(step.value, filled, L, S):
            filled = None  # read whole by the mask rules already
        reason = _split_refused(filled, step) if filled is not None else None
        if filled is None or reason is not None:
            why = why or reason
            out.append(step)
            continue
        bias = _built(step.value, cast_bias, (filled.bias, *filled.casts)) if filled.casts else filled.bias
        out += [BiasStep(bias, 1.0), FillStep(filled.cond, filled.fill, filled.fill_where_true)]
        split.append(filled)
    return out, why


def _is_added_mask(value: Node, filled: FilledBias, L: object, S: object) -> bool:
    """Whether the filled tensor, or its bias, is an added ``0 / fill`` mask (``1 - m`` filled where it is not 0, a
    padding mask filled under a triangle): the mask rules read it whole, as a mask (split, its bias would stay)."""
    return classify_additive(value, L, S) is not None or zero_or_fill(filled.bias) is not None


def _split_refused(filled: FilledBias, step: BiasStep) -> Optional[str]:
    """Why reading ``filled`` as its bias and its mask would change the function, or None where it does not."""
    if step.coefficient != 1.0:
        return f"it is added with coefficient {step.coefficient:g}: the fill, scaled, is not the mask's fill"
    dtypes = _addition_dtypes(step.value)
    if not dtypes:
        return "it is read by ops other than additions to scores"
    if filled.fill != -math.inf and not absorbs_every_score(filled.fill, dtypes):
        return (f"its fill {filled.fill:g} does not absorb the scores it is added to (`s + fill` is not `fill` in "
                f"{', '.join(str(d).replace('torch.', '') for d in sorted(set(dtypes), key=str))}), so a row without "
                "keys would not be uniform as in the original; fill with -inf or the lowest fp32 / bf16 value")
    return None


def _split_unhelpful(terms: ScoreTerms, split: list[FilledBias], reads_values: bool) -> Optional[str]:
    """Why the site reads better with its filled biases whole: a split mask stays a tensor that varies by query
    (the kernels would combine it with the bias at every call, where the original built it once), or a per-call
    check would have to read values where none can be read (the site would run its original ops)."""
    kept = {mask.node for mask in terms.keep_masks if _varies_by_query(mask.node)}
    if any(keep_mask(f.cond, f.fill_where_true).node in kept for f in split):
        return ("its mask stays a tensor that varies by query (no causal triangle or window found in it, or a causal "
                "triangle with padding, which sites SDPA runs take whole): the bias the model filled once is added whole")
    if not reads_values and (terms.fill_check or terms.live_rows or terms.keyless_rows_original):
        return ("read as its bias and its mask the site needs a per-call check of values, which a graph compiled by "
                "Inductor cannot make: it is added whole")
    return None


def _varies_by_query(node: Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.dim() >= 2 and not (isinstance(meta.shape[-2], int) and meta.shape[-2] == 1)


def _may_lose_every_key(terms: ScoreTerms, L: object, S: object) -> bool:
    """Whether some query row may keep no key on some call: a keep-mask, a guarded causal buffer, or a triangle
    (with a window) that the shapes do not prove leaves every row a key."""
    if terms.fill is None:
        return False
    if terms.keep_masks or terms.causal_guard or terms.causal is None:
        return True
    if terms.window is not None and not statically_true(lambda: L <= S):
        return True
    return not _every_row_keeps_a_key(terms.causal, L, S)


def _match_site(softmax: Node, op: Softmax, split: Optional[list[FilledBias]]) -> AttentionSite:
    """``split``: where given, filled biases are read as their bias and their mask where exact (and listed there)."""
    _single_user(op.x, "the attention scores")
    product_node, product, steps = walk_to_product(op.x)
    _single_user(product_node, "the QK product")
    scores_meta, product_meta = tensor_meta(op.x), tensor_meta(product_node)
    q, k, batch, query, key, head_dim = _qk_axes(product, op.dim % scores_meta.dim() - scores_meta.dim())
    kept_whole = None
    if split is not None:
        steps, kept_whole = _split_filled_biases(steps, split, _size_along(q, query), _size_along(k, key))
    terms = _apply_steps(product, steps, product_meta.dim())
    terms.filled_bias_kept = kept_whole
    pv_node, pv, dropout_p, probs = _walk_to_value_product(softmax, tuple(product_meta.shape))
    _apply_zeroing(terms, softmax, probs)
    v, value_dim, out_axes = _value_axes(pv, probs, product.out_axes, key)
    metas = [tensor_meta(t.node) for t in (q, k, v)]
    if any(m is None or not m.is_floating_point() for m in metas):
        raise NotFusable("q, k and v must be floating-point tensors")
    q, k, v = peel_upcasts(q), peel_upcasts(k), peel_upcasts(v)
    kv_group = 1
    if len(batch) >= 2:
        k, v, kv_group = _shared_head_repeat(k, v, batch[-1], terms)
    L, S = _size_along(q, query), _size_along(k, key)
    _apply_masks(terms, L, S, scores_meta.dtype, len(batch))
    terms.keyless_rows_original = bool(split) and _may_lose_every_key(terms, L, S)
    _index_functions(terms, len(batch))
    terms.scores_dtype = scores_meta.dtype
    _fill_check(terms, scores_meta.dtype)
    terms.run_time_causal = _run_time_causal(terms)
    _half_bias_rows(terms, scores_meta.dtype, tensor_meta(q.node).dtype)
    _check_no_write_inside(product_node, pv_node, softmax, [q.node, k.node, v.node], terms)
    return AttentionSite(softmax=softmax, output=pv_node, q=q, k=k, v=v, batch=batch, query=query, key=key,
                         head_dim=head_dim, value_dim=value_dim, out_axes=out_axes, scores=terms,
                         dropout_p=dropout_p, kv_group=kv_group,
                         dtype=_site_dtype(q, k, v, _chain(product_node, pv_node), pv_node))

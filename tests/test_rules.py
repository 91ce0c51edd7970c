"""Each rule family on its own: a tiny FX graph, one canonicalizer or pattern reader on one node, what it reads.

Every family also gets a look-alike (an op that resembles the spelling but computes something else) that
must not be read as that op, so a rule that grows too eager fails here before it fuses a wrong program.
"""
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from attnfuse.canonical import canonical
from attnfuse.patterns.biases import bias_reason
from attnfuse.patterns.casts import peel_upcasts
from attnfuse.patterns.causal import classify, classify_additive
from attnfuse.patterns.layouts import peel_head_repeat, peel_layout
from attnfuse.patterns.masks import fill_value, keep_mask, weights_zeroing
from attnfuse.patterns.readers import is_all_true, new_axes_index
from attnfuse.patterns.scales import score_factor
from attnfuse.vocabulary import (Add, Cast, Dropout, Factor, KeepMask, MaskPattern, Multiply, Operand, Permute,
                                 Product, RepeatHeads, Select, Softmax, Tanh, causal_offset)

B, H, L, S, D = 2, 3, 4, 6, 8


def traced(fn, *inputs) -> fx.GraphModule:
    """``fn`` traced to an FX graph whose nodes carry their example values, as Dynamo's graphs do."""
    return recorded(fx.symbolic_trace(fn), *inputs)


def built(build, *inputs) -> fx.GraphModule:
    """A graph written by hand (``build(graph, *placeholders)`` returns the output node), for constructors
    whose sizes are numbers, as Dynamo records them under static shapes."""
    graph = fx.Graph()
    graph.output(build(graph, *[graph.placeholder(f"x{i}") for i in range(len(inputs))]))
    return recorded(fx.GraphModule(torch.nn.Module(), graph), *inputs)


def recorded(gm: fx.GraphModule, *inputs) -> fx.GraphModule:
    """``gm`` run once on ``inputs``, each node's value kept in its meta."""

    class Record(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            node.meta["example_value"] = value
            return value

    Record(gm).run(*inputs)
    return gm


def result(gm: fx.GraphModule) -> fx.Node:
    """The node ``gm`` returns."""
    return next(node for node in gm.graph.nodes if node.op == "output").args[0]


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def read(fn, *inputs):
    """The canonical op of the node ``fn`` returns, and ``fn``'s placeholders."""
    gm = traced(fn, *inputs)
    return canonical(result(gm)), placeholders(gm)


q, k = torch.randn(B, H, L, D), torch.randn(B, H, S, D)
scores = torch.randn(B, H, L, S)

# ----------------------------------------------------------------------------- products


@pytest.mark.parametrize("spelling", [
    lambda q, k: torch.einsum("bhld,bhsd->bhls", q, k),
    lambda q, k: q @ k.transpose(-2, -1),
    lambda q, k: torch.matmul(q, k.transpose(2, 3)),
    lambda q, k: q.matmul(k.permute(0, 1, 3, 2)),
])
def test_products_read_the_qk_contraction_through_the_transpose(spelling):
    op, (qn, kn) = read(spelling, q, k)
    assert isinstance(op, Product)
    lhs, rhs = op.operands()
    assert lhs.node is qn and rhs.node is kn  # the transpose of k is peeled: the fused call reads k itself
    contracted = set(lhs.axes) & set(rhs.axes) - set(op.out_axes)
    assert len(contracted) == 1 and lhs.axes.index(contracted.pop()) == 3
    assert op.out_axes[-2] == lhs.axes[2] and op.out_axes[-1] == rhs.axes[2]


def test_baddbmm_reads_its_scale_and_addend():
    bias = torch.randn(H, L, S)
    op, (bn, qn, kn) = read(lambda b, q, k: torch.baddbmm(b, q, k.transpose(1, 2), beta=1.0, alpha=0.5),
                            bias, q[0], k[0])
    assert isinstance(op, Product) and op.alpha == 0.5 and op.addend is bn and op.beta == 1.0


@pytest.mark.parametrize("look_alike", [
    lambda q, k: q * k.sum(-2, keepdim=True),                   # elementwise, not a contraction
    lambda q, k: torch.einsum("bhld,bhsd,bhsd->bhls", q, k, k),  # three operands
    lambda q, k: torch.einsum("bhld->bhl", q) + k.sum(),        # one operand
])
def test_products_do_not_read_look_alikes(look_alike):
    op, _ = read(look_alike, q, k)
    assert not isinstance(op, Product)


# ----------------------------------------------------------------------------- layouts


def test_transpose_and_permute_are_relabelings_that_peel_back_to_their_source():
    gm = traced(lambda x: x.transpose(1, 2).permute(0, 2, 1, 3).contiguous(), q)
    op = canonical(result(gm))
    assert isinstance(op, Permute) and op.perm == (0, 1, 2, 3)  # contiguous keeps axes
    x = placeholders(gm)[0]
    assert peel_layout(Operand(result(gm), "bhld")) == Operand(x, "bhld")  # swapped, then swapped back
    transposed = next(node for node in gm.graph.nodes if node.target == "transpose")
    assert peel_layout(Operand(transposed, "blhd")) == Operand(x, "bhld")  # the letters follow the axes


@pytest.mark.parametrize("spelling", [
    lambda kv: kv.repeat_interleave(3, dim=1),
    lambda kv: kv[:, :, None].expand(B, 1, 3, S, D).reshape(B, 3, S, D),  # transformers' repeat_kv
])
def test_head_repeats_read_as_a_group(spelling):
    kv = torch.randn(B, 1, S, D)
    gm = traced(spelling, kv)
    op = canonical(result(gm))
    assert op == RepeatHeads(placeholders(gm)[0], 1, 3)
    source, group = peel_head_repeat(Operand(result(gm), "bhsd"), "h")
    assert source.node is placeholders(gm)[0] and group == 3


@pytest.mark.parametrize("look_alike", [
    lambda kv: kv[:, :, None].expand(B, 1, 3, S, D).reshape(B, 1, 3 * S, D),  # repeats along the keys
    lambda kv: kv.repeat(1, 3, 1, 1),                                        # tiles, not interleaves
    lambda kv: kv.view(B, S, 1, D),                                          # a reshape, not a permute
])
def test_layouts_do_not_read_look_alikes(look_alike):
    kv = torch.randn(B, 1, S, D)
    op, _ = read(look_alike, kv)
    assert not isinstance(op, (RepeatHeads, Permute))


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("spelling, negated", [
    (lambda s, m: s.masked_fill(~m, float("-inf")), False),
    (lambda s, m: s.masked_fill(m, -1e9), True),
    (lambda s, m: torch.where(m, s, torch.finfo(torch.float32).min), False),
    (lambda s, m: torch.where(~m, -1e9, s), False),
])
def test_masked_fill_and_where_read_as_a_keep_mask_and_a_fill(spelling, negated):
    mask = torch.rand(B, 1, L, S) > 0.3
    op, (sn, mn) = read(spelling, scores, mask)
    assert isinstance(op, Select)
    fill_where_true = op.if_true is not sn
    fill = op.if_true if fill_where_true else op.if_false
    assert keep_mask(op.cond, fill_where_true) == KeepMask(mn, negated)  # ``~`` peeled: the model's own tensor
    assert fill_value(fill) <= -1e4


def test_a_fill_that_does_not_mask_is_refused_with_the_reason():
    op, _ = read(lambda s, m: s.masked_fill(m, -1.0), scores, torch.rand(L, S) > 0.5)
    assert isinstance(op, Select) and "does not act as a mask" in fill_value(op.if_true)
    assert "not a number" in fill_value("a")


def test_zeroing_weights_by_a_mask_is_read_and_zeroing_by_another_value_is_not():
    mask = torch.rand(L, S) > 0.5
    gm = traced(lambda p, m: p.masked_fill(~m, 0.0), scores.softmax(-1), mask)
    keep, kind, weights = weights_zeroing(result(gm))
    assert keep == KeepMask(placeholders(gm)[1], False) and kind == "replace" and weights is placeholders(gm)[0]
    gm = traced(lambda p, m: p.masked_fill(~m, 0.5), scores.softmax(-1), mask)
    assert weights_zeroing(result(gm)) is None


@pytest.mark.parametrize("look_alike", [
    lambda s, m: torch.where(m),               # torch.where(cond): the indices of True, not a selection
    lambda s, m: s.masked_select(m),           # gathers the kept scores
    lambda s, m: s * m,                        # a product (read by the scales rule, not as a selection)
])
def test_masks_do_not_read_look_alikes(look_alike):
    op, _ = read(look_alike, scores, torch.rand(L, S) > 0.5)
    assert not isinstance(op, Select)


# ----------------------------------------------------------------------------- causal


def _ones(g):
    return g.call_function(torch.ones, (L, S), {"dtype": torch.bool})


def _positions(g, size, new_axis):
    index = (slice(None), None) if new_axis == 1 else (None, slice(None))
    return g.call_function(operator.getitem, (g.call_function(torch.arange, (size,)), index))


def _compare(g, offset=0, key_step=1):
    """``arange(L)[:, None] + offset >= arange(S)[None, :] * key_step``."""
    i, j = _positions(g, L, 1), _positions(g, S, 0)
    i = g.call_function(operator.add, (i, offset)) if offset else i
    j = g.call_function(operator.mul, (j, key_step)) if key_step != 1 else j
    return g.call_function(operator.ge, (i, j))


@pytest.mark.parametrize("build, alignment", [
    (lambda g, s: g.call_method("tril", (_ones(g),)), "top_left"),
    (lambda g, s: g.call_function(torch.tril, (_ones(g),), {"diagonal": S - L}), "bottom_right"),
    (lambda g, s: g.call_function(operator.invert, (g.call_method("triu", (_ones(g), 1)),)), "top_left"),
    (lambda g, s: _compare(g), "top_left"),
    (lambda g, s: _compare(g, offset=S - L), "bottom_right"),
])
def test_causal_masks_are_read_with_their_corner(build, alignment):
    gm = built(build, scores)
    assert classify(KeepMask(result(gm), False), L, S) == MaskPattern("causal", alignment)
    assert torch.equal(gm(scores), torch.ones(L, S, dtype=torch.bool).tril(causal_offset(alignment, L, S)))


def test_a_sliding_window_of_arange_comparisons_is_read_with_its_size():
    def window(g, s):
        i, j = _positions(g, L, 1), _positions(g, S, 0)
        recent = g.call_function(operator.gt, (j, g.call_function(operator.sub, (i, 2))))
        return g.call_function(operator.and_, (g.call_function(operator.le, (j, i)), recent))

    gm = built(window, scores)
    assert classify(KeepMask(result(gm), False), L, S) == MaskPattern("causal", "top_left", window=2)


@pytest.mark.parametrize("build", [
    lambda g, s: g.call_method("triu", (_ones(g),)),                 # the upper triangle
    lambda g, s: g.call_method("tril", (_ones(g), 1)),               # one key past the diagonal
    lambda g, s: _compare(g, offset=1),                              # between the two corners
    lambda g, s: _compare(g, key_step=2),                            # a steeper line
])
def test_causal_look_alikes_stay_tensor_masks(build):
    gm = built(build, scores)
    assert not bool(gm(scores).all())
    assert classify(KeepMask(result(gm), False), L, S).kind != "causal"


def test_an_additive_causal_constant_is_read_with_its_fill():
    gm = traced(lambda s: torch.full((s.shape[-2], s.shape[-1]), float("-inf")).triu(1), scores)
    assert classify_additive(result(gm), L, S) == (MaskPattern("causal", "top_left"), -math.inf)
    gm = traced(lambda s: torch.full((s.shape[-2], s.shape[-1]), -1.0).triu(1), scores)  # -1 does not mask
    assert classify_additive(result(gm), L, S) is None


def test_causal_offset_is_the_diagonal_of_each_corner():
    for alignment in ("top_left", "bottom_right"):
        keep = torch.ones(L, S, dtype=torch.bool).tril(causal_offset(alignment, L, S))
        assert bool(keep[-1, -1]) == (alignment == "bottom_right") and bool(keep[0, 0])
    assert causal_offset("bottom_right", 5, 5) == 0


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize("spelling, inverse", [
    (lambda s: s * 0.125, False),
    (lambda s: s / 8, True),
    (lambda s: torch.mul(s, 0.125), False),
    (lambda s: s.div(8), True),
])
def test_scales_read_as_a_number_factor(spelling, inverse):
    op, (sn,) = read(spelling, scores)
    assert isinstance(op, Multiply) and op.a is sn and op.inverse == inverse
    factor = score_factor(op.b, op.inverse, 4)
    assert isinstance(factor, Factor) and factor.as_float() == 0.125


def test_a_tensor_varying_along_the_keys_is_not_a_scale():
    op, (_, tn) = read(lambda s, t: s * t, scores, torch.rand(S))
    assert isinstance(op, Multiply) and "varies along the key axis" in score_factor(op.b, False, 4)
    op, (_, tn) = read(lambda s, t: s * t, scores, torch.rand(H, 1, 1))  # a per-head temperature is one
    assert score_factor(op.b, False, 4) == Factor(tn, False)
    op, _ = read(lambda s: s + 0.125, scores)  # an addition is no scale
    assert not isinstance(op, Multiply) and isinstance(op, Add)


# ----------------------------------------------------------------------------- biases


def test_biases_read_as_additions_and_a_number_added_is_refused():
    op, (sn, bn) = read(lambda s, b: s - b, scores, torch.randn(H, L, S))
    assert op == Add(sn, bn, 1.0, -1.0) and bias_reason(bn, 4) is None
    assert "is added to every score" in bias_reason(3.0, 4)
    op, _ = read(lambda s, b: torch.add(s, b, alpha=b.sum()), scores, torch.randn(H, L, S))  # run-time alpha
    assert op is None


# ----------------------------------------------------------------------------- softcap


def test_tanh_reads_as_a_softcap_and_its_look_alikes_do_not():
    op, (sn,) = read(lambda s: torch.tanh(s / 50.0) * 50.0, scores)
    assert isinstance(op, Multiply) and canonical(op.a) == Tanh(op.a.args[0])
    op, (sn,) = read(lambda s: s.tanh(), scores)
    assert op == Tanh(sn)
    for look_alike in (lambda s: torch.sigmoid(s), lambda s: torch.atan(s), lambda s: F.softsign(s)):
        op, _ = read(look_alike, scores)
        assert not isinstance(op, Tanh)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("spelling, training", [
    (lambda p: F.dropout(p, 0.1, True), True),
    (lambda p: F.dropout(p, p=0.1, training=False), False),
    (lambda p: torch.dropout(p, 0.1, True), True),
])
def test_dropout_reads_its_probability_and_mode(spelling, training):
    op, (pn,) = read(spelling, scores.softmax(-1))
    assert op == Dropout(pn, 0.1, training) and op.active == training


def test_dropout_look_alikes_are_not_dropout():
    for look_alike in (lambda p: F.alpha_dropout(p, 0.1, True), lambda p: p * (torch.rand_like(p) > 0.1)):
        op, _ = read(look_alike, scores.softmax(-1))
        assert not isinstance(op, Dropout)


# ----------------------------------------------------------------------------- softmax and casts


def test_softmax_spellings_read_with_their_dim_and_dtype():
    op, (sn,) = read(lambda s: F.softmax(s, dim=-1, dtype=torch.float32), scores)
    assert op == Softmax(sn, -1, torch.float32)
    op, _ = read(lambda s: s.log_softmax(-1), scores)
    assert op is None


def test_casts_read_as_casts_and_only_exact_widenings_are_peeled():
    narrow = torch.randn(B, H, L, D, dtype=torch.bfloat16)
    gm = traced(lambda x: x.float(), narrow)
    assert canonical(result(gm)) == Cast(placeholders(gm)[0], torch.float32)
    assert peel_upcasts(Operand(result(gm), "bhld")) == Operand(placeholders(gm)[0], "bhld")
    gm = traced(lambda x: x.to(torch.float16), q)  # narrowing: a cast, but the rounded tensor is what is read
    assert canonical(result(gm)) == Cast(placeholders(gm)[0], torch.float16)
    assert peel_upcasts(Operand(result(gm), "bhld")).node is result(gm)
    op, _ = read(lambda x: x.to(torch.float32).sum(-1), q)  # a reduction of a cast is not a cast
    assert op is None


# ----------------------------------------------------------------------------- shared readers


def test_new_axes_indexing_and_all_true_tensors():
    gm = traced(lambda x: x[:, None], torch.arange(L))
    assert new_axes_index(result(gm)) == (placeholders(gm)[0], (slice(None), None))
    gm = traced(lambda x: x[:, 1], torch.ones(L, S))  # an integer index selects: no new axis
    assert new_axes_index(result(gm)) is None
    gm = traced(lambda x: x.new_ones(L, S, dtype=torch.bool), q)
    assert is_all_true(result(gm))
    gm = traced(lambda x: x.new_ones(L, S), q)  # ones, but float: not a boolean mask
    assert not is_all_true(result(gm))
    gm = traced(lambda x: x.new_full((L, S), False, dtype=torch.bool), q)
    assert not is_all_true(result(gm))

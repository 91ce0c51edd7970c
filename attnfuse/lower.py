"""Lower: turn an ``AttentionSite`` into a plan, put one fused call in its place, run the plan as one ``attend``.

The plan holds only static facts (axis permutations, mask polarities, the scale); the tensors
(q, k, v, masks, biases, tensor factors) stay graph inputs of the one node the rewrite inserts.
Permutations and unsqueezes are views, so the kernel reads the model's own tensors.

Sites are matched before any is rewritten, so a site may read the output of another (chained
attention, ``attn(attn(q, k, v), k, v)``): when a site is rewritten its old output node is erased
and marked with the fused node that replaced it, and later sites read through that mark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from attnfuse.added_masks import AddedMask
from attnfuse.attend import attend, checked_attend
from attnfuse.carried import CARRIED
from attnfuse.context_parallel import ContextParallelError, context_parallel_active
from attnfuse.dominance import FillDominance, absorbing, live_floor, rows_with_a_live_key
from attnfuse.effects import written_or_returned
from attnfuse.fx_utils import remove_dead_nodes, statically_true, tensor_meta
from attnfuse.guards import CausalGuard, RunTimeCausal
from attnfuse.higher_order import differentiable_twice
from attnfuse.kernels.rows import KERNEL_SAFE_FILL, rows_without_keys
from attnfuse.masking import combined_keep, keep_from_masks
from attnfuse.memo import host_bool, host_readable
from attnfuse.original import original_program
from attnfuse.precision import bias_dtype
from attnfuse.report import KernelRecord, relative_module_path, source_line
from attnfuse.site import AttentionSite
from attnfuse.site_inputs import InputLayout, SiteTensors, dropout_p, site_inputs
from attnfuse.tracing import is_traced
from attnfuse.unpadded import UnpaddedCalls, padding_read


@dataclass(frozen=True)
class Layout:
    """How to bring an operand to a target axis order: ``x.permute(perm)`` then unsqueeze ``missing``."""

    perm: tuple[int, ...]
    missing: tuple[int, ...]

    def __post_init__(self) -> None:
        # decided once: whether ``perm`` moves an axis (a frozen record's derived flag, not a field)
        object.__setattr__(self, "_permutes", self.perm != tuple(range(len(self.perm))))

    @staticmethod
    def between(axes: str, target: str) -> "Layout":
        present = [c for c in target if c in axes]
        return Layout(tuple(axes.index(c) for c in present),
                      tuple(i for i, c in enumerate(target) if c not in axes))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self._permutes:
            x = x.permute(self.perm)
        for dim in self.missing:
            x = x.unsqueeze(dim)
        return x


class BiasProgram:
    """The site's position-computed biases as one ``bias_fn((b, h, i, j))`` for ``attend``.

    One object per site, so FlexAttention's compiled ``score_mod`` is reused across calls; the
    captured tensors it reads are set before each call.
    """

    def __init__(self, functions: list, coefficients: tuple[float, ...]) -> None:
        self.functions, self.coefficients = functions, coefficients
        self.leaf_counts = tuple(len(f.leaves) for f in functions)
        self.leaf_values: tuple = ()

    def __call__(self, index: tuple) -> torch.Tensor:
        total, start = None, 0
        for function, coefficient, count in zip(self.functions, self.coefficients, self.leaf_counts):
            term = function(index, list(self.leaf_values[start:start + count]))
            start += count
            term = term if coefficient == 1.0 else term * coefficient
            total = term if total is None else total + term
        return total


@dataclass(frozen=True)
class SitePlan:
    """Everything static about one rewritten site."""

    q: Layout
    k: Layout
    v: Layout
    batch_rank: int
    out_perm: tuple[int, ...]
    mask_negated: tuple[bool, ...]
    bias_coefficients: tuple[float, ...]
    factor_inverse: tuple[bool, ...]
    scores_rank: int
    scale: float
    causal: Optional[str]
    fully_masked_rows: str
    dropout_p: float  # the constant p, or 0.0 where the site reads p on each call (``inputs.dropout``)
    out_dtype: torch.dtype
    kernels: Optional[tuple[str, ...]] = None
    autotune: bool = False
    window: Optional[int] = None
    softcap: Optional[float] = None
    dtype: Optional[torch.dtype] = None
    kv_group: int = 1
    output_written: bool = False
    bias_program: Optional[BiasProgram] = field(default=None, compare=False)
    causal_guard: Optional[CausalGuard] = field(default=None, compare=False)
    record: KernelRecord = field(default_factory=KernelRecord, compare=False)
    dominance: Optional[FillDominance] = field(default=None, compare=False)
    original: Optional[Callable] = field(default=None, compare=False)  # the site's own ops (``attnfuse.original``)
    inputs: InputLayout = InputLayout()  # how the fused call's inputs group (``attnfuse.site_inputs``)
    keys_in_every_row: bool = False  # run ``original`` for calls where a causal row would keep no key
    mask_binary: tuple[bool, ...] = ()  # per keep-mask: a 0/1 float mask whose values are checked on each call
    live_rows: bool = False  # run ``original`` for calls where a row keeps no key above the masking floor
    contiguous_out: bool = False  # the original's output is contiguous while ``out_perm`` permutes the kernel's
    added_mask: Optional[AddedMask] = field(default=None, compare=False)  # masks read from an added 0 / fill bias
    bias_fill: Optional[float] = None  # the one bias holds only 0 and this fill (``ScoreTerms.bias_fill``)
    run_time_causal: Optional[RunTimeCausal] = field(default=None, compare=False)  # the one mask, checked per call
    unpadded: Optional[UnpaddedCalls] = field(default=None, compare=False)  # the one mask is padding, read per call
    keyless_rows_original: bool = False  # run ``original`` for calls with gradients where a row keeps no key
    where: str = field(default="", compare=False)  # module path and source line, for errors that name the site

    def __post_init__(self) -> None:
        # facts of the plan that every call reads, decided once (derived flags, not fields)
        object.__setattr__(self, "_permutes_out", self.out_perm != tuple(range(len(self.out_perm))))
        object.__setattr__(self, "_checks_binary_masks", any(self.mask_binary))
        object.__setattr__(self, "_reads_values", self.dominance is not None or self.live_rows or
                           any(self.mask_binary) or self.causal_guard is not None)
        # the per-call checks that may run the original or change the mask; a plan with none skips them as a group
        object.__setattr__(self, "_checks_call", self._reads_values or self.keys_in_every_row or
                           self.added_mask is not None)
        object.__setattr__(self, "_moves_operands", any(layout._permutes or layout.missing
                                                        for layout in (self.q, self.k, self.v)))
        # one additive term taken as it is (a floating 4-d bias, coefficient 1, scores already 4-d): no sum to build
        object.__setattr__(self, "_one_plain_bias", self.bias_coefficients == (1.0,) and self.batch_rank == 2)
        # the two runs ``run_site`` hands ``differentiable_twice``, built once rather than at every call
        object.__setattr__(self, "_compute", partial(compute_site, self))
        object.__setattr__(self, "_recompute", partial(compute_site, self, kernels=("math",)))

    @property
    def raises_its_fill(self) -> bool:
        """Whether calls without gradients raise the one bias's fill into the kernels' range themselves
        (``kernels.rows.within_kernel_range``), and nothing else of the plan reads that bias's values."""
        return (self.bias_fill is not None and self.bias_fill < KERNEL_SAFE_FILL and self.inputs.biases == 1
                and self._one_plain_bias and not self._checks_call and not self.needs_original
                and self.run_time_causal is None)

    @property
    def needs_original(self) -> bool:
        return self.dominance is not None or self.keys_in_every_row or any(self.mask_binary) or self.live_rows or \
            self.keyless_rows_original


def plan_for(site: AttentionSite, inputs: SiteTensors, kernels: Optional[tuple[str, ...]] = None,
             autotune: bool = False, output_written: bool = False) -> SitePlan:
    """The static plan of ``site``, whose fused call reads ``inputs``; ``output_written``: the site's output may be
    written in place."""
    terms = site.scores
    canonical_out = site.batch + site.query + site.value_dim
    out_perm = tuple(canonical_out.index(c) for c in site.out_axes)
    fill = terms.fill
    fully_masked = "zero" if fill is None or terms.zeroed_rows else ("nan" if fill == -math.inf else "mean")
    run_time_causal = RunTimeCausal(terms.run_time_causal, absorbing(terms.scores_dtype)) \
        if terms.run_time_causal else None
    unpadded = UnpaddedCalls(terms.unpadded.causal, fill_proven=terms.fill is None or not (
        terms.fill > absorbing(terms.scores_dtype) or terms.finite_scores)) if terms.unpadded is not None else None
    reads_per_call = run_time_causal or unpadded
    return SitePlan(
        q=Layout.between(site.q.axes, site.q_axes()),
        k=Layout.between(site.k.axes, site.kv_axes(site.head_dim)),
        v=Layout.between(site.v.axes, site.kv_axes(site.value_dim)),
        batch_rank=len(site.batch),
        out_perm=out_perm,
        mask_negated=tuple(m.negated for m in terms.keep_masks),
        bias_coefficients=tuple(c for _, c in terms.biases),
        factor_inverse=tuple(f.inverse for f in terms.tensor_factors),
        scores_rank=len(site.batch) + 2,
        scale=terms.scale,
        causal=terms.causal,
        fully_masked_rows=fully_masked,
        dropout_p=0.0 if isinstance(site.dropout_p, Node) else site.dropout_p,
        inputs=InputLayout.of(inputs),
        out_dtype=tensor_meta(site.output).dtype,
        dtype=site.dtype,
        kv_group=site.kv_group,
        output_written=output_written,
        kernels=kernels,
        autotune=autotune,
        window=terms.window,
        softcap=terms.softcap,
        bias_program=BiasProgram([f for f, _ in terms.functions], tuple(c for _, c in terms.functions))
        if terms.functions else None,
        causal_guard=CausalGuard(terms.causal_guard[0].node, terms.causal_guard[0].negated,
                                 list(terms.causal_guard[1]), terms.causal) if terms.causal_guard else None,
        dominance=FillDominance(terms.fill, tensor_meta(site.softmax).dtype, terms.scores_dtype,
                                after_fill=tuple(i for i, (b, _) in enumerate(terms.biases) if b in terms.after_fill),
                                finite_scores=terms.finite_scores) if terms.fill_check else None,
        keys_in_every_row=terms.keys_in_every_row,
        mask_binary=tuple(m.node in terms.binary_masks for m in terms.keep_masks),
        live_rows=terms.live_rows,
        contiguous_out=out_perm != tuple(range(len(out_perm))) and _is_contiguous(tensor_meta(site.output)),
        added_mask=terms.added_mask,
        bias_fill=terms.bias_fill,
        run_time_causal=run_time_causal,
        unpadded=unpadded,
        keyless_rows_original=terms.keyless_rows_original,
        record=KernelRecord(causal_checks=reads_per_call.calls if reads_per_call else None),
    )


def _is_contiguous(meta: torch.Tensor) -> bool:
    """Whether the recorded tensor ``meta`` is laid out contiguously (for every shape the graph serves):
    a later ``.view`` of the original output may rely on it."""
    expected = 1
    for size, stride in reversed(list(zip(meta.shape, meta.stride()))):
        if not (statically_true(lambda: size == 1) or statically_true(lambda: stride == expected)):
            return False
        expected = expected * size
    return True


def _to_4d(x: torch.Tensor, plan: SitePlan, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """Score-layout tensor (batch axes, then two) as the kernels' 4-d ``(B, H, ., .)``.

    Extra leading batch axes are broadcast to ``batch_shape`` and merged into one; the head axis keeps
    its own size (k and v share heads among groups of query heads; masks broadcast over heads).
    """
    nb = plan.batch_rank
    if nb == 2:
        return x
    if nb == 1:
        return x.unsqueeze(1)
    if nb == 0:
        return x[None, None]
    return x.expand(*batch_shape[:-1], *x.shape[nb - 1:]).flatten(0, nb - 2)


def _from_4d(out: torch.Tensor, plan: SitePlan, batch_shape: tuple[int, ...]) -> torch.Tensor:
    nb = plan.batch_rank
    if nb == 2:
        return out
    if nb == 1:
        return out.squeeze(1)
    if nb == 0:
        return out[0, 0]
    return out.unflatten(0, batch_shape[:-1])


def _score_operand(x: torch.Tensor, plan: SitePlan, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """A mask, bias or factor broadcast against the scores, brought to 4-d."""
    if x.dim() != plan.scores_rank:
        x = x.reshape((1,) * (plan.scores_rank - x.dim()) + tuple(x.shape))
    return _to_4d(x, plan, batch_shape)


def _every_row_keeps_a_key(causal: Optional[str], L: int, S: int) -> bool:
    return S >= 1 and (causal != "bottom_right" or L <= S)


def _run_original(plan: SitePlan, inputs: tuple, why: str) -> torch.Tensor:
    """The site's own ops, for a call on which a fact the fused call relies on does not hold."""
    if context_parallel_active():  # the own ops would attend within this rank's shard only
        raise ContextParallelError(f"{why}, and the site's own ops would attend within this rank's shard only")
    if plan.record.kernel is None:
        plan.record(f"original ops ({why})")
    return plan.original(*inputs)


def _scores_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SitePlan) -> tuple[int, ...]:
    """The batch axes of the scores: q's, k's and v's broadcast (q may be shared over batch or heads)."""
    nb = plan.batch_rank
    kv = [tuple(t.shape[:nb]) for t in (k, v)]
    if nb >= 2:
        kv = [shape[:-1] + (shape[-1] * plan.kv_group,) for shape in kv]
    shape = tuple(q.shape[:nb])
    for other in kv:  # torch.broadcast_shapes costs ~50 us a call; sizes here are 1 or equal
        shape = tuple(b if a == 1 else a for a, b in zip(shape, other))
    return shape


def _same_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SitePlan) -> Optional[tuple[int, int]]:
    """``(B, H)`` where q, k and v are already 4-d with one batch size and k, v's heads shared by ``kv_group``
    query heads each (the usual call: nothing to broadcast, ``_scores_batch`` would give the same); else None."""
    if plan.batch_rank != 2:
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    B, H, group = qs[0], qs[1], plan.kv_group
    if ks[0] == B and vs[0] == B and ks[1] * group == H and vs[1] * group == H:
        return B, H
    return None


def _broadcast(x: torch.Tensor, plan: SitePlan, batch_shape: tuple[int, ...], own_heads: bool = False) -> torch.Tensor:
    """``x`` expanded (a view) over the scores' batch axes where it is shared (size 1): latent queries
    ``(1, H, L, d)`` against a batch of keys, one query head against several kv heads."""
    nb = plan.batch_rank
    target = (*batch_shape[:-1], x.shape[nb - 1]) if own_heads and nb >= 2 else batch_shape
    return x if tuple(x.shape[:nb]) == target else x.expand(*target, *x.shape[nb:])


def _fold_factors(q: torch.Tensor, scale: float, factors: tuple, plan: SitePlan,
                  batch_shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    """Numbers multiply the scale; tensor factors (constant along the keys) are folded into q.

    A 0-d factor stays 0-d, so, as in the original, it does not promote q's dtype (a ``torch.tensor(d)``
    fp32 scale in a bf16 model); a wider tensor factor promotes q, which is rounded back to the site's
    dtype once, where the original rounded its scores.
    """
    for factor, inverse in zip(factors, plan.factor_inverse):
        if not isinstance(factor, torch.Tensor):
            scale = scale / factor if inverse else scale * factor
            continue
        if factor.dim():
            factor = _score_operand(factor, plan, batch_shape)
        q = q / factor if inverse else q * factor
    return q, scale


def _combined_bias(biases: tuple, plan: SitePlan, batch_shape: tuple[int, ...],
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The site's additive terms as one bias; boolean and integer terms add as numbers in the scores'
    dtype, as they did one by one in the original (summed among themselves they would OR or overflow)."""
    bias = None
    for term, coefficient in zip(biases, plan.bias_coefficients):
        term = term if term.is_floating_point() else term.to(dtype)
        term = _score_operand(term if coefficient == 1.0 else term * coefficient, plan, batch_shape)
        bias = term if bias is None else bias + term
    return bias


def compute_site(plan: SitePlan, *tensors: torch.Tensor, kernels: Optional[tuple[str, ...]] = None) -> torch.Tensor:
    """Compute one rewritten site: layouts to 4-d, masks and biases combined, one ``attend`` call."""
    given = plan.inputs.split(tensors)
    dropout = dropout_p(given, plan.dropout_p) if given.dropout else plan.dropout_p
    causal, window = plan.causal, plan.window
    masks, biases, factors = given.masks, given.biases, given.factors
    unpadded = plan.unpadded is not None and plan.unpadded.drops_mask(given.padding[0])
    if unpadded:  # the padding keeps every key: the kernel runs without it
        masks, biases, causal = (), (), plan.unpadded.causal
    q, k, v = given.q, given.k, given.v
    if plan.bias_program is not None:
        plan.bias_program.leaf_values = given.leaves
    if plan._moves_operands:
        q, k, v = plan.q.apply(q), plan.k.apply(k), plan.v.apply(v)
    batch_shape = _same_batch(q, k, v, plan)
    if batch_shape is None:
        batch_shape = _scores_batch(q, k, v, plan)
        q = _to_4d(_broadcast(q, plan, batch_shape), plan, batch_shape)
        k = _to_4d(_broadcast(k, plan, batch_shape, own_heads=True), plan, batch_shape)
        v = _to_4d(_broadcast(v, plan, batch_shape, own_heads=True), plan, batch_shape)
    dtype = plan.dtype or q.dtype
    if q.dtype != dtype or k.dtype != dtype or v.dtype != dtype:
        q, k, v = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))
    scale = plan.scale
    if factors:
        q, scale = _fold_factors(q, scale, factors, plan, batch_shape)
        q = q if q.dtype == dtype else q.to(dtype)
    keep = keep_from_masks(masks, plan.mask_negated, lambda mask: _score_operand(mask, plan, batch_shape)) \
        if masks else None
    if not biases:
        bias = None
    elif plan._one_plain_bias and biases[0].dim() == 4 and biases[0].is_floating_point():
        bias = biases[0]
    else:
        bias = _combined_bias(biases, plan, batch_shape, dtype)
    maybe_causal = plan.run_time_causal
    if plan._checks_call:
        checked = _checked_call(plan, tensors, q, k, scale, given, keep, bias, causal, batch_shape, unpadded)
        if isinstance(checked, torch.Tensor):  # a check failed: the site's own ops ran
            return checked
        keep, bias, causal, window, maybe_causal = checked
    record = plan.record if kernels is None and plan.record.kernel is None else None
    # a buffer mask that replaced the causal flag on this call is checked as any user's mask; the plan guarantees
    # the checked form (``attend.checked_attend``) of everything else
    run = checked_attend if plan.causal_guard is None else _attend_with_checks
    out = run(q, k, v, keep, bias, causal, window, plan.softcap, plan.bias_program, plan.bias_fill, scale, dropout,
              plan.fully_masked_rows, kernels or plan.kernels, plan.autotune, record, maybe_causal)
    if plan.batch_rank != 2:
        out = _from_4d(out, plan, batch_shape)
    if plan._permutes_out:
        out = out.permute(plan.out_perm)
    if plan.contiguous_out:
        out = out.contiguous()
    return out if out.dtype == plan.out_dtype else out.to(plan.out_dtype)


def _checked_call(plan: SitePlan, tensors: tuple, q: torch.Tensor, k: torch.Tensor, scale: float, given: object,
                  keep: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: Optional[str],
                  batch_shape: tuple[int, ...], unpadded: bool = False):
    """The plan's per-call checks of this call's values: the site's own output where one fails (its ops run), else
    ``(keep, bias, causal, window, maybe_causal)`` as the fused call takes them (``maybe_causal``: the run-time causal
    check still to make, None where it was made here). ``unpadded``: the call left out its padding, which kept every
    key (``attnfuse.unpadded``)."""
    masks, biases = given.masks, given.biases
    if plan._reads_values and context_parallel_active():
        raise ContextParallelError(_check_on_shard(plan))
    if plan.keys_in_every_row and not _every_row_keeps_a_key(plan.causal, q.shape[-2], k.shape[-2]):
        return _run_original(plan, tensors, "a causal row keeps no key on this call")
    if plan._checks_binary_masks and not _binary_masks_hold(masks, plan):
        return _run_original(plan, tensors, "a mask multiplying the scores is not 0/1 on this call")
    if plan.causal_guard is not None:
        changed = plan.causal_guard.changed_mask(given.guards, q.shape[-2], k.shape[-2])
        if changed is not None:  # the buffer no longer holds the causal triangle: use it as a mask
            changed = _score_operand(changed, plan, batch_shape)
            keep, causal = (changed if keep is None else keep & changed), None
    window = plan.window
    if plan.keyless_rows_original and _gradients_under_fill(tensors) and \
            rows_without_keys(keep, causal, q.shape[-2], k.shape[-2], q.device, window) is not None:
        return _run_original(plan, tensors, "a row keeps no key on this call, and the original's gradient reaches "
                                            "its scores through the added fill")
    if plan.added_mask is not None and plan.added_mask.needs_bias(q, k):
        # a row without keys gives q and k gradients: the kernel adds the original's mask, rebuilt
        whole = combined_keep(keep, causal, q.shape[-2], k.shape[-2], q.device, window)
        bias, keep, causal, window = plan.added_mask.bias(whole), None, None, None
    maybe_causal = plan.run_time_causal
    if maybe_causal is not None and bias is not None and not host_readable(q):
        traced = maybe_causal.traced_alignment(maybe_causal.candidate(bias, keep, causal, window, plan.bias_program,
                                                                      plan.bias_fill, q.shape[-2], k.shape[-2]))
        if traced is not None:  # traced for calls whose bias holds the triangle (``attnfuse.causal_inputs``)
            return keep, None, traced, window, None
    full_keep = None
    if plan.live_rows or plan.dominance is not None:
        full_keep = combined_keep(keep, causal, q.shape[-2], k.shape[-2], q.device, window)
    # (a call whose bias was dropped, ``attnfuse.unpadded``, has no bias to read: its triangle keeps a key in every row)
    given_bias = bias
    if plan.live_rows and bias is not None and not _live_by_carried_record(given, q.shape[-2], k.shape[-2]):
        floor, absorbed_below = live_floor(bias.dtype, q.dtype)
        live = rows_with_a_live_key(bias, full_keep, bias.dtype, floor, absorbed_below)
        candidate = _read_here(plan, q, k, given, keep, bias, causal, window) if maybe_causal is not None else None
        if candidate is not None:
            # the run-time causal read and this one share a host read; a causal triangle keeps a live key in every row
            alignment, live_found = maybe_causal.read_bias_with(bias, candidate, q.shape[-2], k.shape[-2], live)
            maybe_causal = None
            if alignment is not None:
                bias, causal, live = None, alignment, None
        else:
            live_found = live is None or host_bool(live)
        if live is not None and live_found is not True:
            return _run_original(plan, tensors, "a row keeps no key above the masking floor on this call")
    if plan.dominance is not None and not (unpadded and plan.unpadded.fill_proven) and not plan.dominance.holds(
            q, k, scale, plan.softcap, [b if c == 1.0 else b * c for b, c in zip(biases, plan.bias_coefficients)],
            given_bias, full_keep):
        return _run_original(plan, tensors, "the fill did not mask on this call")
    return keep, bias, causal, window, maybe_causal


def _read_here(plan: SitePlan, q: torch.Tensor, k: torch.Tensor, given: object, keep: Optional[torch.Tensor],
               bias: torch.Tensor, causal: Optional[str], window: Optional[int]) -> Optional[str]:
    """The alignment this call's run-time causal check (``guards.RunTimeCausal``) reads ``bias`` for, where it reads it
    as ``attend`` would (in the dtype ``attend`` adds it in, with the fill ``attend`` passes on: none with gradients),
    so that it may be read here with the live-row check in one host read; else None."""
    if bias.dtype not in (q.dtype, bias_dtype(q.dtype, bias.dtype)) or not host_readable(q):
        return None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or given.v.requires_grad)
    return plan.run_time_causal.candidate(bias, keep, causal, window, plan.bias_program,
                                          None if needs_grad else plan.bias_fill, q.shape[-2], k.shape[-2])


def _live_by_carried_record(given: object, L: int, S: int) -> bool:
    """Whether the call's one bias, its only mask, is a tensor a compiled graph of this forward built, known to be a
    causal triangle that keeps a key in every row (``attnfuse.carried``): no row needs the site's own ops."""
    if len(given.biases) != 1 or given.masks:
        return False
    record = CARRIED.record_of(given.biases[0])
    return record is not None and record.keeps_a_key_in_every_row(L, S)


def _attend_with_checks(q, k, v, keep, bias, causal, window, softcap, bias_fn, bias_fill, scale, dropout_p,
                        fully_masked_rows, kernels, autotune, on_kernel, maybe_causal) -> torch.Tensor:
    """``checked_attend``'s arguments through ``attend``'s own checks and conventions."""
    return attend(q, k, v, mask=keep, bias=bias, causal=causal, window=window, softcap=softcap, bias_fn=bias_fn,
                  bias_fill=bias_fill, scale=scale, dropout_p=dropout_p, fully_masked_rows=fully_masked_rows,
                  kernels=kernels, autotune=autotune, on_kernel=on_kernel, maybe_causal=maybe_causal)


def _check_on_shard(plan: SitePlan) -> str:
    """Why a site whose per-call check reads values cannot run under context parallel."""
    if plan.causal_guard is not None:
        what = "its causal mask is read from a module buffer, and the per-call check would read this rank's slice"
    elif plan.dominance is not None:
        what = ("its finite fill is checked per call against a bound on the scores, which would read this "
                "rank's q and k only")
    else:
        what = "a per-call check of its masks or bias would read this rank's shard only"
    return what


def _gradients_under_fill(tensors: tuple) -> bool:
    """Whether this call computes gradients of any of the site's inputs (q, k, a bias, a factor): a split fill's
    original (``s + where(m, fill, b)``) gives the scores a gradient in a row without keys, the fused call none."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _binary_masks_hold(masks: tuple, plan: SitePlan) -> bool:
    """Whether each mask that multiplied the scores and is not proven 0/1 holds only 0 and 1 on this call
    (a pass over each such mask and one host read)."""
    if any(is_traced(m) for m in masks):
        return False
    checks = [((m == 0) | (m == 1)).all() for m, checked in zip(masks, plan.mask_binary) if checked]
    return bool(torch.stack(checks).all())


def run_site(plan: SitePlan, *tensors: torch.Tensor) -> torch.Tensor:
    """One rewritten site, with a backward that is itself differentiable (``create_graph=True``)."""
    try:
        if not torch.is_grad_enabled():  # no backward to prepare (``differentiable_twice`` would run it so)
            return compute_site(plan, *tensors)
        # the inputs are split (by ``compute_site``) only where the site reads p on each call
        random = (dropout_p(plan.inputs.split(tensors), plan.dropout_p) if plan.inputs.dropout
                  else plan.dropout_p) > 0
        return differentiable_twice(plan._compute, plan._recompute, tensors, fresh_output=plan.output_written,
                                    random=random)
    except ContextParallelError as error:
        if error.site is not None:
            raise
        raise ContextParallelError(error.reason, plan.where) from None


def site_function(plan: SitePlan, name: str) -> Callable[..., torch.Tensor]:
    """A named callable for the graph node, so the printed graph reads ``attnfuse_site_0(q, k, v)``."""

    def fused_attention(*tensors: torch.Tensor) -> torch.Tensor:
        return run_site(plan, *tensors)

    fused_attention.__name__ = fused_attention.__qualname__ = name
    fused_attention.plan = plan
    return fused_attention


# ----------------------------------------------------------------------------- the rewrite

REPLACED_BY = "attnfuse_replaced_by"


def current(node: object) -> object:
    """``node``, or the fused node that replaced it if an earlier rewrite erased it."""
    while isinstance(node, Node) and REPLACED_BY in node.meta:
        node = node.meta[REPLACED_BY]
    return node


def _precedes_all(inputs: tuple, position: Node) -> bool:
    order = {node: i for i, node in enumerate(position.graph.nodes)}
    return all(order[node] < order[position] for node in inputs if isinstance(node, Node))


def rewrite_site(gm: GraphModule, site: AttentionSite, index: int,
                 kernels: Optional[tuple[str, ...]] = None, autotune: bool = False) -> SitePlan:
    """Insert ``attnfuse_site_<index>(q, k, v, ...)`` in place of the site's value product."""
    read = padding_read(gm.graph, site.scores.unpadded) if site.scores.unpadded is not None else None
    nodes = site_inputs(site, read)
    inputs = tuple(current(node) for node in nodes.flat())
    if not _precedes_all(inputs, site.output):  # every input is an ancestor of the value product
        raise RuntimeError(f"attnfuse: an input of site {index} is defined after its value product")
    # kernels save their output for the backward pass, so one that may be written later is handed out fresh
    plan = plan_for(site, nodes, kernels, autotune, output_written=written_or_returned(site.output))
    plan = replace(plan, where=f"{relative_module_path(site.softmax) or 'of the top module'} ({source_line(site.softmax)})")
    if plan.needs_original:
        program, extras = original_program(site.output, inputs)
        plan = replace(plan, original=program, inputs=plan.inputs.with_original(len(extras)))
        inputs = (*inputs, *extras)
    graph = gm.graph
    with graph.inserting_before(site.output):
        fused = graph.call_function(site_function(plan, f"attnfuse_site_{index}"), inputs)
    fused.meta.update({key: value for key, value in site.output.meta.items() if not key.startswith("attnfuse")})
    site.output.replace_all_uses_with(fused)
    site.output.meta[REPLACED_BY] = fused
    remove_dead_nodes([site.output])
    return plan

"""Verify: run the original and the rewritten graph side by side on a graph's first call, roll back what differs.

Only that first call is checked (for each model that runs the graph): later calls, and inputs the
first call did not exercise, rely on the rewrite being exact (and on the per-call guards in
``attnfuse.guards``), not on this check.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.fx import GraphModule, Node

from attnfuse.fx_utils import copy_graph_module
from attnfuse.report import SiteReport

RewriteOnly = Callable[[GraphModule, set[tuple[str, str]]], list[SiteReport]]


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` fit for comparing two attention implementations in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return (2e-2, 2e-2) if dtype == torch.float16 else (5e-2, 5e-2)
    return (1e-4, 1e-5) if dtype == torch.float64 else (1e-3, 1e-4)


def max_difference(expected: Any, actual: Any) -> float:
    """The largest error between two (nested) outputs relative to the tolerance of their dtype; <= 1 passes."""
    if isinstance(expected, (tuple, list)):
        return max((max_difference(e, a) for e, a in zip(expected, actual)), default=0.0)
    if not isinstance(expected, torch.Tensor) or not expected.is_floating_point():
        return 0.0 if (not isinstance(expected, torch.Tensor) or torch.equal(expected, actual)) else float("inf")
    rtol, atol = tolerance(expected.dtype)
    expected, actual = expected.detach().double(), actual.detach().double()
    both_nan = expected.isnan() & actual.isnan()
    error = (expected - actual).abs() / (atol + rtol * expected.abs())
    error = torch.where(both_nan, torch.zeros_like(error), error)
    return float(error.nan_to_num(nan=float("inf")).max()) if error.numel() else 0.0


def _float_leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _float_leaves(item)]
    return [output] if isinstance(output, torch.Tensor) and output.is_floating_point() else []


def breaks_the_original(derived: Any, real: Any) -> bool:
    """Whether the original's output on a derived input is non-finite where its output on the real
    input was finite: the derived input left the model's working range, so a comparison proves nothing."""
    for d, r in zip(_float_leaves(derived), _float_leaves(real)):
        new = ~torch.isfinite(d.detach())
        if d.shape == r.shape:
            new &= torch.isfinite(r.detach())
        if bool(new.any()):
            return True
    return False


@contextlib.contextmanager
def same_random_state() -> Iterator[Callable[[], None]]:
    """Yields ``rewind``, which puts the CPU and CUDA random generators back where they were on entry;
    they are put back on exit too, so a run after the block draws what one uncompared call would."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    try:
        yield rewind
    finally:
        rewind()


def _difference(expected: Any, run: Callable[..., Any], inputs: tuple, rewind: Callable[[], None]) -> float:
    """``max_difference`` of ``run(*inputs)`` from ``expected``; a run that raises differs infinitely."""
    rewind()
    try:
        actual = run(*inputs)
    except Exception:
        return float("inf")
    return max_difference(expected, actual)


def check_rewrite(original: GraphModule, rewritten: GraphModule, reports: list[SiteReport],
                  rewrite_only: RewriteOnly, args: tuple) -> Optional[tuple[GraphModule, list[SiteReport]]]:
    """Compare ``rewritten`` with ``original`` on one call's ``args``; None if every fused site agrees,
    else the original rewritten again with only the sites that agree, and its site reports.

    Both graphs run from the same random state (graphs that draw noise, e.g. ``torch.randn_like``, draw
    the same noise in both), and the state is left as it was, so the call that follows advances it
    as one call of the original would. Sites whose output differs beyond the dtype's tolerance are
    rolled back one by one (each is tried alone). Inputs derived from ``args`` where a wrong rewrite
    shows (see ``derived_inputs``) are compared too, unless the original itself overflows or fails on
    them. Sites with active dropout cannot be compared (their random streams differ): reported as
    unchecked. Runs without gradients; costs one run of each graph per input set, plus one run per
    fused site when a difference is found.
    """
    fused = [r for r in reports if r.status == "fused"]
    if not fused:
        return None
    if any(r.features.get("dropout") for r in fused):
        for report in fused:
            report.reason = "verify: not checked (dropout is active, so outputs are random)"
        return None
    with torch.no_grad(), same_random_state() as rewind:
        expected = [("the real inputs", args, original(*args))]
        for name, inputs in derived_inputs(original, args):
            rewind()
            try:
                out = original(*inputs)
            except Exception:
                continue
            if not breaks_the_original(out, expected[0][2]):
                expected.append((name, inputs, out))
        if all(_difference(out, rewritten, inputs, rewind) <= 1.0 for _, inputs, out in expected):
            return None
        keep, failed = set(), {}
        for report in fused:
            key = (report.name, report.source)
            trial = copy_graph_module(original)
            rewrite_only(trial, {key})
            worst = max((_difference(out, trial, inputs, rewind), name) for name, inputs, out in expected)
            if worst[0] <= 1.0:
                keep.add(key)
            else:
                failed[key] = worst
    earlier = {(r.name, r.source): r.reason for r in reports if r.status != "fused" and r.reason}
    final = copy_graph_module(original)
    final_reports = rewrite_only(final, keep)
    for report in final_reports:
        key = (report.name, report.source)
        if key in failed:
            error, name = failed[key]
            report.reason = (f"verify: output differed from the original on {name} by {error:.3g}x "
                             "the tolerance; rolled back")
        elif key not in keep and key in earlier:
            report.reason = earlier[key]  # rolled back by an earlier check
    return final, final_reports


def _is_weight(placeholder: Node) -> bool:
    return "_parameters_" in placeholder.name or "_buffers_" in placeholder.name


def derived_inputs(gm: GraphModule, args: tuple) -> list[tuple[str, tuple]]:
    """Inputs derived from the real ones where a wrong rewrite shows: a boolean mask whose first row
    masks every key (the fully masked row), and the non-weight float inputs scaled by 4 (a sharper
    softmax, where a dropped or misplaced scale shows)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    variants = []
    masks = [i for i, (node, a) in enumerate(zip(placeholders, args))
             if isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.dim() >= 1 and a.numel()]
    if masks:
        inputs = list(args)
        for i in masks:
            inputs[i] = args[i].clone()
            inputs[i][0] = False
        variants.append(("a mask with every key of one row masked", tuple(inputs)))
    floats = [i for i, (node, a) in enumerate(zip(placeholders, args))
              if isinstance(a, torch.Tensor) and a.is_floating_point() and not _is_weight(node)]
    if floats:
        inputs = list(args)
        for i in floats:
            inputs[i] = args[i] * 4
        variants.append(("inputs scaled by 4", tuple(inputs)))
    return variants


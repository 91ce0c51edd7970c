"""Verify: run the original and the rewritten graph side by side on the first call, roll back what differs."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

from attnfuse.report import SiteReport


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


class VerifiedGraph:
    """Runs the rewritten graph after checking it against the original on the first call.

    Sites whose output differs beyond the dtype's tolerance are rolled back one by one (each is
    tried alone against the original), and the audit records the error seen. Sites with active
    dropout cannot be compared (their random streams differ) and are reported as unchecked.
    """

    def __init__(self, original: GraphModule, rewritten: GraphModule, reports: list[SiteReport],
                 rewrite_only: Callable[[GraphModule, set[tuple[str, str]]], list[SiteReport]]) -> None:
        self.original, self.graph_module = original, rewritten
        self.reports, self.rewrite_only = reports, rewrite_only
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if not self.checked:
            self.checked = True
            self._check(args)
        return self.graph_module(*args)

    def _check(self, args: tuple) -> None:
        fused = [r for r in self.reports if r.status == "fused"]
        if any(r.features.get("dropout") for r in fused):
            for report in fused:
                report.reason = "verify: not checked (dropout is active, so outputs are random)"
            return
        checks = [("the real inputs", args), *adversarial_inputs(self.original, args)]
        with torch.no_grad():
            expected = [(name, inputs, self.original(*inputs)) for name, inputs in checks]
            if all(max_difference(out, self.graph_module(*inputs)) <= 1.0 for _, inputs, out in expected):
                return
            keep, failed = set(), {}
            for report in fused:
                key = (report.name, report.source)
                trial = copy.deepcopy(self.original)
                self.rewrite_only(trial, {key})
                errors = [(max_difference(out, trial(*inputs)), name) for name, inputs, out in expected]
                worst = max(errors)
                if worst[0] <= 1.0:
                    keep.add(key)
                else:
                    failed[key] = worst
        final = copy.deepcopy(self.original)
        for report in self.rewrite_only(final, keep):
            if (report.name, report.source) in failed:
                error, name = failed[(report.name, report.source)]
                report.reason = (f"verify: output differed from the original on {name} by {error:.3g}x "
                                 "the tolerance; rolled back")
        self.graph_module = final


def _is_weight(placeholder: Node) -> bool:
    return "_parameters_" in placeholder.name or "_buffers_" in placeholder.name


def adversarial_inputs(gm: GraphModule, args: tuple) -> list[tuple[str, tuple]]:
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

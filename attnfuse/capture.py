"""Capture: the Dynamo backend that runs the pass on every graph Dynamo hands it.

Dynamo captures any Python model (graph breaks included: each piece is a graph of its own);
this backend matches and rewrites each graph, records the sites in a ``FusionReport``, optionally
verifies the rewrite on the first call, and returns the graph to run eagerly or through Inductor.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx import GraphModule

import attnfuse.patterns  # noqa: F401  (registers the rule families)
from attnfuse.constants import BUFFER_VALUE
from attnfuse.match import Skip, find_sites
from attnfuse.options import Options
from attnfuse.report import FusionReport, SiteReport, module_path, source_line
from attnfuse.rewrite import rewrite_site
from attnfuse.verify import VerifiedGraph

_site_counter = itertools.count()


class AttnfuseBackend:
    """A Dynamo backend: ``torch.compile(model, backend=AttnfuseBackend(options, report))``."""

    def __init__(self, options: Options, report: Optional[FusionReport] = None, root: str = "model") -> None:
        self.options = options
        self.report = report if report is not None else FusionReport()
        self.root = root

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        self.report.graphs_compiled += 1
        _record_buffer_values(gm, example_inputs)
        original = copy.deepcopy(gm) if self.options.verify else None
        site_reports = self.rewrite(gm)
        if original is not None and any(r.status == "fused" for r in site_reports):
            checked = VerifiedGraph(original, gm, site_reports, self.rewrite_only)
            if self.options.compiler == "inductor":
                return _inductor_after_check(checked, example_inputs)
            return checked
        if self.options.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, list(example_inputs))
        return gm.forward

    def rewrite(self, gm: GraphModule, only: Optional[set[tuple[str, str]]] = None) -> list[SiteReport]:
        """Match and rewrite every site of ``gm`` in place (only the ``(name, source)`` keys in ``only``)."""
        reports = []
        found = list(find_sites(gm.graph))
        for result in found:
            name, source = module_path(result.softmax, self.root), source_line(result.softmax)
            if isinstance(result, Skip):
                reports.append(SiteReport(name, source, "skipped", reason=result.reason))
                continue
            features = result.features()
            if only is not None and (name, source) not in only:
                reports.append(SiteReport(name, source, "skipped", reason="rolled back", features=features))
                continue
            plan = rewrite_site(gm, result, next(_site_counter), self.options.kernels, self.options.autotune)
            reports.append(SiteReport(name, source, "fused", features=features, record=plan.record,
                                      predicted_backend="sdpa"))
        if any(r.status == "fused" for r in reports):
            gm.graph.lint()
            gm.recompile()
        for report in reports:
            self.report.add(report)
        return reports

    def rewrite_only(self, gm: GraphModule, sites: set[tuple[str, str]]) -> list[SiteReport]:
        return self.rewrite(gm, only=sites)


def _record_buffer_values(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Give the matcher the values of module buffers (Dynamo passes them as graph inputs), for masks
    built from them; rewrites that rely on such a value guard it (``attnfuse.guards``)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if "_buffers_" in node.name and isinstance(value, torch.Tensor) and not isinstance(
                value, torch._subclasses.FakeTensor):
            node.meta[BUFFER_VALUE] = value


def _inductor_after_check(checked: VerifiedGraph, example_inputs: Sequence[Any]) -> Callable:
    """Verify eagerly on the first call, then compile the (possibly rolled back) graph with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    compiled: list[Callable] = []

    def call(*args: Any) -> Any:
        if not compiled:
            out = checked(*args)
            compiled.append(compile_fx(checked.graph_module, list(example_inputs)))
            return out
        return compiled[0](*args)

    return call


def attnfuse_backend(gm: GraphModule, example_inputs: Sequence[Any], **options: Any) -> Callable:
    """The ``torch.compile(model, backend="attnfuse")`` entry point: rewrite, then Inductor by default."""
    options.setdefault("compiler", "inductor")
    return AttnfuseBackend(Options.from_kwargs(**options))(gm, example_inputs)

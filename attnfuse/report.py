"""Audit: what was fused at each site, on which kernel, and why anything was left alone."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch.fx import Node

from attnfuse.lower import KernelRecord

_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_MODULE_KEY = re.compile(r"\._modules\['([^']+)'\]|\[(\d+)\]|\['([^']+)'\]")


def relative_module_path(node: Node) -> str:
    """The dotted path, below the compiled model, of the module whose code holds ``node``
    (``layers.0.attn``); empty for the model's own code."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    path = path if isinstance(path, str) else str(path)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    return _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g), path).lstrip(".")


def rooted(root: str, path: str) -> str:
    """``root.path``, or ``root`` for the model's own code."""
    return f"{root}.{path}" if path else root


def module_path(node: Node, root: str) -> str:
    """The dotted path of the module whose code holds ``node`` (``Model.layers.0.attn``), or ``root``."""
    return rooted(root, relative_module_path(node))


def source_line(node: Node) -> str:
    """``<file>:<line>`` of the user code that created ``node``."""
    matches = _FILE_LINE.findall(node.meta.get("stack_trace") or "")
    if not matches:
        return "<unknown>"
    filename, line = matches[-1]
    return f"{filename}:{line}"


@dataclass
class SiteReport:
    """One attention site: where it is, what it does, what happened to it."""

    name: str
    source: str
    status: str
    reason: Optional[str] = None
    features: dict = field(default_factory=dict)
    record: Optional[KernelRecord] = None
    predicted_backend: Optional[str] = None

    @property
    def backend(self) -> Optional[str]:
        if self.status != "fused":
            return None
        return (self.record.kernel if self.record and self.record.kernel else self.predicted_backend)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "status": self.status, "reason": self.reason,
                "features": dict(self.features), "backend": self.backend}


def _feature_summary(features: dict) -> str:
    parts = []
    if features.get("causal"):
        parts.append(f"causal {features['causal'].replace('_', '-')}")
    if features.get("window") is not None:
        parts.append(f"window {features['window']}")
    if features.get("softcap") is not None:
        parts.append(f"softcap {features['softcap']:g}")
    if features.get("score_functions"):
        parts.append(f"{features['score_functions']} position bias(es)")
    if features.get("mask"):
        parts.append(f"mask {features['mask']}")
    if features.get("bias"):
        parts.append(f"bias {features['bias']}")
    if "scale" in features:
        scale = features["scale"]
        parts.append(f"scale {scale:.4g}" if isinstance(scale, float) else f"scale {scale}")
    if features.get("q_heads"):
        q, kv = features["q_heads"], features["kv_heads"]
        parts.append(f"heads {q}" if q == kv else f"heads {q}/kv {kv}")
    if features.get("dropout"):
        dropout = features["dropout"]
        parts.append(f"dropout {dropout:g}" if isinstance(dropout, float) else f"dropout {dropout}")
    if features.get("q_len") is not None and features.get("q_len") != features.get("k_len"):
        parts.append(f"q_len {features['q_len']} != k_len {features['k_len']}")
    return ", ".join(parts)


@dataclass
class GraphSites:
    """The sites of one compiled graph, named below the model (``layers.0.attn``). Dynamo runs one
    compiled graph for every model whose code and guards match, so each of their reports holds it."""

    sites: list[SiteReport] = field(default_factory=list)


@dataclass
class FusionReport:
    """What attnfuse did to one model: the sites of every graph of it that ran through the pass, and
    notes on anything of it that did not (Dynamo graph breaks, eager fallbacks). ``print(report)``."""

    root: str = "model"
    graphs: list[GraphSites] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _graph_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def sites(self) -> list[SiteReport]:
        """Every site, named from ``root``; a later graph's record of the same module and line (a
        recompile for new shapes, a rollback) replaces the earlier one."""
        merged: dict[tuple[str, str], SiteReport] = {}
        for graph in self.graphs:
            for site in graph.sites:
                named = replace(site, name=rooted(self.root, site.name))
                merged[(named.name, named.source)] = named
        return list(merged.values())

    @property
    def graphs_compiled(self) -> int:
        """How many graphs of this model went through the pass (compiled for it or for an identical model)."""
        return len(self.graphs)

    @property
    def fused(self) -> int:
        return sum(s.status == "fused" for s in self.sites)

    @property
    def skipped(self) -> int:
        return sum(s.status == "skipped" for s in self.sites)

    def has_graph(self, graph: GraphSites) -> bool:
        return id(graph) in self._graph_ids

    def add_graph(self, graph: GraphSites) -> None:
        """Record that this model ran ``graph`` (once; the report keeps it, so its id stays unique)."""
        if id(graph) not in self._graph_ids:
            self._graph_ids.add(id(graph))
            self.graphs.append(graph)

    def note(self, text: str) -> None:
        """Record something the user must know about how the model ran (once)."""
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        sites = self.sites
        return {"fused": sum(s.status == "fused" for s in sites), "skipped": sum(s.status == "skipped" for s in sites),
                "sites": [s.to_dict() for s in sites], "notes": list(self.notes)}

    def __str__(self) -> str:
        sites = self.sites
        notes = [f"note: {text}" for text in self.notes]
        if not sites and notes:
            return "\n".join(["attnfuse: no attention seen, but not all of the model went through the pass:", *notes])
        if not sites:
            return "attnfuse: no attention found (no softmax between two products); the model runs unchanged."
        rows = [("module", "source", "status", "kernel", "features / reason")]
        for s in sites:
            detail = _feature_summary(s.features) if s.status == "fused" else f"{s.reason}"
            rows.append((s.name, _short_source(s.source), s.status, s.backend or "-", detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        fused, skipped = (sum(s.status == status for s in sites) for status in ("fused", "skipped"))
        lines = [f"attnfuse: {fused} fused, {skipped} skipped"]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 17)
        return "\n".join(lines + notes)

    __repr__ = __str__


def _short_source(source: str) -> str:
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}" if path else source

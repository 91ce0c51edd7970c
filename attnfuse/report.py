"""Audit: what was fused at each site, on which kernel, and why anything was left alone."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from torch.fx import Node

from attnfuse.lower import KernelRecord

_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_MODULE_KEY = re.compile(r"\._modules\['([^']+)'\]|\[(\d+)\]|\['([^']+)'\]")


def module_path(node: Node, root: str) -> str:
    """The dotted path of the module whose code holds ``node`` (``layers.0.attn``), or ``root``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return root
    path, _ = list(stack.values())[-1]
    path = path if isinstance(path, str) else str(path)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    path = _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g), path).lstrip(".")
    return f"{root}.{path}" if path else root


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
        parts.append(f"dropout {features['dropout']:g}")
    if features.get("q_len") is not None and features.get("q_len") != features.get("k_len"):
        parts.append(f"q_len {features['q_len']} != k_len {features['k_len']}")
    return ", ".join(parts)


@dataclass
class FusionReport:
    """Sites found across every graph compiled for one model; ``print(report)`` shows a table."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs_compiled: int = 0

    @property
    def fused(self) -> int:
        return sum(s.status == "fused" for s in self.sites)

    @property
    def skipped(self) -> int:
        return sum(s.status == "skipped" for s in self.sites)

    def add(self, site: SiteReport) -> None:
        """Record a site; a later record of the same module and line (a recompile, a rollback) replaces it."""
        for i, old in enumerate(self.sites):
            if (old.name, old.source) == (site.name, site.source):
                self.sites[i] = site
                return
        self.sites.append(site)

    def to_dict(self) -> dict[str, Any]:
        return {"fused": self.fused, "skipped": self.skipped, "sites": [s.to_dict() for s in self.sites]}

    def __str__(self) -> str:
        if not self.sites:
            return "attnfuse: no attention found (no softmax between two products); the model runs unchanged."
        rows = [("module", "source", "status", "kernel", "features / reason")]
        for s in self.sites:
            detail = _feature_summary(s.features) if s.status == "fused" else f"{s.reason}"
            rows.append((s.name, _short_source(s.source), s.status, s.backend or "-", detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"attnfuse: {self.fused} fused, {self.skipped} skipped"]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 17)
        return "\n".join(lines)

    __repr__ = __str__


def _short_source(source: str) -> str:
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}" if path else source

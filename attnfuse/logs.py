"""attnfuse's log: ``logging.getLogger("attnfuse")``, shown by ``TORCH_LOGS=+attnfuse`` like torch's own.

At INFO, one line per compiled graph: what was fused or skipped, and how long Dynamo's capture, the
matching and rewrite, the lowering (Inductor's compile) and the verification took. A call that spent
more than ``SLOW_COMPILE_S`` compiling gets one WARNING line (shown without any logging set up), so a
long first call does not pass in silence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from attnfuse.report import FusionReport, SiteReport

log = logging.getLogger("attnfuse")

SLOW_COMPILE_S = 5.0  # a call that compiled for longer than this says so once per model


def register_with_torch() -> None:
    """Name this log in ``torch._logging`` (``torch._logging.set_logs(modules={"attnfuse": logging.INFO})``;
    ``TORCH_LOGS`` reads the package name itself when torch starts)."""
    try:
        from torch._logging._internal import log_registry, register_log
    except ImportError:  # a torch without the registry: the logger works as any Python logger
        return
    if not log_registry.is_log("attnfuse"):
        register_log("attnfuse", "attnfuse")


@dataclass
class Timings:
    """Seconds spent compiling: Dynamo's capture (None where attnfuse did not see the call start), the
    matching and rewrite, the lowering, and the verification."""

    capture: Optional[float] = 0.0
    matching: float = 0.0
    lowering: float = 0.0
    verification: float = 0.0

    def add(self, other: "Timings") -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, None if mine is None and theirs is None else (mine or 0.0) + (theirs or 0.0))

    def __str__(self) -> str:
        names = {"capture": "Dynamo capture"}
        return ", ".join(f"{names.get(f.name, f.name)} {getattr(self, f.name):.2f} s" for f in fields(self)
                         if getattr(self, f.name) is not None and (f.name != "verification" or self.verification))


def graph_ready(sites: Sequence["SiteReport"], timings: Timings, report: Optional["FusionReport"]) -> None:
    """Log, at INFO, what one compiled graph fused and skipped (named from ``report``'s model) and its timings."""
    if not log.isEnabledFor(logging.INFO):
        return
    named = report.named(list(sites)) if report is not None else list(sites)
    fused = [s.name or "<model>" for s in named if s.status == "fused"]
    skipped = [f"{s.name or '<model>'} ({s.reason})" for s in named if s.status == "skipped"]
    parts = [f"fused {len(fused)}" + (f": {', '.join(fused)}" if fused else "")]
    if skipped:
        parts.append(f"skipped {len(skipped)}: {'; '.join(skipped)}")
    log.info("attnfuse: graph compiled: %s (%s)", "; ".join(parts), timings)


def note_slow_compile(model: str, seconds: float, timings: Timings) -> bool:
    """One WARNING line when a call of ``model`` spent long compiling; whether it was written."""
    if seconds < SLOW_COMPILE_S:
        return False
    log.warning("attnfuse: a call of %s took %.1f s because it compiled (%s); later calls with the same shapes reuse "
                "the compiled graphs. logging.getLogger('attnfuse').setLevel(logging.INFO) (or TORCH_LOGS=+attnfuse) "
                "logs each graph.", model, seconds, timings)
    return True

"""attnfuse's log: ``logging.getLogger("attnfuse")``, shown by ``TORCH_LOGS=+attnfuse`` like torch's own.

At INFO, one line per compiled graph: what was fused or skipped, and how long each phase of its first
call took (``Timings``: Dynamo's capture, attnfuse's rewrite phase by phase, the compile, the first run,
the verification). A call that spent
more than ``SLOW_COMPILE_S`` compiling gets one WARNING line (shown without any logging set up), so a
long first call does not pass in silence.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from attnfuse.report import FusionReport, GraphSites

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
    """Seconds one graph's first call spent, phase by phase (``FusionReport.timings`` sums them per model).

    ``capture``: Dynamo's tracing and its guard and bytecode work (None where attnfuse did not see the
    call start); ``copy``: keeping the original graph for verification and rollback; ``effects``: reading
    in-place writes as functional ops; ``canonicalize``: reading nodes through the spelling rules;
    ``matching``: the matcher's walks; ``lowering``: rewriting the sites into fused calls; ``compile``:
    Inductor's compile (next to nothing under ``compiler="eager"``); ``first_run``: the rewritten graph's
    first run (kernel choice, autotuning and Flex compilation included); ``verification``: ``verify=True``'s
    check.
    """

    capture: Optional[float] = 0.0
    copy: float = 0.0
    effects: float = 0.0
    canonicalize: float = 0.0
    matching: float = 0.0
    lowering: float = 0.0
    compile: float = 0.0
    first_run: float = 0.0
    verification: float = 0.0

    ATTNFUSE_OWN = ("copy", "effects", "canonicalize", "matching", "lowering")  # attnfuse's own share

    def add(self, other: "Timings") -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, None if mine is None and theirs is None else (mine or 0.0) + (theirs or 0.0))

    @property
    def attnfuse_own(self) -> float:
        """Seconds of attnfuse's own rewrite (copy, effects, canonicalize, matching, lowering)."""
        return sum(getattr(self, name) for name in self.ATTNFUSE_OWN)

    @property
    def total(self) -> float:
        """Seconds of every phase together."""
        return sum(getattr(self, f.name) or 0.0 for f in fields(self))

    def to_dict(self) -> dict[str, Optional[float]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        names = {"capture": "Dynamo capture", "first_run": "first run"}
        return ", ".join(f"{names.get(f.name, f.name)} {seconds(getattr(self, f.name))}" for f in fields(self)
                         if getattr(self, f.name) is not None and (f.name != "verification" or self.verification))


def seconds(value: float) -> str:
    """``1.23 s``, or ``0.004 s`` below a tenth of a second (phases of a few milliseconds are common)."""
    return f"{value:.2f} s" if value >= 0.1 else f"{value:.3f} s"


@dataclass
class ModelTimings:
    """What a model's first calls cost, phase by phase: summed over its graphs (``total``) and for each graph
    (``graphs``, in the order they first ran); a graph compiled earlier for another model costs it nothing
    but its own verification and first run."""

    graphs: list[Timings] = field(default_factory=list)

    @property
    def total(self) -> Timings:
        """Seconds per phase, summed over the graphs."""
        summed = Timings(capture=None)
        for graph in self.graphs:
            summed.add(graph)
        return summed

    @property
    def attnfuse_own(self) -> float:
        """Seconds of attnfuse's own rewrite, summed over the graphs."""
        return sum(graph.attnfuse_own for graph in self.graphs)

    @property
    def attnfuse_own_per_graph(self) -> float:
        """The most seconds attnfuse's own rewrite took for one graph (0 for no graph)."""
        return max((graph.attnfuse_own for graph in self.graphs), default=0.0)

    def to_dict(self) -> dict[str, object]:
        return {"total": self.total.to_dict(), "attnfuse_own": self.attnfuse_own,
                "graphs": [graph.to_dict() for graph in self.graphs]}

    def __str__(self) -> str:
        count = len(self.graphs)
        return (f"first call: {self.total} ({count} graph{'s' if count != 1 else ''}; attnfuse's own "
                f"{seconds(self.attnfuse_own)}, at most {seconds(self.attnfuse_own_per_graph)} a graph)")


class PhaseClock:
    """Charges elapsed time to the innermost open phase of a ``Timings``: ``enter("matching")`` ...
    ``leave()``; a phase opened inside another (canonicalizing while matching) is not counted twice."""

    def __init__(self, timings: Timings) -> None:
        self.timings, self.open, self.since = timings, [], time.perf_counter()

    def enter(self, phase: str) -> None:
        self._charge()
        self.open.append(phase)

    def leave(self) -> None:
        self._charge()
        self.open.pop()

    def _charge(self) -> None:
        now = time.perf_counter()
        if self.open:
            phase = self.open[-1]
            setattr(self.timings, phase, (getattr(self.timings, phase) or 0.0) + now - self.since)
        self.since = now


_CLOCK: contextvars.ContextVar[Optional[PhaseClock]] = contextvars.ContextVar("attnfuse_clock", default=None)


@contextlib.contextmanager
def timed(timings: Timings) -> Iterator[PhaseClock]:
    """Make a ``PhaseClock`` on ``timings`` the one ``phase`` charges, for the duration of the block."""
    clock = PhaseClock(timings)
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block to phase ``name`` of the active clock (nothing where none is active)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    clock.enter(name)
    try:
        yield
    finally:
        clock.leave()


def active_clock() -> Optional[PhaseClock]:
    """The clock ``phase`` charges now, for hot paths that call ``enter``/``leave`` themselves."""
    return _CLOCK.get()


def graph_ready(sites: "GraphSites", timings: Timings, report: Optional["FusionReport"]) -> None:
    """Log, at INFO, what one compiled graph fused and skipped (named from ``report``'s model) and its timings."""
    if not log.isEnabledFor(logging.INFO):
        return
    named = report.named(sites) if report is not None else list(sites.sites)
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

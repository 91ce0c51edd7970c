"""Capture: the Dynamo backend that runs the pass on every graph Dynamo hands it.

Dynamo captures any Python model (graph breaks included: each piece is a graph of its own);
the backend matches and rewrites each graph and returns a ``CompiledGraph`` that runs it eagerly or
through Inductor.

One backend object serves every model with the same rewrite options. Dynamo keys its cache on the
code object, the guards and the backend, so a new backend per model would make every optimized or
audited instance of a class a recompile of the same ``forward``, and after
``torch._dynamo.config.recompile_limit`` (8) Dynamo would silently run the model eagerly. With one
backend, instances of a class share the compiled graph as they would under ``torch.compile``. What
belongs to one model (its report, whether to verify) is not part of the compiled graph: ``captured``
puts the model's ``Capture`` in a context variable for the duration of each call, and each graph
records its sites into the active capture's report the first time that model runs it.
"""
from __future__ import annotations

import contextvars
import inspect
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from types import CodeType
from typing import Any, Callable, Optional, Sequence

import torch
from torch._dynamo.utils import counters as _DYNAMO_COUNTERS  # one dict for the process (reset clears it in place)
from torch.fx import GraphModule

import attnfuse.patterns  # noqa: F401  (registers the rule families)
from attnfuse import logs
from attnfuse.caches import Cache
from attnfuse.carried import CARRIED, CausalProof, carried_facts
from attnfuse.causal_inputs import causal_inputs, compile_causal_form
from attnfuse.context_parallel import ContextParallelError, context_parallel_active
from attnfuse.eager_ops import free_saved_tensors_eagerly
from attnfuse.folding import BUFFER_VALUE, forget_values
from attnfuse.fx_utils import copy_graph_module
from attnfuse.lower import rewrite_site
from attnfuse.match import Skip, discard_unused_built, find_sites
from attnfuse.native import native_sites, use_fused_path
from attnfuse.options import Options
from attnfuse.patterns.softmax import calls_softmax
from attnfuse.report import (EXCLUDED_BY_FILTER, FusionReport, GraphSites, SiteReport, compiled_frame,
                             frame_module_local, relative_module_path, site_features, source_line)
from attnfuse.shared_fills import share_raised_fills
from attnfuse.verify import check_rewrite

_site_counter = itertools.count()


@dataclass
class Capture:
    """What one optimized model (or one audit) owns while its calls run: its report, and whether the
    first call of each graph is verified against the original."""

    report: FusionReport
    verify: bool = False
    graph_calls: int = 0
    code: Optional[CodeType] = None  # the model's ``forward``, to say why Dynamo ran no graph of it
    excludes: Optional[Callable[[str, Optional[tuple[str, int]]], bool]] = None  # (name, frame): filter_fn said no
    calls: int = 0  # the model's calls so far (the current one's number while it runs)
    timings: Optional[logs.Timings] = None  # compile work done during the current call, if any
    mark: float = 0.0  # when the current call started, or its last graph was compiled or ran first (Dynamo's capture time)
    slow_noted: bool = False
    # graphs compiled during the current call (by id) and when their compile ended: their first run charges
    # Dynamo's guard and bytecode work since then to the capture phase
    compiled_now: dict[int, float] = field(default_factory=dict)

    def spent(self, timings: logs.Timings, until: float) -> None:
        """Add ``timings`` to the current call's compile work; the next phase starts at ``until``."""
        self.timings = self.timings or logs.Timings()
        self.timings.add(timings)
        self.mark = until


_ACTIVE: contextvars.ContextVar[Optional[Capture]] = contextvars.ContextVar("attnfuse_capture", default=None)


class CompiledGraph:
    """One rewritten graph as Dynamo runs it; shared by every model whose code and guards match.

    On the first call under each model's ``Capture`` it verifies the rewrite if that model asked
    for it, then records its sites, and what that first call cost (``logs.Timings``), in that model's report.
    """

    def __init__(self, original: GraphModule, rewritten: GraphModule, sites: list[SiteReport],
                 backend: "AttnfuseBackend", example_inputs: Sequence[Any],
                 proven_outputs: tuple[tuple[int, Optional[CausalProof]], ...] = (), written_inputs: tuple[int, ...] = ()) -> None:
        self.original, self.graph_module = original, rewritten
        # outputs built as masks (with their proof where one holds for every input), recorded at each call for the
        # graphs that read them, and the inputs the graph writes in place, whose records it drops (``attnfuse.carried``)
        self.proven_outputs, self.written_inputs = proven_outputs, written_inputs
        self.sites = GraphSites(sites)
        self.backend = backend
        with logs.phase("compile"):
            self.run: Callable[..., Any] = backend.lower(rewritten, list(example_inputs))
        # Inductor compiles a rolled-back graph again from them; the eager route keeps no tensor of the first call
        self.example_inputs = list(example_inputs) if backend.options.compiler == "inductor" else []
        self.checked_without_capture = False
        self.timings = logs.Timings()  # the graph's compile and first run (and every verification), for the log
        self.compiled_at = 0.0
        self.ran = False
        # reports still recording which modules run this graph, each with whether a model's Capture feeds it
        # (``optimize``) or calls without one do (the torch.compile route); empty once all have seen them all
        self.watching: list[tuple[FusionReport, bool]] = []

    def watch(self, report: FusionReport, by_capture: bool) -> None:
        """Have ``report`` name the modules that run this graph (``FusionReport.ran``) from its next call on."""
        if self.sites.sites and self.sites.runner_local is not None:
            self.watching.append((report, by_capture))

    def __call__(self, *args: Any) -> Any:
        capture = _ACTIVE.get()
        if context_parallel_active():
            self._check_context_parallel(capture)
        if capture is not None and self.ran and not self.watching and capture.report.has_graph(self.sites):
            capture.graph_calls += 1  # a later call under a model that has this graph: nothing to record
            return self._run(args)
        first: list[logs.Timings] = []  # what this call's first run is charged to, if it is a first run
        if not self.ran:
            first.append(self.timings)
        if capture is None:
            if self.backend.options.verify and not self.checked_without_capture:
                self.checked_without_capture = True
                self.verify(args)
        else:
            capture.graph_calls += 1
            if not capture.report.has_graph(self.sites):
                first.append(self._first_call_timings(capture))
                if capture.verify:
                    self.verify(args, capture, first[-1])
                capture.report.add_graph(self.sites, first[-1])
                self.watch(capture.report, by_capture=True)
        if self.watching:
            self._note_runner(capture)
        if not first:
            return self._run(args)
        started = time.perf_counter()
        try:
            return self._run(args)
        finally:
            finished = time.perf_counter()
            spent = logs.Timings(capture=None, first_run=finished - started)
            for timings in first:
                timings.add(spent)
            if capture is not None:
                capture.spent(spent, finished)
            if not self.ran:
                self.ran = True
                logs.graph_ready(self.sites, self.timings, None if capture is None else capture.report)

    def _run(self, args: tuple) -> Any:
        """One run of the graph, keeping ``attnfuse.carried``'s records of the tensors it writes and builds."""
        if self.written_inputs:
            CARRIED.forget([args[i] for i in self.written_inputs])
        out = self.run(*args)
        if self.proven_outputs:
            CARRIED.note(out, self.proven_outputs)
        return out

    def _note_runner(self, capture: Optional[Capture]) -> None:
        """Tell the watching report of this call (the capture's, or the torch.compile route's) which module's
        frame runs this graph; stop watching for a report that has seen them all (or where none is found)."""
        mine = [entry for entry in self.watching
                if ((entry[0] is capture.report) if capture is not None else not entry[1])]
        if not mine:
            return
        module = running_module(self.sites)
        for entry in mine:
            report, by_capture = entry
            if module is None or not report.ran(self.sites, module, capture.calls if by_capture else None):
                self.watching.remove(entry)

    def _check_context_parallel(self, capture: Optional[Capture]) -> None:
        """Refuse what cannot run under context parallel: a site left unfused, a verification (the original
        attends within this rank's shard only, so every site would differ and be rolled back) and Inductor
        (its compiled sites would not see that SDPA is ringed)."""
        left = [site for site in self.sites.sites if site.status == "skipped"]
        if left:  # its own ops run, attending within this rank's shard only
            raise ContextParallelError(f"attnfuse left it unfused ({left[0].reason}), so its own ops would attend "
                                       "within this rank's shard only", f"{left[0].name} ({left[0].source})")
        fused = [site for site in self.sites.sites if site.status == "fused" and site.record is not None]
        if not fused:
            return
        where = f"{fused[0].name} ({fused[0].source})"
        verifying = (capture.verify and not capture.report.has_graph(self.sites)) if capture is not None else \
            (self.backend.options.verify and not self.checked_without_capture)
        if verifying:
            raise ContextParallelError("verify=True (and audit) compare the rewrite with the original, which under "
                                       "context parallel attends within this rank's shard only; make the first "
                                       "call of this shape outside context_parallel, or pass verify=False", where)
        if self.backend.options.compiler == "inductor":
            raise ContextParallelError("compiler='inductor' compiled this site without context parallel's "
                                       "SDPA; use attnfuse.optimize's default compiler='eager'", where)

    def _first_call_timings(self, capture: Capture) -> logs.Timings:
        """What ``capture``'s model spent on this graph: its compile, if compiled during this call (with
        Dynamo's guard and bytecode work since), else nothing yet (a graph compiled for another model)."""
        compiled_at = capture.compiled_now.pop(id(self), None)
        if compiled_at is None:
            return logs.Timings()
        now = time.perf_counter()
        guards = logs.Timings(capture=now - compiled_at)
        self.timings.add(guards)
        capture.spent(guards, now)
        mine = replace(self.timings, first_run=0.0, verification=0.0)
        return mine

    def verify(self, args: tuple, capture: Optional[Capture] = None, into: Optional[logs.Timings] = None) -> None:
        """Check the current rewrite on ``args``; roll back (for every model sharing the graph) what differs."""
        started = time.perf_counter()
        result = check_rewrite(self.original, self.graph_module, self.sites.sites, self.backend.rewrite_only, args)
        if result is not None:
            self.graph_module, self.sites.sites[:] = result
            self.run = self.backend.lower(self.graph_module, self.example_inputs)
        finished = time.perf_counter()
        spent = logs.Timings(capture=None, verification=finished - started)
        self.timings.add(spent)
        if into is not None:
            into.add(spent)
        if capture is not None:
            capture.spent(spent, finished)  # the next graph's capture starts no earlier


_DYNAMO_FRAMES = 10  # frames between a compiled frame and this function (Dynamo's wrappers, CompiledGraph), at most


def running_module(graph: GraphSites) -> Optional[torch.nn.Module]:
    """The module whose compiled frame is calling ``graph`` now: the frame's local that Dynamo traced the
    sites' modules from (``self``), read from the call stack; None where it is not found."""
    where = graph.runner_local
    if where is None:
        return None
    (filename, line), (local, index) = where
    frame = sys._getframe(1)
    for _ in range(_DYNAMO_FRAMES):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_filename == filename and code.co_firstlineno <= line:
            value = frame.f_locals.get(local)
            if index is not None:
                value = value[index] if isinstance(value, (tuple, list)) and len(value) > index else None
            return value if isinstance(value, torch.nn.Module) else None
        frame = frame.f_back
    return None


class AttnfuseBackend:
    """A Dynamo backend: ``torch.compile(model, backend=AttnfuseBackend(options))``.

    ``attnfuse.optimize`` and ``attnfuse.audit`` use ``backend_for(options)``, one object per set of
    rewrite options, so that Dynamo reuses compiled graphs across models instead of recompiling.
    """

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        started, capture = time.perf_counter(), _ACTIVE.get()
        timings = logs.Timings(capture=None if capture is None else started - capture.mark)
        with logs.timed(timings):
            if self.options.compiler == "eager":  # Inductor traces these ops away; op by op they must not leak
                free_saved_tensors_eagerly(gm)
            if _may_hold_attention(gm.graph):
                with logs.phase("copy"):
                    _record_buffer_values(gm, example_inputs)
                    original = copy_graph_module(gm)  # before the matcher caches anything in the nodes' meta
                with logs.phase("matching"):
                    sites = self.rewrite(gm)
            else:  # nothing the pass reads: the graph runs as captured (nothing to verify, nothing to keep)
                original, sites = gm, []
            with logs.phase("matching"):
                proven, written = carried_facts(gm.graph)
                forget_values(gm.graph)
            compiled = CompiledGraph(original, gm, sites, self, example_inputs, proven, written)
        compiled.timings, compiled.compiled_at = timings, time.perf_counter()
        if capture is not None:
            capture.compiled_now[id(compiled)] = compiled.compiled_at
            capture.spent(timings, compiled.compiled_at)
        return compiled

    def lower(self, gm: GraphModule, example_inputs: list[Any]) -> Callable:
        """What runs ``gm``: itself (eager), or Inductor's compilation of it; where sites take a graph input as their
        one bias and the first call's holds the causal triangle, Inductor's causal form of it, with ``gm`` op by op
        for the calls whose bias does not (``attnfuse.causal_inputs``)."""
        if self.options.compiler != "inductor":
            return gm.forward
        inputs = causal_inputs(gm)
        form = compile_causal_form(gm, example_inputs, inputs, self._inductor, _op_by_op) if inputs else None
        return form if form is not None else self._inductor(gm, example_inputs)

    def _inductor(self, gm: GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(self.options.mode) if self.options.mode not in (None, "default") else None
        return compile_fx(gm, example_inputs, config_patches=patches)

    def rewrite(self, gm: GraphModule, only: Optional[set[tuple[str, str]]] = None) -> list[SiteReport]:
        """Match and rewrite every site of ``gm`` in place (only the ``(name, source)`` keys in ``only``);
        site names are relative to the compiled model."""
        reports, seen = [], Counter()
        default_local = _frame_local_of_graph(gm.graph)
        capture = _ACTIVE.get()
        excludes = capture.excludes if capture is not None else None
        for found in native_sites(gm.graph):
            name, source, status = relative_module_path(found.node), source_line(found.node), found.status
            if status == "fused" and excludes is not None and excludes(name, compiled_frame(found.node)):
                status, found.reason = "skipped", EXCLUDED_BY_FILTER
            elif status == "fused" and only is not None and (name, source) not in only:
                status, found.reason = "skipped", "rolled back"
            elif status == "fused":
                use_fused_path(found)
            reports.append(SiteReport(name, source, status, reason=found.reason, predicted_backend=found.kernel,
                                      frame=compiled_frame(found.node), frame_local=frame_module_local(found.node) or default_local,
                                      features={"multihead": True} if status == "fused" else {}))
        for result in list(find_sites(gm.graph, reads_values=self.options.compiler != "inductor")):
            name, source = relative_module_path(result.softmax), source_line(result.softmax)
            seen[(name, source)] += 1
            if seen[(name, source)] > 1:  # another site on the same line (chained attention): its own row
                source = f"{source}#{seen[(name, source)]}"
            frame, local = compiled_frame(result.softmax), frame_module_local(result.softmax) or default_local
            if isinstance(result, Skip):
                reports.append(SiteReport(name, source, "skipped", reason=result.reason, frame=frame,
                                          frame_local=local))
                continue
            features = site_features(result)
            if excludes is not None and excludes(name, frame):
                reports.append(SiteReport(name, source, "skipped", reason=EXCLUDED_BY_FILTER, features=features,
                                          frame=frame, frame_local=local))
                continue
            if only is not None and (name, source) not in only:
                reports.append(SiteReport(name, source, "skipped", reason="rolled back", features=features,
                                          frame=frame, frame_local=local))
                continue
            with logs.phase("lowering"):
                plan = rewrite_site(gm, result, next(_site_counter), self.options.kernels, self.options.autotune)
            reports.append(SiteReport(name, source, "fused", features=features, record=plan.record,
                                      predicted_backend="sdpa", frame=frame,
                                      frame_local=local))
        with logs.phase("lowering"):
            share_raised_fills(gm)
            if discard_unused_built(gm.graph) or any(r.status == "fused" for r in reports):
                gm.graph.lint()
                gm.recompile()
        forget_values(gm.graph)
        return reports

    def rewrite_only(self, gm: GraphModule, sites: set[tuple[str, str]]) -> list[SiteReport]:
        return self.rewrite(gm, only=sites)


def _op_by_op(gm: GraphModule) -> Callable:
    """A copy of ``gm`` run op by op, as the eager route runs it (Inductor's passes may rewrite ``gm`` itself)."""
    copy = copy_graph_module(gm)
    free_saved_tensors_eagerly(copy)
    return copy.forward


def _frame_local_of_graph(graph: torch.fx.Graph) -> tuple[str, Optional[int]]:
    """The local of the compiled frame that holds its module, for sites in the frame's own code (Dynamo
    records no module for them): the one any node's module is traced from, else ``self``."""
    for node in graph.nodes:
        local = frame_module_local(node)
        if local is not None:
            return local
    return "self", None


_SHARED_BACKENDS: Cache[AttnfuseBackend] = Cache("capture.backends", maxsize=64)


def backend_for(options: Options) -> AttnfuseBackend:
    """The one backend object for ``options``' rewrite settings (verify and dynamic are per model)."""
    key = replace(options, verify=False, dynamic=None)
    return _SHARED_BACKENDS.get_or_create(key, lambda: AttnfuseBackend(key))


# ----------------------------------------------------------------------------- Dynamo's own signals

def _frame_attempts() -> int:
    return _DYNAMO_COUNTERS["frames"].get("total", 0)


class _DynamoSignals:
    """Dynamo's counters of graph breaks and of frames it gave up on, read only around calls in which
    Dynamo tried to compile something (one integer compare per call otherwise)."""

    KINDS = ("graph_break", "unimplemented")

    def __init__(self) -> None:
        self.attempts = -1
        self.seen: dict[str, dict[str, int]] = {}

    def start(self) -> int:
        attempts = _frame_attempts()
        if attempts != self.attempts:
            self._remember(attempts)
        return attempts

    def finish(self, report: FusionReport, started: int) -> None:
        """Note in ``report`` every graph break or compile failure Dynamo counted since ``started``."""
        attempts = _frame_attempts()
        if attempts == started:
            return
        for kind in self.KINDS:
            for key, count in list(_DYNAMO_COUNTERS[kind].items()):
                if count > self.seen.get(kind, {}).get(key, 0):
                    report.note(_describe_signal(kind, key))
        self._remember(attempts)

    def _remember(self, attempts: int) -> None:
        self.attempts = attempts
        self.seen = {kind: dict(_DYNAMO_COUNTERS[kind]) for kind in self.KINDS}


_SIGNALS = _DynamoSignals()

NO_GRAPH_RAN = ("a call of this model ran with no graph through attnfuse: Dynamo ran it eagerly (a recompile "
                "or cache limit, a skipped or disabled frame) or captured no tensor operation, so any "
                "attention in it was neither fused nor checked")


def _summary(key: str) -> str:
    """The kind and the explanation of a Dynamo counter key (``gb_type`` then ``Explanation: ...`` lines)."""
    lines = [line.strip() for line in str(key).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown reason"
    explanation = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.startswith("Explanation:")), "")
    text = f"{lines[0]}: {explanation}" if explanation else lines[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _describe_signal(kind: str, key: str) -> str:
    what = _summary(key)
    if "recompile limit" in what.lower() or "cache size limit" in what.lower():
        return (f"Dynamo stopped compiling part of this model ({what}); those calls run eagerly, unfused and "
                "unchecked. Compile fewer variants (shapes, options, module settings) of one class, or raise "
                "attnfuse.capture.RECOMPILE_LIMIT")
    if kind == "graph_break":
        return (f"Dynamo split this model at a graph break ({what}); a softmax and the products around it "
                "on different sides of a break are not seen as one attention")
    return f"Dynamo could not compile part of this model ({what}); that part ran eagerly, unfused and unchecked"


def _why_no_graph(code: Optional[CodeType]) -> Optional[str]:
    """A note naming the recompile limit when Dynamo holds that many variants of ``code`` already."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # a torch without this debugging hook: the general note stands alone
        return None
    if code is None:
        return None
    variants = len(_debug_get_cache_entry_list(code))
    if variants < recompile_limit():
        return None
    return (f"Dynamo's recompile limit is reached for {code.co_name} ({code.co_filename}:{code.co_firstlineno}): "
            f"it holds {variants} compiled variants, so this model runs eagerly, unfused and unchecked. Compile "
            "fewer variants (shapes, options, module settings) of one class, or raise "
            "attnfuse.capture.RECOMPILE_LIMIT")


# ----------------------------------------------------------------------------- compiling a model

# Compiled variants of one code object before Dynamo falls back to eager, for code compiled by
# attnfuse only (Dynamo's own default is 8): every configuration of a class (head counts and other
# int attributes are static guards), every set of rewrite options and every input shape family
# that Dynamo cannot make dynamic is one variant, and they add up across the models of a process.
RECOMPILE_LIMIT = 64


_COMPILE_TAKES_A_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters  # torch >= 2.12?


def recompile_limit() -> int:
    """The limit for attnfuse-compiled code: ours, or the user's global one if that is higher."""
    return max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)


def compile_model_call(fn: Callable[..., Any], backend: Callable, dynamic: Optional[bool]) -> Callable[..., Any]:
    """``torch.compile(fn, backend=backend)``, with the recompile limit raised through
    ``torch.compile(recompile_limit=)`` where torch takes it (``captured`` raises it around each call elsewhere)."""
    if _COMPILE_TAKES_A_LIMIT:
        return torch.compile(fn, backend=backend, dynamic=dynamic, recompile_limit=recompile_limit())
    return torch.compile(fn, backend=backend, dynamic=dynamic)


def captured(compiled: Callable[..., Any], capture: Capture) -> Callable[..., Any]:
    """``compiled`` (a ``compile_model_call`` result) run with ``capture`` active, so the graphs it runs
    report to it, and with Dynamo's config set for it alone; afterwards, notes what Dynamo did not hand to
    the pass.

    The config: Python floats specialized and, where ``torch.compile`` takes no ``recompile_limit``, the
    recompile limit raised. Unspecialized (under ``dynamic=True``, or for a second instance with another
    value), a module's float attributes (a scale, a softcap, a fill, a dropout p, an ALiBi factor) become
    run-time inputs, and the attention they configure could no longer be read. Dynamo reads its config only
    while it compiles, which can happen in any call (a new shape), so each call sets it; a value already
    set (the user's, or an outer optimized model's) is left alone, and only what was changed is restored.
    """
    config = torch._dynamo.config
    limit = recompile_limit()

    def call(*args: Any, **kwargs: Any) -> Any:
        graphs_before, attempts = capture.graph_calls, _SIGNALS.start()
        capture.calls += 1
        capture.timings, capture.mark = None, time.perf_counter()
        if capture.compiled_now:
            capture.compiled_now.clear()
        started = capture.mark
        specialized = config.specialize_float
        if not specialized:
            config.specialize_float = True
        previous_limit = None if _COMPILE_TAKES_A_LIMIT else config.recompile_limit
        if previous_limit is not None and previous_limit < limit:
            config.recompile_limit = limit
        token = _ACTIVE.set(capture)
        try:
            return compiled(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
            if not specialized:
                config.specialize_float = specialized
            if previous_limit is not None and previous_limit < limit:
                config.recompile_limit = previous_limit
            if capture.timings is not None and not capture.slow_noted:
                capture.slow_noted = logs.note_slow_compile(capture.report.root, time.perf_counter() - started,
                                                            capture.timings)
            _SIGNALS.finish(capture.report, attempts)
            if capture.graph_calls == graphs_before:
                capture.report.note(NO_GRAPH_RAN)
                reason = _why_no_graph(capture.code)
                if reason:
                    capture.report.note(reason)

    return call


def _may_hold_attention(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` calls a softmax or PyTorch's own attention: without either, the pass finds no site
    and changes nothing."""
    return any(calls_softmax(node) for node in graph.nodes) or next(native_sites(graph), None) is not None


def _record_buffer_values(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Give the matcher the values of module buffers (Dynamo passes them as graph inputs), for masks
    built from them; rewrites that rely on such a value guard it (``attnfuse.guards``)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if "_buffers_" in node.name and isinstance(value, torch.Tensor) and not isinstance(
                value, torch._subclasses.FakeTensor):
            node.meta[BUFFER_VALUE] = value


# ----------------------------------------------------------------------------- the torch.compile route

ROUTE_OPTIONS = {"dynamic": "pass dynamic= to torch.compile itself",
                 "filter_fn": "use attnfuse.optimize(model, filter_fn=...), which knows the model's module names"}


def route_options(options: dict[str, Any]) -> Options:
    """The options of a ``torch.compile`` route backend: ``optimize``'s names, Inductor by default."""
    for name, instead in ROUTE_OPTIONS.items():
        if name in options:
            raise TypeError(f"attnfuse: the torch.compile backend takes no {name}= option; {instead}")
    return Options.from_kwargs(**{"compiler": "inductor", **options})


class CompileBackend:
    """A backend for ``torch.compile(model, backend=attnfuse.backend(...))`` that keeps the report of
    every graph it compiled (``.report``): what ``attnfuse.report`` is to ``optimize``."""

    def __init__(self, options: Options, report: FusionReport) -> None:
        self.options, self.report = options, report

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                 **options: Any) -> Callable:
        if options:
            raise TypeError(f"attnfuse: pass the options to attnfuse.backend(...), not to torch.compile; got "
                            f"{sorted(options)}")
        settings = self.options if mode is None else Options.from_kwargs(self.options, mode=mode)
        compiled = AttnfuseBackend(settings)(gm, example_inputs)
        self.report.add_graph(compiled.sites, compiled.timings)
        compiled.watch(self.report, by_capture=False)
        _ROUTE.last = self.report
        return compiled


class _Route:
    """The report of the string backend ``"attnfuse"`` (the graphs it compiled since ``torch._dynamo.reset()``)
    and the report the last graph of either route went into."""

    def __init__(self) -> None:
        self.strings = FusionReport(root="model")
        self.last: Optional[FusionReport] = None

    def reset(self) -> None:
        """Dynamo's caches were cleared: the string backend's graphs are gone, so is their report."""
        if self.last is self.strings:
            self.last = None
        self.strings = FusionReport(root="model")


_ROUTE = _Route()


def last_report() -> Optional[FusionReport]:
    """The report that the most recent graph compiled through the ``torch.compile`` route went into: an
    ``attnfuse.backend(...)`` object's, or that of every ``backend="attnfuse"`` graph compiled since
    ``torch._dynamo.reset()``; None before any."""
    return _ROUTE.last


def attnfuse_backend(gm: GraphModule, example_inputs: Sequence[Any], **options: Any) -> Callable:
    """The ``torch.compile(model, backend="attnfuse")`` entry point: rewrite, then Inductor by default.
    Options come as keywords or as ``torch.compile(..., options={...})``, with ``optimize``'s names."""
    settings = route_options({**(options.pop("options", None) or {}), **options})
    compiled = AttnfuseBackend(settings)(gm, example_inputs)
    _ROUTE.strings.add_graph(compiled.sites, compiled.timings)
    compiled.watch(_ROUTE.strings, by_capture=False)
    _ROUTE.last = _ROUTE.strings
    return compiled


# torch._dynamo.reset() calls reset() on the backends it cached (torch.compile's wrapper passes it on)
attnfuse_backend.reset = _ROUTE.reset  # type: ignore[attr-defined]


def register_string_backend() -> None:
    """Make ``backend="attnfuse"`` work without the installed entry point (a source checkout): registered
    with Dynamo unless the entry point is known to Dynamo already (it loads this same function)."""
    try:
        from torch._dynamo.backends import registry
    except ImportError:  # a torch without Dynamo's registry: only the entry point can register it
        return
    loaded, known = getattr(registry, "_COMPILER_FNS", {}), getattr(registry, "_BACKENDS", {})
    if "attnfuse" in loaded or known.get("attnfuse") is not None:
        return
    registry.register_backend(compiler_fn=attnfuse_backend, name="attnfuse")

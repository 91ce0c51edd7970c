"""Audit: what was fused at each site, on which kernel, and why anything was left alone."""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch.fx import Node

from attnfuse.fx_utils import tensor_meta
from attnfuse.logs import ModelTimings, Timings
from attnfuse.site import AttentionSite
from attnfuse.unpadded import Unpadded
from attnfuse.vocabulary import KeepMask

ALREADY_FUSED = "native"  # the status of a site the model already runs on a fused kernel
EXCLUDED_BY_FILTER = "excluded by filter_fn"  # the reason of a site whose module the user's filter rejected
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
# The frame's module: its first local (``L['self']``), or ``L['args'][0]`` when a decorator's
# ``wrapper(*args, **kwargs)`` received it.
_FRAME_ROOT = re.compile(r"^L\['args'\]\[0\]|^L\['[^']+'\]")
_FRAME_LOCAL = re.compile(r"^L\['([^']+)'\](?:\[(\d+)\])?")
_ACCESS = re.compile(r"\.(\w+)|\[(\d+)\]|\['([^']+)'\]")
_CONTAINER_ATTRIBUTES = ("__dict__", "_modules")


def relative_module_path(node: Node) -> str:
    """The dotted path, below the module of the compiled frame, of the module whose code holds ``node``
    (``layers.0.attn``, as ``named_modules()`` spells it); empty for the frame's own code."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    path = _FRAME_ROOT.sub("", path if isinstance(path, str) else str(path))
    parts = [next(g for g in m.groups() if g) for m in _ACCESS.finditer(path)]
    return ".".join(p for p in parts if p not in _CONTAINER_ATTRIBUTES)


def frame_module_local(node: Node) -> Optional[tuple[str, Optional[int]]]:
    """The local of the compiled frame that holds the module whose code holds ``node``: ``("self", None)``
    for ``L['self']``, ``("args", 0)`` for ``L['args'][0]``; None where Dynamo recorded no module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    match = _FRAME_LOCAL.match(path if isinstance(path, str) else str(path))
    if not match:
        return None
    return match.group(1), (int(match.group(2)) if match.group(2) is not None else None)


def compiled_frame(node: Node) -> Optional[tuple[str, int]]:
    """``(file, line)`` of the outermost frame Dynamo compiled for ``node``'s graph."""
    match = _FILE_LINE.search(node.meta.get("stack_trace") or "")
    return (match.group(1), int(match.group(2))) if match else None


class ModuleIndex:
    """Where each module's ``forward`` lives, to name a graph Dynamo compiled for a submodule's frame
    (a graph break ends the model's frame; the submodule's call then starts a frame of its own)."""

    def __init__(self, model: Any) -> None:
        self._ranges: list[tuple[str, int, int, str]] = []
        self._model: Optional[weakref.ref] = weakref.ref(model)
        self._names: dict[int, tuple[weakref.ref, str]] = {}
        for name, module in model.named_modules():
            self._names[id(module)] = (weakref.ref(module), name)
            code = getattr(inspect.unwrap(getattr(type(module), "forward", None) or (lambda: None)), "__code__", None)
            if code is not None:
                lines = [line for _, _, line in code.co_lines() if line is not None] or [code.co_firstlineno]
                self._ranges.append((code.co_filename, code.co_firstlineno, max(lines), name))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_names": {}}  # weak references do not pickle

    def name_of(self, module: Any) -> Optional[str]:
        """``module``'s name in ``named_modules()`` of the model (``""`` for the model), or None if it holds
        no such module now. Looked up again once when ``module`` is not where it was."""
        entry = self._names.get(id(module))
        if entry is not None and entry[0]() is module:
            return entry[1]
        model = self._model() if self._model is not None else None
        if model is None:
            return None
        self._names = {id(m): (weakref.ref(m), name) for name, m in model.named_modules()}
        entry = self._names.get(id(module))
        return entry[1] if entry is not None and entry[0]() is module else None

    def module_names(self, relative: str, frame: Optional[tuple[str, int]]) -> list[str]:
        """The ``named_modules()`` names a site at ``relative`` below ``frame`` may belong to (several
        where modules share the compiled graph)."""
        return [".".join(part for part in (owner, relative) if part) for owner in self.owners(frame) or [""]]

    def owners(self, frame: Optional[tuple[str, int]]) -> list[str]:
        """The modules whose ``forward`` holds ``frame`` (the innermost function when they nest)."""
        if frame is None:
            return []
        found = [r for r in self._ranges if r[0] == frame[0] and r[1] <= frame[1] <= r[2]]
        innermost = min((r[2] - r[1] for r in found), default=None)
        return [r[3] for r in found if r[2] - r[1] == innermost]


def name_pattern(names: list[str]) -> str:
    """One name for the modules that share a compiled graph: ``blocks.*`` for ``blocks.0, blocks.1``."""
    patterns: list[str] = []
    for name in names:
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name) if len(names) > 1 else name
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns[0] if len(patterns) == 1 else "{" + ", ".join(patterns) + "}"


def class_name(module: Any) -> str:
    """The name reports give ``module``'s class: its own, or the class FSDP2's ``fully_shard`` derived its own
    from (``FSDPLlamaForCausalLM`` is named ``LlamaForCausalLM``), so names do not depend on when it sharded."""
    kind = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return kind.__name__
    if isinstance(module, FSDPModule):
        kind = next((base for base in kind.__mro__[1:] if not issubclass(base, FSDPModule)), kind)
    return kind.__name__


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


# ----------------------------------------------------------------------------- what a site does and what ran there

@dataclass
class KernelRecord:
    """What ran at a site, filled in on its first call (the audit reads it), and why the kernels tried
    before it refused the call: ``(kernel, reason)`` pairs (``attend`` calls ``refused`` first); for a site whose
    run-time mask or bias is checked for the causal triangle, the calls of each outcome so far."""

    kernel: Optional[str] = None
    refusals: tuple[tuple[str, str], ...] = ()
    # a site whose run-time mask or bias is checked per call for the causal triangle: calls read as causal and
    # calls run with the tensor (``guards.RunTimeCausal.calls``, shared)
    causal_checks: Optional[dict[str, int]] = None

    def __call__(self, name: str) -> None:
        self.kernel = name

    def refused(self, refusals: tuple[tuple[str, str], ...]) -> None:
        self.refusals = refusals


def site_features(site: AttentionSite) -> dict:
    """The audit's description of what ``site`` does (its row's features / reason column)."""
    q_meta, k_meta = tensor_meta(site.q.node), tensor_meta(site.k.node)
    head = site.batch[-1] if len(site.batch) >= 2 else None
    q_heads = q_meta.shape[site.q.axes.index(head)] if head else 1
    k_heads = (k_meta.shape[site.k.axes.index(head)] if head and head in site.k.axes else 1) * site.kv_group
    kv_heads = k_heads // site.kv_group
    q_len, k_len = q_meta.shape[site.q.axes.index(site.query)], k_meta.shape[site.k.axes.index(site.key)]
    size = _size_namer(q_len, k_len)
    masks = [_mask_kind(m, size) for m in site.scores.keep_masks]
    bias_shapes = [_shape_str(tensor_meta(b).shape, size) for b, _ in site.scores.biases]
    runtime_scale = any(tensor_meta(f.value) is not None for f in site.scores.tensor_factors)
    return {
        "causal": site.scores.causal,
        "causal_guarded_by_buffer": bool(site.scores.causal_guard) or None,
        "causal_checked_per_call": site.scores.run_time_causal,
        "without_padding": _without_padding(site.scores.unpadded),
        "window": size(site.scores.window) if site.scores.window is not None else None,
        "softcap": site.scores.softcap,
        "score_functions": len(site.scores.functions) or None,
        "mask": ", ".join(masks) or None,
        "bias": ", ".join(bias_shapes) or None,
        "scale": "tensor" if runtime_scale else (round(site.scores.scale, 6) if not site.scores.tensor_factors
                                                 else "run-time number"),
        "q_heads": int(q_heads),
        "kv_heads": int(kv_heads),
        "dropout": "run-time p" if isinstance(site.dropout_p, Node) else site.dropout_p,
        "masked_fill": site.scores.fill,
        "q_len": size(q_len),
        "k_len": size(k_len),
        "filled_bias_kept_whole": site.scores.filled_bias_kept,
    }


def _without_padding(unpadded: Optional[Unpadded]) -> Optional[str]:
    """What the site's mask runs as on calls whose key padding keeps every key (``attnfuse.unpadded``), or None:
    ``dropped`` for a padding term beside the site's own causal flag."""
    if unpadded is None:
        return None
    if not unpadded.whole:
        return "dropped"
    return f"causal {unpadded.causal.replace('_', '-')}" if unpadded.causal else "no mask"


def _mask_kind(mask: KeepMask, size: Callable[[object], object]) -> str:
    """How the audit names a keep-mask: ``full`` (varies by query) or ``key padding``, with its shape."""
    meta = tensor_meta(mask.node)
    shape = tuple(meta.shape)
    query_varies = meta.dim() >= 2 and shape[-2] != 1
    return f"{'full' if query_varies else 'key padding'} {_shape_str(shape, size)}"


def _size_namer(q_len: object, k_len: object) -> Callable[[object], object]:
    """How the audit writes a size: a number; ``L`` / ``S`` for a dynamic query / key length (a symbol
    such as ``s95`` means nothing to a reader); ``L+1``-style for other dynamic sizes where Dynamo's
    expression mentions them, else ``dyn``."""
    names = {}
    for value, name in ((k_len, "S"), (q_len, "L")):
        if isinstance(value, torch.SymInt):
            names[str(value)] = name

    def size(value: object) -> object:
        if isinstance(value, int):
            return value
        text = str(value)
        if text in names:
            return names[text]
        for symbol, name in names.items():
            text = re.sub(rf"\b{symbol}\b", name, text)
        return text.replace(" ", "") if not re.search(r"\bs\d+\b", text) else "dyn"
    return size


def _shape_str(shape: tuple, size: Callable[[object], object]) -> str:
    return "(" + ", ".join(str(size(s)) for s in shape) + ")"


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
    frame: Optional[tuple[str, int]] = None  # the compiled frame (``compiled_frame``), to name it below the model
    frame_local: Optional[tuple[str, Optional[int]]] = None  # its local holding the module (``frame_module_local``)

    @property
    def backend(self) -> Optional[str]:
        if self.status == ALREADY_FUSED:
            return self.predicted_backend
        if self.status != "fused":
            return None
        return (self.record.kernel if self.record and self.record.kernel else self.predicted_backend)

    @property
    def all_features(self) -> dict:
        """``features``; where the last call ran unfused, why each fused kernel refused it (``unfused_because``);
        and, for a site checked per call for the causal triangle, how many calls so far were read
        as causal (``calls_read_as_causal``; ``calls_causal_by_proof`` of them without reading the tensor: proven where
        it was built, or read by an earlier layer, ``attnfuse.carried``) and how many ran with it (``calls_run_with_it``)."""
        features = self.features
        if self.record is not None and self.status == "fused" and (self.record.kernel or "").startswith("unfused"):
            features = {**features, "unfused_because": "; ".join(f"{kernel}: {reason}"
                                                                   for kernel, reason in self.record.refusals)}
        counts = self.record.causal_checks if self.record is not None and self.status == "fused" else None
        if counts is None:
            return features
        return {**features, "calls_read_as_causal": counts["causal"], "calls_run_with_it": counts["as given"],
                "calls_causal_by_proof": counts["proven"]}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "status": self.status, "reason": self.reason,
                "features": {str(k): _json_value(v) for k, v in self.all_features.items()}, "backend": self.backend}


def _json_value(value: Any) -> Any:
    """``value`` as strict JSON holds it: a non-finite float as a string (``"-inf"``), a tuple as a list,
    anything JSON has no type for (a dtype, a symbolic size) as its string."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def _feature_summary(features: dict) -> str:
    parts = []
    if features.get("multihead"):
        parts.append("nn.MultiheadAttention, need_weights=False (its weights were never read)")
    if features.get("causal"):
        parts.append(f"causal {features['causal'].replace('_', '-')}")
    if features.get("window") is not None:
        parts.append(f"window {features['window']}")
    if features.get("softcap") is not None:
        parts.append(f"softcap {features['softcap']:g}")
    if features.get("score_functions"):
        parts.append(f"{features['score_functions']} position bias(es)")
    checked, unpadded = features.get("causal_checked_per_call"), features.get("without_padding")
    for kind in ("mask", "bias"):
        if not features.get(kind):
            continue
        if checked == kind:
            parts.append(f"{kind} {features[kind]}, checked per call for the causal triangle" + _causal_calls(features))
        elif unpadded == "dropped":
            parts.append(f"{kind} {features[kind]}, left out where it keeps every key" + _causal_calls(features, "so"))
        elif unpadded:
            run = "without it" if unpadded == "no mask" else f"as {unpadded}"
            parts.append(f"{kind} {features[kind]}, run {run} where its padding keeps every key"
                         + _causal_calls(features, "so"))
        else:
            parts.append(f"{kind} {features[kind]}")
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
    if features.get("filled_bias_kept_whole"):
        parts.append("filled bias added whole")
    if features.get("unfused_because"):
        parts.append(f"run unfused, as {features['unfused_because']}")
    return ", ".join(parts)


def _causal_calls(features: dict, run: str = "causal") -> str:
    """`` (causal on 3 of 4 calls of its graph, 2 without reading the mask)``, from the per-call counts
    ``SiteReport.to_dict`` adds (``run``: how the calls without the tensor ran); empty before any call."""
    causal, given = features.get("calls_read_as_causal"), features.get("calls_run_with_it")
    if causal is None or not causal + given:
        return ""
    proven = features.get("calls_causal_by_proof")
    by_proof = f", {proven} without reading the mask" if proven else ""
    return f" ({run} on {causal} of {causal + given} calls of its graph{by_proof})"


@dataclass
class GraphSites:
    """The sites of one compiled graph, named below the frame Dynamo compiled (``layers.0.attn``). Dynamo
    runs one compiled graph for every module whose code and guards match (the layers of a model split by a
    graph break per layer, identical models), so each of their reports holds it and names the modules that
    ran it (``FusionReport.ran``)."""

    sites: list[SiteReport] = field(default_factory=list)

    @property
    def runner_local(self) -> Optional[tuple[tuple[str, int], tuple[str, Optional[int]]]]:
        """``(frame, local)``: the compiled frame and its local that holds the module running it, for the
        sites' report to name that module; None where no site has both."""
        for site in self.sites:
            if site.frame is not None and site.frame_local is not None:
                return site.frame, site.frame_local
        return None


@dataclass
class FusionReport:
    """What attnfuse did to one model: the sites of every graph of it that ran through the pass, and
    notes on anything of it that did not (Dynamo graph breaks, eager fallbacks). ``print(report)``."""

    root: str = "model"
    graphs: list[GraphSites] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    modules: Optional[ModuleIndex] = field(default=None, repr=False, compare=False)
    not_optimized: Optional[str] = None  # why the model this report was asked for does not run the rewrite
    _graph_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)
    _graph_timings: list[Timings] = field(default_factory=list, init=False, repr=False, compare=False)
    # per graph (by id): the modules seen running it (their names, or labels where ``modules`` has none)
    # and the model call that first ran each (None on the torch.compile route, which has no model call)
    _runners: dict[int, dict[str, Optional[int]]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _labels: Any = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # weak references do not pickle, and a copy's graphs have other ids: runners go by the graph's place
        runners = [self._runners.get(id(graph)) for graph in self.graphs]
        return {**self.__dict__, "_labels": None, "_runners": runners, "_graph_ids": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        runners = state.pop("_runners")
        self.__dict__.update(state, _labels=weakref.WeakKeyDictionary())
        self._graph_ids = {id(graph) for graph in self.graphs}
        self._runners = {id(graph): seen for graph, seen in zip(self.graphs, runners) if seen is not None}

    @property
    def sites(self) -> list[SiteReport]:
        """Every site of every module that ran it, named from ``root``; a later graph's record of the same
        module and line (a recompile for new shapes, a rollback) replaces the earlier one."""
        merged: dict[tuple[str, str], SiteReport] = {}
        for graph in self.graphs:
            for named in self.named(graph):
                merged[(named.name, named.source)] = named
        return list(merged.values())

    def named(self, graph: GraphSites) -> list[SiteReport]:
        """The sites of ``graph`` named from ``root``: one row a site for each module seen running the graph
        (the frame Dynamo compiled, reused by every layer of a model broken per layer), else for the modules
        whose ``forward`` holds its frame, as one pattern (``layers.*.attn``)."""
        return [replace(site, name=rooted(self.root, ".".join(part for part in (owner, site.name) if part)))
                for owner in self._frame_owners(graph) for site in graph.sites]

    def _frame_owners(self, graph: GraphSites) -> list[str]:
        """The names below ``root`` of the modules that ran ``graph``'s frame; a module the report has no
        name for is its frame's root, labelled ``<Class k>`` only where the report saw several of its class."""
        runners = list(self._runners.get(id(graph), ()))
        if runners:
            unnamed = Counter(label.rsplit(" ", 1)[0] for labels in self._runners.values() for label in labels
                              if label.startswith("<"))
            return [label if not label.startswith("<") or unnamed[label.rsplit(" ", 1)[0]] > 1 else ""
                    for label in runners]
        if self.modules is None:
            return [""]
        frame = next((site.frame for site in graph.sites if site.frame is not None), None)
        owners = self.modules.owners(frame)
        return [name_pattern(owners) if owners else ""]

    def ran(self, graph: GraphSites, module: Any, call: Optional[int]) -> bool:
        """Record that ``module`` ran ``graph`` during the model's call number ``call`` (None: no model call
        to tell calls apart); whether to go on watching ``graph``: not once a module runs it again in a later
        call (or, with no call number, at all), as every module that runs it has been seen by then."""
        runners = self._runners.setdefault(id(graph), {})
        label = self._label(module)
        if label in runners:
            return call is not None and runners[label] == call
        runners[label] = call
        return True

    def _label(self, module: Any) -> str:
        """``module``'s name below the model, or ``<Class k>`` (the k-th of its class seen) where the
        report knows no model that holds it (the torch.compile route without a model)."""
        name = self.modules.name_of(module) if self.modules is not None else None
        if name is not None:
            return name
        label = self._labels.get(module)
        if label is None:
            kind = class_name(module)
            label = f"<{kind} {sum(text.startswith(f'<{kind} ') for text in self._labels.values())}>"
            self._labels[module] = label
        return label

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

    @property
    def timings(self) -> ModelTimings:
        """Seconds the first call of each graph spent per phase (Dynamo's capture, attnfuse's rewrite, the
        compile, the first run, the verification), per graph and summed."""
        return ModelTimings(list(self._graph_timings))

    def add_graph(self, graph: GraphSites, timings: Optional[Timings] = None) -> None:
        """Record that this model ran ``graph`` (once; the report keeps it, so its id stays unique), and
        ``timings``, what its first call cost this model (filled in as that call goes on)."""
        if id(graph) not in self._graph_ids:
            self._graph_ids.add(id(graph))
            self.graphs.append(graph)
            if timings is not None:
                self._graph_timings.append(timings)

    def note(self, text: str) -> None:
        """Record something the user must know about how the model ran (once)."""
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data that strict JSON can hold (see ``to_json``)."""
        sites = self.sites
        notes = ([self.not_optimized] if self.not_optimized else []) + list(self.notes)
        return {"fused": sum(s.status == "fused" for s in sites), "skipped": sum(s.status == "skipped" for s in sites),
                "already_fused": sum(s.status == ALREADY_FUSED for s in sites),
                "sites": [s.to_dict() for s in sites], "notes": notes,
                "timings": _json_value(self.timings.to_dict())}

    def to_json(self, **dumps_options: Any) -> str:
        """``to_dict()`` as strict JSON (no NaN or Infinity); ``dumps_options`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), allow_nan=False, **dumps_options)

    def __str__(self) -> str:
        if self.not_optimized:
            return f"attnfuse: not optimized: {self.not_optimized}"
        sites = self.sites
        notes = [f"note: {text}" for text in self.notes]
        if not sites and notes:
            return "\n".join(["attnfuse: no attention seen, but not all of the model went through the pass:", *notes])
        if not sites:
            return "attnfuse: no attention found (no softmax between two products); the model runs unchanged."
        rows = [("module", "source", "status", "kernel", "features / reason")]
        for s in sites:
            detail = _feature_summary(s.all_features) if s.status == "fused" else f"{s.reason}"
            rows.append((s.name, _short_source(s.source), s.status, s.backend or "-", detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        fused, skipped, native = (sum(s.status == status for s in sites) for status in ("fused", "skipped", ALREADY_FUSED))
        lines = [f"attnfuse: {fused} fused, {skipped} skipped" +
                 (f", {native} already on a fused kernel (status {ALREADY_FUSED})" if native else "")]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 17)
        if any(isinstance(s.features.get("q_len"), str) or isinstance(s.features.get("k_len"), str) for s in sites):
            lines.append("L, S: the query and key lengths, read at run time (the graph was compiled for dynamic shapes)")
        if self._graph_timings:
            lines.append(str(self.timings))
        return "\n".join(lines + notes)

    __repr__ = __str__


def _short_source(source: str) -> str:
    """``<folder>/<file>:<line>``: the file and the folder (package) it is in, for a table a person reads."""
    path, _, line = source.rpartition(":")
    if not path:
        return source
    folder = os.path.basename(os.path.dirname(path))
    return f"{folder}/{os.path.basename(path)}:{line}" if folder else f"{os.path.basename(path)}:{line}"

"""The public entry points: ``optimize`` (compile a model in place), ``restore`` (undo it), ``report``,
``audit`` (report only), and ``backend`` for ``torch.compile``."""
from __future__ import annotations

from types import CodeType
from typing import Any, Callable, Optional

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from attnfuse.capture import (Capture, CompileBackend, backend_for, captured, compile_model_call, last_report,
                              route_options)
from attnfuse.options import Options
from attnfuse.report import FusionReport, ModuleIndex, class_name

__all__ = ["audit", "backend", "last_report", "optimize", "report", "restore"]

_STATE = "_attnfuse_state"

COPY_NOT_OPTIMIZED = ("this module holds the report of an optimized model but does not run attnfuse's compiled call: "
                      "it is a copy (copy.deepcopy, pickle, torch.save/load), and copies run the original code, as "
                      "copies of a torch.compile'd module do, or something replaced the call (model.compile()). "
                      "Call attnfuse.optimize on it")


class _Optimized:
    """What ``optimize`` leaves on a model: its report, and the compiled call it installed (not copied by
    pickling, as torch drops the compiled call itself), to tell a copy from the optimized model."""

    def __init__(self, report: FusionReport, call: Callable[..., Any]) -> None:
        self.report, self.call = report, call

    def __getstate__(self) -> dict[str, Any]:
        return {"report": self.report, "call": None}


def _require_module(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnfuse.{what} expects a torch.nn.Module, got {type(model).__name__}; "
                        "for a plain function use torch.compile(fn, backend='attnfuse')")
    if isinstance(model, OptimizedModule):
        raise TypeError(f"attnfuse.{what} got a module already wrapped by torch.compile, whose calls attnfuse "
                        f"cannot reach; pass the original module (model._orig_mod) to attnfuse.{what}, or compile "
                        "with attnfuse inside: torch.compile(model, backend='attnfuse')")


def _forward_code(model: nn.Module) -> Optional[CodeType]:
    return getattr(getattr(type(model), "forward", None), "__code__", None)


def optimize(model: nn.Module, options: Optional[Options] = None, **kwargs: Any) -> nn.Module:
    """Fuse the hand-written attention of ``model``; returns the same module, compiled in place.

    The rewrite happens on the first call (Dynamo captures the model then); parameters and
    ``state_dict()`` keys are unchanged. Options, as keywords or an ``attnfuse.Options`` (keywords
    replace its fields): ``compiler="eager" | "inductor"``, ``kernels=[...]``, ``verify=True``,
    ``dynamic=``, ``autotune=True``, ``filter_fn=lambda module, name: ...`` (sites in modules it rejects
    are left alone). ``attnfuse.report(model)`` says what was fused once the model has run;
    ``attnfuse.restore(model)`` undoes this.
    """
    _require_module(model, "optimize")
    settings = Options.from_kwargs(options, **kwargs)
    report = FusionReport(root=class_name(model), modules=ModuleIndex(model))
    excludes = None if settings.filter_fn is None else _excluded_by(model, report, settings.filter_fn)
    compiled = compile_model_call(model._call_impl, backend_for(settings), settings.dynamic)
    call = captured(compiled, Capture(report, settings.verify, code=_forward_code(model), excludes=excludes))
    model._compiled_call_impl = call
    object.__setattr__(model, _STATE, _Optimized(report, call))
    return model


def _excluded_by(model: nn.Module, report: FusionReport,
                 filter_fn: Callable[[Any, str], bool]) -> Callable[[str, Optional[tuple[str, int]]], bool]:
    """Whether ``filter_fn`` rejects the module of a site (any of them, where modules share its graph)."""

    def excludes(relative: str, frame: Optional[tuple[str, int]]) -> bool:
        names = report.modules.module_names(relative, frame) if report.modules else [relative]
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:  # a path Dynamo spelled differently from named_modules()
                module = None
            if not filter_fn(module, name):
                return True
        return False

    return excludes


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: ``model`` runs its original ``forward`` again (a model never optimized is
    returned unchanged). Returns the same module."""
    _require_module(model, "restore")
    state = model.__dict__.get(_STATE)
    if state is not None:
        if model._compiled_call_impl is state.call:
            model._compiled_call_impl = None
        object.__delattr__(model, _STATE)
    return model


def report(model: nn.Module) -> FusionReport:
    """The ``FusionReport`` of a model passed to ``optimize`` (empty until its first call). For a copy of
    an optimized model, which runs the original code, the report says so (``not_optimized``)."""
    _require_module(model, "report")
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError("attnfuse.report: this model was not passed to attnfuse.optimize (or was restored); "
                         "use attnfuse.audit(model, *inputs) to inspect it without changing it")
    if state.call is None or model._compiled_call_impl is not state.call:
        return FusionReport(root=state.report.root, not_optimized=COPY_NOT_OPTIMIZED)
    return state.report


def audit(model: nn.Module, *args: Any, **kwargs: Any) -> FusionReport:
    """Run one call of ``model(*args, **kwargs)`` through the pass, verified, without changing ``model``."""
    _require_module(model, "audit")
    result = FusionReport(root=class_name(model), modules=ModuleIndex(model))
    compiled = compile_model_call(model._call_impl, backend_for(Options()), None)
    captured(compiled, Capture(result, verify=True, code=_forward_code(model)))(*args, **kwargs)
    return result


def backend(model: Optional[nn.Module] = None, **options: Any) -> CompileBackend:
    """A backend for ``torch.compile(model, backend=attnfuse.backend(...))`` with ``optimize``'s options
    (Inductor by default; ``dynamic`` goes to ``torch.compile``); its ``.report`` fills as graphs compile.
    Given ``model``, the report names sites as ``model.named_modules()`` does across graph breaks."""
    if model is not None:
        _require_module(model, "backend")
    report_ = FusionReport(root="model" if model is None else class_name(model),
                           modules=None if model is None else ModuleIndex(model))
    return CompileBackend(route_options(options), report_)


"""The public entry points: ``optimize`` (compile a model in place) and ``audit`` (report only)."""
from __future__ import annotations

from types import CodeType
from typing import Any, Optional

from torch import nn

from attnfuse.capture import Capture, backend_for, captured, compile_model_call
from attnfuse.options import Options
from attnfuse.report import FusionReport, ModuleIndex

_STATE = "_attnfuse_report"


def _require_module(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnfuse.{what} expects a torch.nn.Module, got {type(model).__name__}; "
                        "for a plain function use torch.compile(fn, backend='attnfuse')")


def _forward_code(model: nn.Module) -> Optional[CodeType]:
    return getattr(getattr(type(model), "forward", None), "__code__", None)


def optimize(model: nn.Module, **options: Any) -> nn.Module:
    """Fuse the hand-written attention of ``model``; returns the same module, compiled in place.

    The rewrite happens on the first call (Dynamo captures the model then); parameters and
    ``state_dict()`` keys are unchanged. Options (see ``attnfuse.options.Options``):
    ``compiler="eager" | "inductor"``, ``kernels=[...]``, ``verify=True``, ``dynamic=``.
    ``attnfuse.report(model)`` returns what was fused once the model has run.
    """
    _require_module(model, "optimize")
    settings = Options.from_kwargs(**options)
    report = FusionReport(root=type(model).__name__, modules=ModuleIndex(model))
    compiled = compile_model_call(model._call_impl, backend_for(settings), settings.dynamic)
    model._compiled_call_impl = captured(compiled, Capture(report, settings.verify, code=_forward_code(model)))
    object.__setattr__(model, _STATE, report)
    return model


def report(model: nn.Module) -> FusionReport:
    """The ``FusionReport`` of a model passed to ``optimize`` (empty until its first call)."""
    _require_module(model, "report")
    found = getattr(model, _STATE, None)
    if found is None:
        raise ValueError("attnfuse.report: this model was not passed to attnfuse.optimize; "
                         "use attnfuse.audit(model, *inputs) to inspect it without changing it")
    return found


def audit(model: nn.Module, *args: Any, **kwargs: Any) -> FusionReport:
    """Run one call of ``model(*args, **kwargs)`` through the pass, verified, without changing ``model``."""
    _require_module(model, "audit")
    result = FusionReport(root=type(model).__name__, modules=ModuleIndex(model))
    compiled = compile_model_call(model._call_impl, backend_for(Options()), None)
    captured(compiled, Capture(result, verify=True, code=_forward_code(model)))(*args, **kwargs)
    return result

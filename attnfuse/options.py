"""The options ``optimize``, ``audit`` and the ``torch.compile`` route take, checked once with errors that
say what to do."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional

from attnfuse.kernels.registry import kernel_choices, validate_kernels

COMPILERS = ("eager", "inductor")
# torch.compile's Inductor modes (``torch._inductor.list_mode_options``); "reduce-overhead" adds CUDA graphs.
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Options:
    """How attnfuse rewrites and runs a model.

    Attributes:
        compiler: ``"eager"`` runs the rewritten graph op by op (no Triton needed); ``"inductor"``
            hands it to Inductor.
        kernels: restrict SDPA to these kernels (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``,
            ``"flex"``; one name or a list); a call none of them can run raises.
        verify: on the first call of each graph, run the original and the rewritten graph on the
            real inputs and roll back every site whose output differs.
        dynamic: passed to ``torch.compile`` (None: Dynamo's automatic dynamic shapes).
        autotune: time the valid SDPA kernels once per call signature (device, dtype, shapes, mask
            kind, gradients) and use the fastest from then on, instead of the measured default order.
        filter_fn: ``filter_fn(module, name) -> bool``, called with the module that holds each attention
            site and its ``named_modules()`` name; a site whose module it rejects is left alone.
        mode: an Inductor mode, as ``torch.compile(mode=...)`` takes it (``"reduce-overhead"`` runs the
            compiled graphs as CUDA graphs); only with ``compiler="inductor"``.
    """

    compiler: str = "eager"
    kernels: Optional[tuple[str, ...]] = None
    verify: bool = False
    dynamic: Optional[bool] = None
    autotune: bool = False
    filter_fn: Optional[Callable[[Any, str], bool]] = None
    mode: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("compiler", self.compiler, COMPILERS)
        for name in ("verify", "autotune"):
            _check_choice(name, getattr(self, name), (True, False))
        _check_choice("dynamic", self.dynamic, (None, True, False))
        _check_choice("mode", self.mode, MODES)
        if self.mode not in (None, "default") and self.compiler != "inductor":
            raise ValueError(f"attnfuse: mode={self.mode!r} is an Inductor mode; pass compiler='inductor' with it "
                             "(the torch.compile route, backend='attnfuse', uses Inductor by default)")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("attnfuse: filter_fn must be a function (module, name) -> bool, "
                            f"got {type(self.filter_fn).__name__}")
        if self.kernels is not None:
            object.__setattr__(self, "kernels", _checked_kernels(self.kernels))

    @classmethod
    def names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, options: Optional["Options"] = None, **kwargs: Any) -> "Options":
        """``Options(**kwargs)``, or ``options`` with ``kwargs`` replacing its fields; unknown names raise."""
        if options is not None and not isinstance(options, Options):
            raise TypeError(f"attnfuse: options must be an attnfuse.Options, got {type(options).__name__}; "
                            f"or pass the options as keywords ({', '.join(cls.names())})")
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"attnfuse: unknown option(s) {unknown}; valid options are {cls.names()}")
        return replace(options, **kwargs) if options is not None else cls(**kwargs)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in choices):
        raise ValueError(f"attnfuse: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _checked_kernels(kernels: Any) -> tuple[str, ...]:
    if not isinstance(kernels, str) and not kernels:
        raise ValueError("attnfuse: kernels=[] allows no kernel; pass None for every kernel in the measured "
                         f"order, or some of {sorted(kernel_choices())}")
    return validate_kernels(kernels)

"""The options ``optimize`` and ``audit`` take, checked once with errors that say what to do."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from attnfuse.kernels.registry import validate_kernels

COMPILERS = ("eager", "inductor")


@dataclass(frozen=True)
class Options:
    """How attnfuse rewrites and runs a model.

    Attributes:
        compiler: ``"eager"`` runs the rewritten graph op by op (no Triton needed); ``"inductor"``
            hands it to Inductor.
        kernels: restrict SDPA to these kernels (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``);
            a call none of them can run raises.
        verify: on the first call of each graph, run the original and the rewritten graph on the
            real inputs and roll back every site whose output differs.
        dynamic: passed to ``torch.compile`` (None: Dynamo's automatic dynamic shapes).
        autotune: time the valid SDPA kernels once per call signature (device, dtype, shapes, mask
            kind, gradients) and use the fastest from then on, instead of the measured default order.
    """

    compiler: str = "eager"
    kernels: Optional[tuple[str, ...]] = None
    verify: bool = False
    dynamic: Optional[bool] = None
    autotune: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Options":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"attnfuse: unknown option(s) {unknown}; valid options are {sorted(names)}")
        if kwargs.get("compiler", "eager") not in COMPILERS:
            raise ValueError(f"attnfuse: compiler must be one of {COMPILERS}, got {kwargs['compiler']!r}")
        if "kernels" in kwargs:
            kwargs["kernels"] = validate_kernels(kwargs["kernels"])
        return cls(**kwargs)

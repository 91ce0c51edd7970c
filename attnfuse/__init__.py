"""attnfuse: find hand-written attention in any PyTorch model and run it as one fused kernel.

    model = attnfuse.optimize(model)          # same module, compiled in place
    print(attnfuse.audit(model, *inputs))     # what was fused, on which kernel, and why not
    torch.compile(model, backend="attnfuse")  # the same rewrite inside torch.compile

Pipeline (one module each): capture -> canonical -> match (rules in ``attnfuse.patterns``) ->
site -> lower (the rewrite) -> attend -> kernels -> report.
"""
from attnfuse import logs as _logs
from attnfuse.api import audit, backend, last_report, optimize, report, restore
from attnfuse.attend import attend
from attnfuse.caches import reset
from attnfuse.capture import register_string_backend as _register_string_backend
from attnfuse.options import Options
from attnfuse.report import FusionReport

__all__ = ["attend", "audit", "backend", "last_report", "optimize", "report", "reset", "restore", "FusionReport",
           "Options"]
__version__ = "0.2.0"

_register_string_backend()
_logs.register_with_torch()

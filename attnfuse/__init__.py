"""attnfuse: find hand-written attention in any PyTorch model and run it as one fused kernel.

    model = attnfuse.optimize(model)          # same module, compiled in place
    print(attnfuse.audit(model, *inputs))     # what was fused, on which kernel, and why not

Pipeline (one module each): capture -> canonical -> match (rules in ``attnfuse.patterns``) ->
site -> rewrite -> lower -> attend / dispatch -> report.
"""
from attnfuse.api import audit, optimize, report
from attnfuse.attend import attend
from attnfuse.caches import reset
from attnfuse.options import Options
from attnfuse.report import FusionReport

__all__ = ["attend", "audit", "optimize", "report", "reset", "FusionReport", "Options"]
__version__ = "0.1.0"

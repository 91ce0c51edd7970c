"""Whether code runs under a compiler's tracer: a leaf every run-time module may import."""
from __future__ import annotations

import torch


def is_traced(q: torch.Tensor) -> bool:
    """Whether we run under a compiler's tracer, where SDPA's ``CausalBias`` subclass cannot be created."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(q, (torch._subclasses.FakeTensor, FunctionalTensor)) or \
        torch._is_functional_tensor(q)

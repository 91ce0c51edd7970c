"""Whether code runs under a compiler's tracer: a leaf every run-time module may import."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

_TRACED_TENSOR_TYPES = (FakeTensor, FunctionalTensor)  # imported once: an import inside a per-call check costs


def is_traced(q: torch.Tensor) -> bool:
    """Whether we run under a compiler's tracer, where SDPA's ``CausalBias`` subclass cannot be created."""
    return torch.compiler.is_compiling() or isinstance(q, _TRACED_TENSOR_TYPES) or torch._is_functional_tensor(q)

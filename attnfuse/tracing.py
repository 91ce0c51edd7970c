"""Whether code runs under a compiler's tracer: a leaf every run-time module may import."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

_TRACED_TENSOR_TYPES = (FakeTensor, FunctionalTensor)  # imported once: an import inside a per-call check costs


def is_traced(q: torch.Tensor) -> bool:
    """Whether we run under a compiler's tracer, where SDPA's ``CausalBias`` subclass cannot be created."""
    return torch.compiler.is_compiling() or isinstance(q, _TRACED_TENSOR_TYPES) or torch._is_functional_tensor(q)


def holds_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has values to read (not a tracer's stand-in), also while a compiler runs: the example
    inputs a backend is handed are the first call's own tensors."""
    return not isinstance(tensor, _TRACED_TENSOR_TYPES) and not torch._is_functional_tensor(tensor)

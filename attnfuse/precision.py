"""Precision: the dtype a fused site computes in, chosen from the dtypes the original computed in.

A hand-written site may mix dtypes: q and k upcast to fp32 with v left in bf16 (GPT-J), a bf16 softmax
multiplied with ``v.float()``, an fp32 bias added to bf16 scores (type promotion makes the scores fp32
from there on), a 0-d fp64 temperature (a 0-d tensor does not promote a tensor of its category). The
fused kernels take one dtype for q, k and v and compute scores and softmax internally in
``internal_dtype`` of it. The site's dtype is the narrowest one that loses nothing the original kept:

- q, k and v are read in their own precision (exact widening casts in front of them are peeled),
- the fused output is not rounded below the original value product's dtype, and
- every score the original computed (QK product, scaled, biased, softmax) fits the kernel's
  internal precision.

So GPT-J in bf16 runs bf16 kernels (the upcasts only widened bf16 values), an fp32 bias on bf16 scores
runs bf16 kernels that add the bias in fp32, and a ``softmax(...).double() @ v.double()`` runs in fp64.
"""
from __future__ import annotations

from functools import reduce
from typing import Iterable

import torch

_HALF = (torch.float16, torch.bfloat16)


def internal_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision fused kernels compute scores and softmax in for ``dtype`` inputs."""
    return torch.float32 if dtype in _HALF else dtype


def widest(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype every one of ``dtypes`` converts to exactly (type promotion)."""
    return reduce(torch.promote_types, dtypes)


def site_dtype(operands: Iterable[torch.dtype], output: torch.dtype, scores: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype the fused call gives q, k and v (see the module docstring)."""
    dtype = widest([*operands, output])
    needed = widest([internal_dtype(dtype), *scores])
    return dtype if needed == internal_dtype(dtype) else torch.promote_types(dtype, needed)


def bias_dtype(q_dtype: torch.dtype, bias: torch.dtype) -> torch.dtype:
    """The dtype an additive bias is added in: its own if wider than q's (as type promotion adds an fp32
    bias to bf16 scores), at most the kernels' internal precision."""
    promoted = torch.promote_types(q_dtype, bias)
    return promoted if promoted == q_dtype or promoted == internal_dtype(q_dtype) else internal_dtype(q_dtype)

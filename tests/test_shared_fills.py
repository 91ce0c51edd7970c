"""A ``0 / finfo.min`` mask that several layers read (transformers builds one a forward) is raised into the kernels'
range once per graph call (``attnfuse.shared_fills``), not once per layer: the same outputs and gradients as the
original, rows without keys included, and no per-call pass over the mask in any layer."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import attnfuse
from attnfuse.kernels.rows import KERNEL_SAFE_FILL
from helpers import assert_fused_equal, leaf_copies

ATTEND = importlib.import_module("attnfuse.attend")  # the module (``attnfuse.attend`` is also the function)


def attention(q, k, v, mask, scale):
    scores = q @ k.transpose(-2, -1) * scale + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class SharedMaskLayers(nn.Module):
    """``layers`` attention calls of one forward reading one ``0 / finfo.min`` mask built from a key keep-mask
    (transformers' eager masks). ``write_between``: the mask is edited in place after the first layer (a key
    unmasked), so the later layers read another mask than the first."""

    def __init__(self, layers: int = 3, write_between: bool = False) -> None:
        super().__init__()
        self.layers, self.write_between = layers, write_between

    def forward(self, q, k, v, keep):
        zero = torch.tensor(0.0, device=q.device, dtype=q.dtype)  # transformers' spelling
        mask = torch.where(keep[:, None, None, :], zero, torch.finfo(q.dtype).min)
        out = q
        for i in range(self.layers):
            out = attention(out, k, v, mask, q.shape[-1] ** -0.5)
            if self.write_between and i == 0:
                mask[..., 0] = 0.0
        return out


def inputs(B=3, H=2, L=4, S=6, d=8, dtype=torch.float32, grad=False, dead=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_(grad) for n in (L, S, S))
    keep = torch.rand(B, S, generator=g) > 0.4
    keep[:, -1] = True
    for row in dead:  # a batch row whose keys are all padding: uniform rows in the original
        if row < B:
            keep[row] = False
    return q, k, v, keep


def test_one_pass_raises_the_shared_mask(monkeypatch):
    """Three layers read one mask: one ``clamp_min`` node in the graph, each site's plan carries the raised fill,
    and no call raises a fill itself."""
    raised = []
    real = ATTEND.within_kernel_range

    def recording(bias, fill, facts):
        raised.append(fill < KERNEL_SAFE_FILL)
        return real(bias, fill, facts)

    monkeypatch.setattr(ATTEND, "within_kernel_range", recording)
    from attnfuse.capture import backend_for
    from attnfuse.options import Options

    graphs = []

    def grab(gm, example_inputs):
        graphs.append(backend_for(Options())(gm, example_inputs).graph_module)
        return graphs[-1].forward

    torch._dynamo.reset()
    args = inputs()
    expected = SharedMaskLayers()(*args)
    with torch.no_grad():
        out = torch.compile(SharedMaskLayers(), backend=grab, dynamic=False)(*args)
    torch.testing.assert_close(out, expected.detach(), atol=2e-5, rtol=1e-4)
    assert raised and not any(raised), raised  # every call got a fill already in range
    clamps = [n for g in graphs for n in g.graph.nodes if n.op == "call_method" and n.target == "clamp_min"]
    assert len(clamps) == 1
    plans = [n.target.plan for g in graphs for n in g.graph.nodes if hasattr(n.target, "plan")]
    assert len(plans) == 3 and all(p.bias_fill == KERNEL_SAFE_FILL for p in plans)


@settings(deadline=None)
@given(L=st.integers(1, 5), S=st.integers(1, 7), layers=st.integers(2, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), grad=st.booleans(), dead=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_shared_mask_gives_the_originals_values(L, S, layers, dtype, grad, dead, seed):
    """Forward and backward equal the original's for any lengths, dtypes and padding, rows without keys included
    (in fp16, where the sum is upcast after the addition, such a row is uniform only in fp16's arithmetic: the
    site's own ops run that call)."""
    args = inputs(L=L, S=S, dtype=dtype, grad=grad, dead=(1,) if dead else (), seed=seed)
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if grad:
        assert_fused_equal(SharedMaskLayers(layers), args, fused=layers, **tolerance)
    else:
        with torch.no_grad():
            assert_fused_equal(SharedMaskLayers(layers), args, fused=layers, **tolerance)


@pytest.mark.parametrize("grad", [False, True])
def test_a_mask_written_between_layers_is_read_as_written(grad):
    """An in-place edit of the shared mask between two layers: each layer reads the mask as it is then."""
    assert_fused_equal(SharedMaskLayers(3, write_between=True), inputs(grad=grad, dead=()), fused=3)


def test_many_models_in_one_process():
    """Models, shapes and calls one after another in one process, without a reset (a notebook, a sweep)."""
    for layers, (L, S) in ((2, (3, 5)), (3, (1, 9)), (2, (1, 10)), (3, (4, 4)), (2, (1, 11))):
        module = SharedMaskLayers(layers)
        optimized = attnfuse.optimize(SharedMaskLayers(layers))
        for seed in range(3):
            args = inputs(L=L, S=S, seed=seed)
            with torch.no_grad():
                expected, actual = module(*leaf_copies(args)), optimized(*leaf_copies(args))
            torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
        assert attnfuse.report(optimized).fused == layers


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_mask_on_cuda(dtype, grad):
    """On the fused CUDA kernels (cuDNN, flash, memory-efficient): the raised fill gives the original's rows, rows
    without keys included (bf16's ``finfo.min`` is raised; fp16's -65504 is already in range and left alone)."""
    args = tuple(t.cuda().requires_grad_(t.requires_grad) if t.is_floating_point() else t.cuda()
                 for t in inputs(B=4, H=4, L=33, S=70, d=64, dtype=dtype, grad=grad))
    assert_fused_equal(SharedMaskLayers(3), args, fused=3, atol=3e-2, rtol=3e-2)

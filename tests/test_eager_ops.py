"""Custom ``autograd.Function``s inside an optimized model (Dynamo's ``autograd_function_apply``) on the eager route:
the same values and gradients as the unrewritten model, and a training step's tensors freed by reference counting,
not held until Python's cycle collector runs (Bloom's GELU held every activation of a step that way)."""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from torch._subclasses import FakeTensor

import attnfuse
from attnfuse.eager_ops import apply_graph_pair, free_saved_tensors_eagerly
from tests.helpers import assert_fused_equal


class SavedInput(torch.autograd.Function):
    """Bloom's spelling: the input kept with ``save_for_backward``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


class StashedOnCtx(torch.autograd.Function):
    """A tensor and a number kept on ``ctx`` itself, two outputs, one of them not differentiable."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.y, ctx.scale = x.tanh(), scale
        positive = x > 0
        ctx.mark_non_differentiable(positive)
        return ctx.y * scale, positive

    @staticmethod
    def backward(ctx, grad, _):
        return grad * ctx.scale * (1 - ctx.y * ctx.y), None


class Block(torch.nn.Module):
    """Hand-written causal attention between two custom Functions."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = SavedInput.apply(self.qkv(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        L = x.shape[-2]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y, positive = StashedOnCtx.apply(scores.softmax(-1) @ v, 0.5)
        return self.out(y) + positive.to(y.dtype)


@contextlib.contextmanager
def cycle_collector_off():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensors_in_cycles() -> list[torch.Tensor]:
    """Tensors holding memory that only Python's cycle collector would free now (collected here); a compile's fake
    tensors, which hold none, are not counted."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [o for o in gc.garbage if issubclass(type(o), torch.Tensor)  # type(): dead weak proxies raise
                 and not issubclass(type(o), FakeTensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


@pytest.mark.parametrize("length", [5, 12])
def test_custom_functions_beside_a_site_stay_exact(length):
    torch.manual_seed(length)
    assert_fused_equal(Block(), (torch.randn(2, length, 16, requires_grad=True),), atol=1e-5)


def test_the_op_is_swapped_on_the_eager_route_only():
    """The eager route runs ``apply_graph_pair``; a graph without the op is left alone."""
    torch._dynamo.reset()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(Block(), backend=keep)(torch.randn(1, 4, 16, requires_grad=True))
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    original = [t for t in targets if getattr(t, "__name__", "") == "autograd_function_apply"]
    assert len(original) == 2, targets
    assert sum(free_saved_tensors_eagerly(gm) for gm in graphs) == 2
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(apply_graph_pair) == 2
    assert sum(free_saved_tensors_eagerly(gm) for gm in graphs) == 0


def test_training_steps_free_their_tensors_without_the_cycle_collector():
    """Many steps in one process, at two lengths: nothing of a step is left for the cycle collector (compiling
    leaves some, so both lengths are compiled first)."""
    torch._dynamo.reset()
    model = attnfuse.optimize(Block())
    for length in (6, 9):
        model(torch.randn(2, length, 16, requires_grad=True)).sum().backward()
    with cycle_collector_off():
        for length in (6, 6, 9, 6):
            x = torch.randn(2, length, 16, requires_grad=True)
            model(x).sum().backward()
        left = tensors_in_cycles()
    assert not left, [(tuple(t.shape), t.grad_fn) for t in left]
    assert attnfuse.report(model).fused == 1


def test_bloom_training_frees_each_step():
    """transformers' Bloom (its GELU is a custom Function in training mode): equal gradients, nothing left for the
    cycle collector after a step."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4,
                                      attn_implementation="eager")
    reference = transformers.BloomForCausalLM(config).train()
    optimized = attnfuse.optimize(transformers.BloomForCausalLM(config).train())
    optimized.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    optimized(ids, labels=ids).loss.backward()  # compiles (which leaves cycles of its own)
    optimized.zero_grad()
    with cycle_collector_off():
        for model in (reference, optimized):
            model(ids, labels=ids).loss.backward()
        left = tensors_in_cycles()
    assert not left, [(tuple(t.shape), t.grad_fn) for t in left]
    for (name, a), b in zip(optimized.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

"""Context parallel on the CPU: detection, and the refusals, inside PyTorch's own ``context_parallel`` on a
one-process gloo mesh. (Context parallel rings only CUDA kernels: on the CPU every rewritten call is refused,
so what runs here is the detection and the reasons; tests/test_context_parallel_multigpu.py runs the rings.)
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attnfuse
from attnfuse.context_parallel import ContextParallelError, context_parallel_active, feed_positions, refusal

context_parallel = pytest.importorskip("torch.distributed.tensor.experimental").context_parallel


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo mesh in this process (torch's context_parallel needs a process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


class Causal(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        scores = (q @ k.transpose(-1, -2) / 8).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v


class Padded(nn.Module):
    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-1, -2) / 8).masked_fill(~keep[:, None, None, :], float("-inf"))
        return scores.softmax(-1) @ v


class Model(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, *args):
        return self.attention(*args)


def qkv(n: int = 16) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return list(torch.randn(3, 2, 2, n, 8).unbind(0))


def test_detection_follows_torchs_context(mesh):
    tokens = torch.arange(16)[None]
    assert not context_parallel_active()
    with context_parallel(mesh, buffers=[tokens], buffer_seq_dims=[1]):
        assert context_parallel_active()
    assert not context_parallel_active()


def test_another_wrapper_of_sdpa_is_not_context_parallel(monkeypatch):
    """A library that wraps F.scaled_dot_product_attention for its own reasons leaves attnfuse's path alone."""
    plain = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: plain(*a, **k))
    assert not context_parallel_active()
    model = attnfuse.optimize(Model(Causal()))
    q, k, v = qkv()
    torch.testing.assert_close(model(q, k, v), Causal()(q, k, v))


def test_causal_site_on_the_cpu_is_refused_naming_it(mesh):
    model = attnfuse.optimize(Model(Causal()))
    q, k, v = qkv()
    expected = model(q, k, v)  # outside context parallel: fused as usual
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        with pytest.raises(ContextParallelError, match=r"site attention \(.*test_context_parallel.py:\d+\).*cpu"):
            model(q, k, v)
    torch.testing.assert_close(model(q, k, v), expected)  # and after it, as before


def test_masked_site_is_refused_for_its_mask(mesh):
    model = attnfuse.optimize(Model(Padded()))
    q, k, v = qkv()
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, :3] = False
    model(q, k, v, keep)
    with context_parallel(mesh, buffers=[q, k, v, keep], buffer_seq_dims=[2, 2, 2, 1]):
        with pytest.raises(ContextParallelError, match="site attention .*mask tensor"):
            model(q, k, v, keep)


def test_verify_is_refused_under_context_parallel(mesh):
    """The original attends within the shard: comparing against it would roll back every site."""
    model = attnfuse.optimize(Model(Causal()), verify=True)
    q, k, v = qkv()
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        with pytest.raises(ContextParallelError, match="verify=True"):
            model(q, k, v)


def test_refusal_reasons():
    """Every call property CP cannot ring has its reason; a causal CUDA-shaped call has none but the device."""
    from attnfuse.kernels.call import AttentionCall, CallFacts

    q, k, v = qkv()

    def call(**changes):
        fields = dict(q=q, k=k, v=v, keep=None, bias=None, causal="top_left", window=None, softcap=None, bias_fn=None,
                      scale=None, scale_value=0.125, dropout_p=0.0, fully_masked_rows="zero", needs_grad=False,
                      allowed=None, autotune=False, on_kernel=None, facts=CallFacts())
        return AttentionCall(**{**fields, **changes})

    assert "mask tensor" in refusal(call(keep=torch.ones(2, 1, 1, 16, dtype=torch.bool)))
    assert "bias tensor" in refusal(call(bias=torch.zeros(2, 1, 16, 16)))
    assert "positions" in refusal(call(bias_fn=lambda index: index[2] - index[3]))
    assert "softcap" in refusal(call(softcap=30.0))
    assert "sliding window" in refusal(call(window=4))
    assert "differ in length" in refusal(call(k=k[:, :, :8], v=v[:, :, :8], causal="bottom_right"))
    assert "cpu" in refusal(call())


def test_feed_positions_reaches_the_rotary_embedding():
    """The positions a hook feeds are the ones the model uses, also after the tensor is written in place."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 12))
    positions = (torch.arange(12) * 3)[None].clone()  # not the model's own 0..11
    expected = model(ids, position_ids=positions, use_cache=True).logits
    handle = feed_positions(model.model.rotary_emb, positions)
    optimized = attnfuse.optimize(model)
    torch.testing.assert_close(optimized(ids).logits, expected)
    positions.copy_(torch.arange(12)[None] * 2)
    torch.testing.assert_close(optimized(ids).logits, model.__class__.forward(model, ids, position_ids=positions,
                                                                             use_cache=True).logits)
    handle.remove()
    assert attnfuse.report(optimized).fused == 1


def test_bench_distributed_ratios():
    """The benchmark's summary: speed-up against one GPU at the longest length one GPU held, longest lengths."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_distributed

    runs = [dict(world=w, variant=v, seq=s, oom=oom, tokens_per_s=t) for w, v, s, oom, t in [
        (1, "attnfuse", 8, False, 100), (1, "attnfuse", 16, True, None), (2, "attnfuse", 8, False, 190),
        (2, "attnfuse", 16, False, 180), (1, "sdpa", 8, False, 95), (2, "sdpa", 8, False, 200)]]
    summary = bench_distributed.ratios(runs)
    assert summary["longest_seq"]["attnfuse"] == {1: 8, 2: 16}
    assert summary["speedup_vs_1gpu"]["attnfuse"] == {"seq": 8, 2: 1.9}
    assert summary["attnfuse_over_sdpa"] == {"1gpu/8": round(100 / 95, 3), "2gpu/8": 0.95}


def test_site_left_unfused_is_refused(mesh):
    """A site attnfuse skipped would run its own ops, attending within the shard: refused, naming it."""
    model = attnfuse.optimize(Model(Causal()), filter_fn=lambda module, name: name != "attention")
    q, k, v = qkv()
    model(q, k, v)
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        with pytest.raises(ContextParallelError, match="site attention .*left it unfused"):
            model(q, k, v)

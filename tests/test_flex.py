"""Score modifications: ALiBi, relative-position buckets, softcaps and sliding windows, fused on
FlexAttention (compiled forward on the CPU) and on SDPA / the unfused fallback with gradients."""
from __future__ import annotations

import copy

import pytest
import torch

import attnfuse
from helpers import assert_fused_equal
from score_modules import AlibiCausal, AlibiSymmetric, BucketBias, SoftcapWindow


def qkv(b=2, h=4, i=6, j=9, d=16, grad=True):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g).requires_grad_(grad) for n in (i, j, j))


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_alibi_causal_fused_with_position_bias(shape):
    i, j = shape
    report = assert_fused_equal(AlibiCausal(4), qkv(i=i, j=j))
    features = report.sites[0].features
    assert features["causal"] in ("top_left", "bottom_right") and features["score_functions"] == 1
    assert features["bias"] is None  # no n x n tensor is kept


def test_alibi_symmetric_becomes_a_position_function():
    report = assert_fused_equal(AlibiSymmetric(4), qkv(i=5, j=8))
    assert report.sites[0].features["score_functions"] == 1, str(report)


def test_bucketed_bias_stays_a_tensor():
    """T5-style log buckets round a float to an int; recomputing them in a kernel could move a bucket
    boundary, so the bias is kept as the tensor the original computes."""
    report = assert_fused_equal(BucketBias(4), qkv(i=5, j=8))
    features = report.sites[0].features
    assert features["score_functions"] is None and features["bias"] == "(4, 5, 8)", str(report)


@pytest.mark.parametrize("shape", [(6, 9), (8, 8)])
def test_softcap_and_sliding_window_recognized_and_equal(shape):
    i, j = shape
    report = assert_fused_equal(SoftcapWindow(cap=20.0, window=3), qkv(i=i, j=j))
    features = report.sites[0].features
    assert features["softcap"] == pytest.approx(20.0)
    assert features["window"] == 3 and features["causal"] in ("top_left", "bottom_right")
    assert report.sites[0].backend == "unfused math"  # CPU with gradients: no FlexAttention backward here


@pytest.mark.parametrize("module", [AlibiCausal(4), SoftcapWindow(cap=10.0, window=4)], ids=["alibi", "softcap_window"])
def test_flex_compiled_forward_on_cpu_matches(module):
    """FlexAttention's compiled CPU forward (kernels=['flex']) against the unrewritten module."""
    torch._dynamo.reset()
    reference = copy.deepcopy(module)
    model = attnfuse.optimize(module, kernels=["flex"])
    q, k, v = qkv(i=6, j=9, grad=False)
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), reference(q, k, v), atol=2e-5, rtol=1e-4)
    site = attnfuse.report(model).sites[0]
    assert site.status == "fused" and site.backend == "flex"


def test_forcing_flex_with_cpu_gradients_says_what_to_do():
    torch._dynamo.reset()
    model = attnfuse.optimize(AlibiCausal(4), kernels=["flex"])
    with pytest.raises(Exception, match="no .*backward on the CPU"):
        model(*qkv())


def test_flex_out_of_shared_memory_retries_with_one_stage(monkeypatch):
    """A Flex compile that runs out of shared memory is retried once with one pipeline stage, remembered for the
    signature; a retry that fails too is a failure like any other (forced here: raised; else handed on)."""
    import attnfuse.kernels.flex as flex

    attnfuse.reset()
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    seen = []

    def fake(call, kernel_options=None):
        seen.append(kernel_options)
        if kernel_options is None:
            raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource: Required: 245760")
        return torch.zeros_like(call.q)

    monkeypatch.setattr(flex, "flex_attend", fake)
    calls = []
    with torch.no_grad():
        attnfuse.attend(q, k, v, softcap=5.0, kernels=["flex"], on_kernel=calls.append)
        attnfuse.attend(q, k, v, softcap=5.0, kernels=["flex"], on_kernel=calls.append)
    assert seen == [None, flex._FEWER_STAGES, flex._FEWER_STAGES] and calls == ["flex", "flex"]

    def always_fails(call, kernel_options=None):
        raise RuntimeError(f"out of resource: shared memory (options {kernel_options})")

    attnfuse.reset()
    monkeypatch.setattr(flex, "flex_attend", always_fails)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"options \{'num_stages': 1\}"):
        attnfuse.attend(q, k, v, softcap=5.0, kernels=["flex"])

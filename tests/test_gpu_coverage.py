"""GPU: the second coverage round's real models, fused on CUDA in bf16, against the same model unfused.

Tiny transformers configs (``benchmarks/coverage_transformers.py``), a left-padded batch (rows with no key:
the per-call paths of ``attnfuse.added_masks``), forward and parameter gradients. The fused model's error
against an fp32 run of the original must stay within what the original's own bf16 run shows.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import attnfuse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

pytestmark = [pytest.mark.gpu, pytest.mark.models]

ARCHITECTURES = ["llama", "mistral", "gemma2", "qwen2", "bloom", "gpt_neo", "xglm", "openai-gpt", "deberta-v2", "opt"]


def _run(model: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    import coverage_transformers as ct

    logits, grads = ct._forward_backward(model, kwargs)
    return logits.float(), [g.float() for g in grads]


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "all-ones mask"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_two_models_fused_on_cuda_bf16(arch, padded):
    """Also with an all-ones ``attention_mask``, where sites whose mask is only padding and structure run without
    it (``attnfuse.unpadded``)."""
    import coverage_transformers as ct

    torch._dynamo.reset()
    reference = ct.build(arch).cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in ct.inputs(reference).items()}
    if not padded:
        kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
    expected, expected_grads = _run(reference, kwargs)
    eager, eager_grads = _run(ct.build(arch).cuda().to(torch.bfloat16), kwargs)
    fused_model = attnfuse.optimize(ct.build(arch).cuda().to(torch.bfloat16), verify=False)
    fused, fused_grads = _run(fused_model, kwargs)
    report = attnfuse.report(fused_model)
    assert report.fused >= 1 and report.skipped == 0, str(report)
    assert _error(fused, expected) <= 2 * _error(eager, expected) + 2e-2, str(report)
    for f, e, r in zip(fused_grads, eager_grads, expected_grads):
        if r.abs().max() > 0:
            assert _error(f, r) <= 2 * _error(e, r) + 5e-2, str(report)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_padded_window_inference_on_cuda_bf16(arch):
    """Inference of a left-padded batch: sliding-window layers run as the window plus a key-padding mask (rows
    without keys written back as the mean of v), within the original bf16 run's own error of fp32."""
    import coverage_transformers as ct

    torch._dynamo.reset()
    reference = ct.build(arch).cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in ct.inputs(reference).items()}
    kwargs.pop("labels", None)
    with torch.no_grad():
        expected = reference(**kwargs).logits.float()
        eager = ct.build(arch).cuda().to(torch.bfloat16)(**kwargs).logits.float()
        fused_model = attnfuse.optimize(ct.build(arch).cuda().to(torch.bfloat16), verify=False)
        fused = fused_model(**kwargs).logits.float()
    report = attnfuse.report(fused_model)
    windowed = [s for s in report.sites if s.features.get("window") is not None]
    assert windowed and all((s.features.get("mask") or "").startswith("key padding") for s in windowed), str(report)
    assert _error(fused, expected) <= 2 * _error(eager, expected) + 2e-2, str(report)

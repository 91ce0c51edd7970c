"""transformers models whose scores carry softcaps, sliding windows or ALiBi, in eager mode: every
attention layer fused (windows and softcaps recognized), outputs and gradients equal."""
from __future__ import annotations

import copy

import pytest
import torch

import attnfuse

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


def _build(name: str):
    torch.manual_seed(0)
    if name == "gemma2":
        config = transformers.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=4, attn_implementation="eager")
        return transformers.Gemma2Model(config)
    if name == "mistral":
        config = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                            attn_implementation="eager")
        return transformers.MistralModel(config)
    config = transformers.MptConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, attn_implementation="eager")
    return transformers.MptModel(config)


@pytest.mark.parametrize("name, expect", [
    ("gemma2", {"softcap": 50.0, "window": 4}),
    ("mistral", {"window": 4}),
    ("mpt", {"causal": "top_left", "score_functions": 1, "bias": None}),
])
def test_score_modified_models_fused_and_equal(name, expect):
    torch._dynamo.reset()
    model = _build(name).eval()
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 100, (2, 9))
    attnfuse.optimize(model)
    out, ref = model(tokens).last_hidden_state, reference(tokens).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    report = attnfuse.report(model)
    assert report.fused == 2 and report.skipped == 0, str(report)
    first = report.sites[0].features
    for key, value in expect.items():
        assert first[key] == value, str(report)
    weight = torch.randn_like(out)
    g_out = torch.autograd.grad((out * weight).sum(), list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad((ref * weight).sum(), list(reference.parameters()), allow_unused=True)
    for a, b in zip(g_out, g_ref):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)

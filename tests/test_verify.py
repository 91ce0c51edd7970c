"""verify: the same random state for the original and the rewritten run, derived inputs that break the
original prove nothing, a rewrite that raises is rolled back, and the check runs once per model."""
from __future__ import annotations

import copy

import torch
from torch import nn

import attnfuse
from seed_modules import PaddingStyle


class NoisyAttention(nn.Module):
    """A flow-matching style training wrapper: noise drawn inside the forward, then attention."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        t = torch.rand(x.shape[0], 1, 1)
        x = (1 - t) * x + t * torch.randn_like(x)
        b, n, _ = x.shape
        q, k, v = (y.reshape(b, n, self.heads, -1).transpose(1, 2) for y in self.to_qkv(x).chunk(3, dim=-1))
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return weights @ v + torch.randn_like(v) * 0.1


def test_verify_compares_graphs_that_draw_noise_under_the_same_random_state():
    model = NoisyAttention()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 5, 16)
    torch.manual_seed(7)
    expected = reference(x)
    after_reference = torch.get_rng_state()
    report = attnfuse.audit(copy.deepcopy(model), x)
    assert report.fused == 1 and report.sites[0].reason is None, str(report)
    attnfuse.optimize(model, verify=True)
    torch.manual_seed(7)
    actual = model(x)
    site = attnfuse.report(model).sites[0]
    assert site.status == "fused" and site.reason is None, str(attnfuse.report(model))
    # the check rewinds the generator, so the call advances it exactly as one original call does
    assert torch.equal(torch.get_rng_state(), after_reference)
    torch.testing.assert_close(actual, expected)


class LoudOutput(nn.Module):
    """Attention whose output goes through ``exp(20 x)``: finite on the real inputs, inf once they are
    scaled by 4 (an audio model's large activations)."""

    def forward(self, q, k, v):
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return torch.exp(20 * (weights @ v))


def test_a_derived_input_that_overflows_the_original_does_not_roll_back():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    v = v.clamp(-2, 2)
    model = LoudOutput()
    expected = model(q, k, v)
    assert torch.isfinite(expected).all() and not torch.isfinite(model(q * 4, k * 4, v * 4)).all()
    report = attnfuse.audit(model, q, k, v)
    assert report.fused == 1 and report.sites[0].reason is None, str(report)
    torch.testing.assert_close(attnfuse.optimize(model, verify=True)(q, k, v), expected, rtol=1e-4, atol=1e-5)
    assert attnfuse.report(model).fused == 1


def test_a_derived_input_still_catches_a_rewrite_wrong_only_there(monkeypatch):
    """Dropping derived inputs that break the original must not drop the ones that do not."""
    import attnfuse.lower as lower

    real = lower.run_site

    def wrong_on_large_inputs(plan, *tensors):
        out = real(plan, *tensors)
        return out * 1.5 if out.abs().max() > 6 else out

    monkeypatch.setattr(lower, "run_site", wrong_on_large_inputs)
    q, k, v = (torch.randn(1, 2, 4, 8).clamp(-2, 2) for _ in range(3))
    report = attnfuse.audit(PaddingStyle().eval(), q, k, v)
    assert report.fused == 0 and "inputs scaled by 4" in report.sites[0].reason, str(report)


def test_a_rewrite_that_raises_is_rolled_back_not_a_crash(monkeypatch):
    import attnfuse.lower as lower

    def broken(plan, *tensors):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(lower, "run_site", broken)
    model = PaddingStyle().eval()
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    expected = copy.deepcopy(model)(q, k, v)
    torch.testing.assert_close(attnfuse.optimize(model, verify=True)(q, k, v), expected)
    site = attnfuse.report(model).sites[0]
    assert site.status == "skipped" and site.reason.startswith("verify: output differed"), site.reason


def test_verify_runs_for_each_model_and_a_rollback_holds_for_all_that_share_the_graph(monkeypatch):
    """Models of one class share a compiled graph; each verifying model checks it on its own first
    call, and a rollback found by one is what every model sharing the graph runs and reports."""
    import attnfuse.lower as lower

    real = lower.run_site

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    first, second, third = (PaddingStyle().eval() for _ in range(3))
    expected = first(q, k, v)
    attnfuse.optimize(first, verify=True)
    attnfuse.optimize(second, verify=True)
    attnfuse.optimize(third)
    torch.testing.assert_close(first(q, k, v), expected)
    monkeypatch.setattr(lower, "run_site", lambda plan, *tensors: real(plan, *tensors) * 1.5)  # from now on
    torch.testing.assert_close(second(q, k, v), expected)
    torch.testing.assert_close(third(q, k, v), expected)
    for model in (first, second, third):
        site = attnfuse.report(model).sites[0]
        assert site.status == "skipped" and site.reason.startswith("verify: output differed"), site.reason

"""The public surface: optimize in place, audit without side effects, reports, errors, verify, backends."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import attnfuse
from helpers import assert_fused_equal
from seed_modules import MegabyteStyle, PaddingStyle


class TinyBlock(nn.Module):
    """Projections around a seed-style attention, so the model has parameters and a module path."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.attend = MegabyteStyle(causal=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = self.attend(q, k, v)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


def test_optimize_returns_the_same_module_with_the_same_state():
    model = TinyBlock()
    keys = list(model.state_dict())
    params = [p.data_ptr() for p in model.parameters()]
    assert attnfuse.optimize(model) is model
    assert list(model.state_dict()) == keys
    assert [p.data_ptr() for p in model.parameters()] == params


def test_optimized_block_matches_and_reports_module_path():
    report = assert_fused_equal(TinyBlock(), (torch.randn(2, 5, 16, requires_grad=True),))
    site = report.sites[0]
    assert site.name == "TinyBlock.attend"
    lines, start = inspect.getsourcelines(MegabyteStyle.forward)
    softmax_line = start + next(i for i, line in enumerate(lines) if "softmax" in line)
    assert site.source.endswith(f"seed_modules.py:{softmax_line}")
    assert site.features["causal"] == "top_left"


def test_audit_shape_and_no_side_effect():
    model = TinyBlock()
    report = attnfuse.audit(model, torch.randn(1, 4, 16))
    assert model._compiled_call_impl is None
    d = report.to_dict()
    assert set(d) == {"fused", "skipped", "already_fused", "sites", "notes", "timings"} and d["fused"] == 1 and \
        d["skipped"] == 0
    assert set(d["sites"][0]) == {"name", "source", "status", "reason", "features", "backend"}
    assert d["sites"][0]["status"] == "fused" and d["sites"][0]["backend"] in ("cpu-flash", "cpu-math")
    text = str(report)
    assert "TinyBlock.attend" in text and "fused" in text and "causal" in text


class LinearSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x).softmax(dim=-1)


def test_model_without_attention_runs_unchanged_and_says_so():
    model = LinearSoftmax()
    x = torch.randn(3, 4)
    report = attnfuse.audit(model, x)
    data = report.to_dict()
    data.pop("timings")  # what the first call cost (tests/test_first_call.py)
    assert data == {"fused": 0, "skipped": 0, "already_fused": 0, "sites": [], "notes": []}
    assert "no attention found" in str(report)
    expected = model(x)
    torch.testing.assert_close(attnfuse.optimize(model)(x), expected)


def test_bad_input_gets_errors_that_say_what_to_do_and_leaves_the_model_alone():
    model = TinyBlock()
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        attnfuse.optimize(lambda x: x)
    with pytest.raises(TypeError, match="valid options are"):
        attnfuse.optimize(model, fast=True)
    with pytest.raises(ValueError, match="choose from"):
        attnfuse.optimize(model, kernels=["magic"])
    with pytest.raises(ValueError, match="compiler must be"):
        attnfuse.optimize(model, compiler="tvm")
    assert model._compiled_call_impl is None
    with pytest.raises(ValueError, match="not passed to attnfuse.optimize"):
        attnfuse.report(model)


def test_graph_breaks_and_train_eval_switches():
    class Chatty(nn.Module):
        def __init__(self):
            super().__init__()
            self.attend = MegabyteStyle(causal=True, dropout=0.3)

        def forward(self, q, k, v):
            print("a graph break", end="\r")
            return self.attend(q, k, v)

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    model = Chatty()
    expected = copy.deepcopy(model).eval()(q, k, v)
    attnfuse.optimize(model)
    model.train()
    assert not torch.allclose(model(q, k, v), expected, atol=1e-4)
    model.eval()
    torch.testing.assert_close(model(q, k, v), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), expected)
    with torch.inference_mode():
        torch.testing.assert_close(model(q, k, v), expected)


def test_verify_rolls_back_a_wrong_rewrite(monkeypatch):
    import attnfuse.lower as lower

    real = lower.run_site
    monkeypatch.setattr(lower, "run_site", lambda plan, *t: real(plan, *t) * 1.5)
    model = PaddingStyle().eval()
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    expected = copy.deepcopy(model)(q, k, v)
    attnfuse.optimize(model, verify=True)
    torch.testing.assert_close(model(q, k, v), expected)
    torch.testing.assert_close(model(q, k, v), expected)
    site = attnfuse.report(model).sites[0]
    assert site.status == "skipped" and site.reason.startswith("verify: output differed")


def test_verify_catches_a_rewrite_wrong_only_on_fully_masked_rows(monkeypatch):
    """The real inputs mask no whole row; verify's derived input (first row all masked) exposes it."""
    import sys

    monkeypatch.setattr(sys.modules["attnfuse.kernels.rows"], "restore_fully_masked_rows", lambda out, v, dead, mode: out)
    monkeypatch.setattr(sys.modules["attnfuse.kernels.sdpa"], "unread_rows_without_keys", lambda *args: (None, None))
    monkeypatch.setattr(sys.modules["attnfuse.kernels.sdpa"], "keep_rows_without_keys", lambda *args: None)
    model = PaddingStyle().eval()
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    mask = torch.ones(2, 4, dtype=torch.bool)
    expected = copy.deepcopy(model)(q, k, v, mask)
    attnfuse.optimize(model, verify=True)
    torch.testing.assert_close(model(q, k, v, mask), expected)
    site = attnfuse.report(model).sites[0]
    assert site.status == "skipped" and "every key of one row masked" in site.reason, site.reason


def test_verify_keeps_a_correct_rewrite():
    report = assert_fused_equal(PaddingStyle().eval(), tuple(torch.randn(2, 2, 4, 8) for _ in range(3)),
                                verify=True)
    assert report.sites[0].reason is None


def test_string_backend_is_registered_by_entry_point():
    from torch._dynamo import lookup_backend

    from attnfuse.capture import attnfuse_backend

    assert lookup_backend("attnfuse") is attnfuse_backend


def test_autotune_times_kernels_once_per_signature_and_stays_exact():
    from attnfuse.kernels.autotune import winners

    before = len(winners())
    report = assert_fused_equal(PaddingStyle().eval(), (*(torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3)),
                                                        torch.rand(2, 6) > 0.3), autotune=True)
    assert len(winners()) > before
    assert report.sites[0].backend in ("cpu-flash", "cpu-math")

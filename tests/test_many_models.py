"""Many models in one process: optimize and audit keep working (no Dynamo reset between models), every
report is right, and whatever Dynamo did not hand to the pass is said in the report, never hidden."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import attnfuse
from attnfuse.capture import NO_GRAPH_RAN


class Projected(nn.Module):
    """q, k, v projections around an ``attend`` that subclasses spell differently."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * self.head_dim * self.kv_heads)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, heads, -1).transpose(1, 2)

    def forward(self, x, *extra):
        q = self.split(self.to_q(x), self.heads)
        k, v = (self.split(t, self.kv_heads) for t in self.to_kv(x).chunk(2, dim=-1))
        out = self.attend(q, k, v, *extra)
        return self.out(out.transpose(1, 2).reshape(x.shape))


class CausalTriu(Projected):
    def attend(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        L, S = scores.shape[-2:]
        future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


class KeyPadding(Projected):
    def attend(self, q, k, v, keep):
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * self.head_dim ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v)


class AdditiveBias(Projected):
    def attend(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5 + bias
        return torch.matmul(nn.functional.softmax(scores, dim=-1), v)


class GroupedQuery(Projected):
    def attend(self, q, k, v):
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ v


class TwoLayers(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList([CausalTriu(dim, heads), CausalTriu(dim, heads)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class FeedForward(nn.Module):
    """No attention: a classifier head whose softmax feeds no product."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.net(x).softmax(dim=-1)


@dataclass
class Kind:
    make: Callable[[int, int], nn.Module]
    extra: Callable[[int, int, int], tuple]
    sites: int


def _padding(b: int, n: int, heads: int) -> tuple:
    keep = torch.rand(b, n) > 0.3
    keep[:, 0] = True
    return (keep,)


KINDS = {
    "causal": Kind(CausalTriu, lambda b, n, h: (), 1),
    "padding": Kind(KeyPadding, _padding, 1),
    "bias": Kind(AdditiveBias, lambda b, n, h: (torch.randn(b, h, n, n),), 1),
    "gqa": Kind(lambda dim, heads: GroupedQuery(dim, heads, kv_heads=heads // 2), lambda b, n, h: (), 1),
    "two_layers": Kind(TwoLayers, lambda b, n, h: (), 2),
    "no_attention": Kind(FeedForward, lambda b, n, h: (), 0),
}
SHAPES = [(2, 5), (1, 7), (3, 4)]
CONFIGS = [(16, 2), (16, 4), (24, 4)]


def _inputs(kind: Kind, b: int, n: int, dim: int, heads: int) -> tuple:
    return (torch.randn(b, n, dim), *kind.extra(b, n, heads))


def _check_report(report: attnfuse.FusionReport, kind: Kind, what: str) -> None:
    assert report.fused == kind.sites and report.skipped == 0, f"{what}\n{report}"
    assert not report.notes, f"{what}\n{report}"
    assert ("no attention found" in str(report)) == (kind.sites == 0), f"{what}\n{report}"


def test_optimize_and_audit_many_models_in_one_process():
    """Over 100 models optimized and over 100 audited, 20 per class: each class far past Dynamo's
    recompile limit of 8 for one ``forward``, three configurations and three input shapes each."""
    torch.manual_seed(0)
    optimized = audited = 0
    for index in range(20):
        for name, kind in KINDS.items():
            dim, heads = CONFIGS[index % len(CONFIGS)]
            model = kind.make(dim, heads).eval()
            reference = copy.deepcopy(model)
            what = f"model {index} of {name}, dim {dim}, heads {heads}"
            shapes = SHAPES if index < 4 else SHAPES[index % 3:index % 3 + 1]
            b, n = shapes[0]
            _check_report(attnfuse.audit(model, *_inputs(kind, b, n, dim, heads)), kind, f"audit of {what}")
            audited += 1
            attnfuse.optimize(model, verify=index % 5 == 1)
            for b, n in shapes:
                args = _inputs(kind, b, n, dim, heads)
                with torch.no_grad():
                    torch.testing.assert_close(model(*args), reference(*args), atol=2e-5, rtol=1e-4,
                                               msg=lambda m: f"{what}, shape {(b, n)}: {m}")
            _check_report(attnfuse.report(model), kind, f"optimize of {what}")
            optimized += 1
    assert optimized >= 100 and audited >= 100


def test_gradients_and_string_backend_among_many_models():
    """Models sharing compiled graphs still give their own gradients; ``backend="attnfuse"`` coexists."""
    torch.manual_seed(1)
    for index in range(12):
        model = CausalTriu(16, 2)
        reference = copy.deepcopy(model)
        x = torch.randn(2, 5, 16, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        if index % 4 == 3:
            compiled = torch.compile(model, backend="attnfuse", options={"compiler": "eager"})
        else:
            compiled = attnfuse.optimize(model)
        compiled(x).square().sum().backward()
        reference(x_ref).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4)
        if compiled is model:
            _check_report(attnfuse.report(model), KINDS["causal"], f"model {index}")


@pytest.mark.parametrize("compile_takes_a_limit", [True, False])
def test_a_dynamo_recompile_limit_is_reported_not_hidden(monkeypatch, compile_takes_a_limit):
    """Past the limit Dynamo runs the model eagerly; the report says so instead of "no attention found".
    (Both ways of scoping the limit: ``torch.compile(recompile_limit=)``, and the config set per call.)"""
    import attnfuse.capture as capture

    if compile_takes_a_limit and not capture._COMPILE_TAKES_A_LIMIT:
        pytest.skip("this torch.compile takes no recompile_limit")
    monkeypatch.setattr(capture, "_COMPILE_TAKES_A_LIMIT", compile_takes_a_limit)
    monkeypatch.setattr(capture, "RECOMPILE_LIMIT", 2)
    torch.manual_seed(2)
    with torch._dynamo.config.patch(recompile_limit=2):
        reports = []
        for heads in (1, 2, 4, 8):  # each head count is a new guard on ``self.heads``: a recompile
            model = CausalTriu(16, heads).eval()
            x = torch.randn(1, 4, 16)
            expected = copy.deepcopy(model)(x)
            torch.testing.assert_close(attnfuse.optimize(model)(x), expected)
            reports.append(attnfuse.report(model))
        assert torch._dynamo.config.recompile_limit == 2
    assert [r.fused for r in reports[:2]] == [1, 1]
    for late in reports[2:]:
        assert late.fused == 0 and late.notes and "no attention found" not in str(late), str(late)
        assert any("recompile limit" in note for note in late.notes), late.notes
        assert late.to_dict()["notes"] == late.notes
    assert any(note.startswith("Dynamo stopped compiling") for note in reports[2].notes), reports[2].notes
    assert NO_GRAPH_RAN in reports[3].notes
    assert "note: Dynamo's recompile limit is reached for forward" in str(reports[3])


def test_the_recompile_limit_is_raised_for_attnfuse_only():
    """Twelve configurations of one class (a static guard each) all fuse; Dynamo's global limit is untouched."""
    torch.manual_seed(3)
    for heads, dim in [(h, d) for h in (1, 2, 4, 8) for d in (16, 32, 64)]:
        model = CausalTriu(dim, heads).eval()
        x = torch.randn(1, 3, dim)
        expected = copy.deepcopy(model)(x)
        torch.testing.assert_close(attnfuse.optimize(model)(x), expected)
        _check_report(attnfuse.report(model), KINDS["causal"], f"heads {heads}, dim {dim}")
    assert torch._dynamo.config.recompile_limit == 8



def test_python_floats_are_specialized_during_the_call_only():
    """Dynamo's ``specialize_float`` is on while an optimized model runs (a float attribute stays a constant the
    matcher can read), back off afterwards, and left on where the user turned it on."""
    seen = []

    @torch._dynamo.disable
    def look() -> None:
        seen.append(torch._dynamo.config.specialize_float)

    class Softmax(nn.Module):
        def forward(self, x):
            look()
            return x.softmax(-1)

    model = attnfuse.optimize(Softmax())
    x = torch.randn(2, 3)
    for _ in range(2):
        torch.testing.assert_close(model(x), x.softmax(-1))
    assert seen == [True, True] and torch._dynamo.config.specialize_float is False
    with torch._dynamo.config.patch(specialize_float=True):
        model(x)
        assert torch._dynamo.config.specialize_float is True
    assert seen[-1] is True and torch._dynamo.config.specialize_float is False

def test_a_graph_break_between_the_products_is_reported():
    class Chatty(nn.Module):
        def forward(self, q, k, v):
            weights = (q @ k.transpose(-1, -2)).softmax(dim=-1)
            print("inspecting the weights", end="\r")
            return weights @ v

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    report = attnfuse.audit(Chatty(), q, k, v)
    assert report.fused == 0 and "no attention found" not in str(report), str(report)
    assert any("graph break" in note and "print" in note for note in report.notes), report.notes


def test_models_dynamo_never_hands_to_the_pass_are_reported():
    """A disabled forward and a container of torch.nn modules (Dynamo skips both frames) run no graph."""

    class Disabled(nn.Module):
        @torch.compiler.disable
        def forward(self, q, k, v):
            return (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    report = attnfuse.audit(Disabled(), q, k, v)
    assert report.notes == [NO_GRAPH_RAN] and "no attention found" not in str(report), str(report)
    builtins = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1))
    assert attnfuse.audit(builtins, q).notes == [NO_GRAPH_RAN]


def test_a_subclass_sharing_a_compiled_forward_gets_its_own_report_names():
    class Renamed(CausalTriu):
        pass

    x = torch.randn(1, 4, 16)
    first = attnfuse.optimize(CausalTriu(16, 2).eval())
    second = attnfuse.optimize(Renamed(16, 2).eval())
    first(x), second(x)
    assert [s.name for s in attnfuse.report(first).sites] == ["CausalTriu"]
    assert [s.name for s in attnfuse.report(second).sites] == ["Renamed"]

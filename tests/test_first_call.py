"""What the first call cost: ``report.timings`` has every phase, per graph and summed, within the call's wall
time; it shows in ``str(report)`` as one line and in ``to_dict()``. No timing thresholds: only accounting."""
from __future__ import annotations

import json
import time
from dataclasses import fields

import torch
from torch import nn

import attnfuse
from attnfuse import logs
from seed_modules import MegabyteStyle, PaddingStyle

PHASES = ("capture", "copy", "effects", "canonicalize", "matching", "lowering", "compile", "first_run", "verification")


class Layer(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, padded: bool = False):
        super().__init__()
        self.heads, self.padded = heads, padded
        self.to_qkv, self.out = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.attend = PaddingStyle() if padded else MegabyteStyle(causal=True)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = self.attend(q, k, v, mask=mask) if self.padded else self.attend(q, k, v)
        return x + self.out(out.transpose(1, 2).reshape(b, n, -1))


class Half(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(padded=i % 2 == 1) for i in range(layers))

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Stack(nn.Module):
    """Layers of two kinds in two halves; ``graph_break`` splits the forward between them (two graphs)."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.first, self.second = Half(2), Half(2)
        self.graph_break = graph_break

    def forward(self, x, mask):
        x = self.first(x, mask)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.second(x, mask)


def _inputs(n: int = 6):
    return torch.randn(2, n, 16), torch.rand(2, n) > 0.3


def _timed_first_call(model: nn.Module, *args) -> float:
    started = time.perf_counter()
    model(*args)
    return time.perf_counter() - started


def _assert_accounted(timings: logs.ModelTimings, wall: float, graphs: int) -> None:
    assert len(timings.graphs) == graphs
    for graph in timings.graphs:
        assert [f.name for f in fields(graph)] == list(PHASES)
        for phase in PHASES:
            value = getattr(graph, phase)
            assert value is not None and value >= 0.0, (phase, value)
    total = timings.total
    for phase in PHASES:
        assert abs(getattr(total, phase) - sum(getattr(g, phase) for g in timings.graphs)) < 1e-9
    assert total.total <= wall
    assert abs(timings.attnfuse_own - sum(g.attnfuse_own for g in timings.graphs)) < 1e-9
    assert timings.attnfuse_own_per_graph == max(g.attnfuse_own for g in timings.graphs)


def test_every_phase_of_the_first_call_is_reported_within_its_wall_time():
    torch._dynamo.reset()
    model = attnfuse.optimize(Stack())
    wall = _timed_first_call(model, *_inputs())
    report = attnfuse.report(model)
    assert report.fused == 4
    _assert_accounted(report.timings, wall, graphs=1)
    assert report.timings.graphs[0].verification == 0.0  # not asked for


def test_each_graph_of_a_model_split_by_a_graph_break_has_its_own_timings():
    torch._dynamo.reset()
    model = attnfuse.optimize(Stack(graph_break=True), verify=True)
    wall = _timed_first_call(model, *_inputs())
    report = attnfuse.report(model)
    assert report.fused == 4
    _assert_accounted(report.timings, wall, graphs=2)
    assert all(graph.verification > 0.0 for graph in report.timings.graphs)


def test_later_calls_add_nothing():
    torch._dynamo.reset()
    model = attnfuse.optimize(Stack())
    args = _inputs()
    model(*args)
    before = attnfuse.report(model).timings.to_dict()
    model(*args)
    assert attnfuse.report(model).timings.to_dict() == before


def test_a_graph_compiled_for_another_instance_costs_this_one_no_compile():
    torch._dynamo.reset()
    args = _inputs()
    first, second = attnfuse.optimize(Stack()), attnfuse.optimize(Stack())
    first(*args)
    wall = _timed_first_call(second, *args)
    timings = attnfuse.report(second).timings
    _assert_accounted(timings, wall, graphs=len(timings.graphs))
    if attnfuse.report(second).graphs[0] is attnfuse.report(first).graphs[0]:  # Dynamo shared the graph
        shared = timings.graphs[0]
        assert shared.capture == 0.0 and shared.attnfuse_own == 0.0 and shared.compile == 0.0


def test_timings_show_as_one_line_of_the_report_and_in_its_json():
    torch._dynamo.reset()
    model = attnfuse.optimize(Stack())
    model(*_inputs())
    report = attnfuse.report(model)
    lines = str(report).splitlines()
    timing_lines = [line for line in lines if line.startswith("first call: ")]
    assert len(timing_lines) == 1
    for name in ("Dynamo capture", "copy", "effects", "canonicalize", "matching", "lowering", "compile", "first run"):
        assert f"{name} " in timing_lines[0], timing_lines[0]
    assert "attnfuse's own" in timing_lines[0] and "1 graph;" in timing_lines[0]
    assert lines[0] == "attnfuse: 4 fused, 0 skipped"  # the table above it is unchanged
    data = json.loads(report.to_json())["timings"]
    assert set(data) == {"total", "attnfuse_own", "graphs"} and len(data["graphs"]) == 1
    assert set(data["total"]) == set(PHASES) and data["graphs"][0] == report.timings.graphs[0].to_dict()


def test_the_torch_compile_route_reports_timings_without_a_capture_phase():
    torch._dynamo.reset()
    backend = attnfuse.backend(compiler="eager")
    compiled = torch.compile(Stack(), backend=backend)
    compiled(*_inputs())
    timings = backend.report.timings
    assert len(timings.graphs) == 1
    graph = timings.graphs[0]
    assert graph.capture is None  # attnfuse does not see the call start on this route
    assert graph.attnfuse_own > 0.0 and graph.first_run > 0.0
    assert "Dynamo capture" not in str(timings)


def test_a_model_that_never_ran_has_no_timings():
    report = attnfuse.report(attnfuse.optimize(Stack()))
    assert report.timings.graphs == [] and report.timings.attnfuse_own == 0.0
    assert report.to_dict()["timings"]["graphs"] == []


class EmbedThenAttend(nn.Module):
    """A graph with no attention (before the break), then one with a site."""

    def __init__(self):
        super().__init__()
        self.embed, self.layer = nn.Linear(16, 16), Layer()

    def forward(self, x, mask):
        x = torch.relu(self.embed(x)).clone().mul_(2.0)  # an in-place write the pass would otherwise read
        torch._dynamo.graph_break()
        return self.layer(x, mask)


def test_a_graph_without_attention_runs_as_captured_and_costs_no_rewrite():
    torch._dynamo.reset()
    module = EmbedThenAttend()
    args = _inputs()
    expected = module(*args)
    model = attnfuse.optimize(module, verify=True)
    wall = _timed_first_call(model, *args)
    torch.testing.assert_close(model(*args), expected)
    report = attnfuse.report(model)
    assert report.fused == 1 and len(report.sites) == 1
    _assert_accounted(report.timings, wall, graphs=2)
    plain, attention = report.timings.graphs
    assert plain.copy == plain.lowering == 0.0  # nothing kept or rewritten; its outputs are read for masks only
    assert attention.attnfuse_own > 0.0 and attention.verification > 0.0

"""One spelling per operator: ``x.__eq__(0)`` (how torch 2.11 records ``x == 0`` on a sliced buffer) and
``x.__radd__(y)`` read as ``operator.eq(x, 0)`` and ``operator.add(y, x)``."""
import operator

import torch
from torch.fx import Graph

from attnfuse.canonical import normalize_dunder_methods


def test_dunder_methods_become_operators_with_reflected_arguments_swapped():
    graph = Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    eq = graph.call_method("__eq__", (x, 0))
    radd = graph.call_method("__radd__", (x, y))
    inv = graph.call_method("__invert__", (eq,))
    kept = graph.call_method("softmax", (x, -1))
    graph.output((eq, radd, inv, kept))
    normalize_dunder_methods(graph)
    assert (eq.op, eq.target, eq.args) == ("call_function", operator.eq, (x, 0))
    assert (radd.target, radd.args) == (operator.add, (y, x))
    assert inv.target is operator.invert and kept.op == "call_method"
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])
    out = module(a, b)
    assert torch.equal(out[0], a == 0) and torch.equal(out[1], b + a) and torch.equal(out[2], ~(a == 0))

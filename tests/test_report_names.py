"""The audit names each site's module as ``model.named_modules()`` does, and writes valid JSON."""
import functools
import json

import torch
from torch import nn

import attnfuse


class Attention(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph_break:
            torch._dynamo.graph_break()
        q = self.proj(x)
        return (q @ x.transpose(-1, -2) * 0.3).softmax(-1) @ x


class Block(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.attn = Attention(graph_break)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def passes_arguments_through(forward):
    """A decorator in the style of transformers' ``can_return_tuple``: ``self`` arrives in ``*args``."""
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    return wrapper


class Stack(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(graph_break) for _ in range(2)])
        self.extra = nn.Sequential(Block(graph_break))

    @passes_arguments_through
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.extra(x)


class ConfigLookup(nn.Module):
    """Attribute access through ``__getattr__`` as diffusers' ``ModelMixin`` does (Dynamo then reads
    children through ``__dict__['_modules']``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])
        self._config = {"scale": 1.0}

    def __getattr__(self, name: str):
        if name != "_config" and name in self.__dict__.get("_config", {}):
            return self._config[name]
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x) * self.scale


def _names(model: nn.Module, *inputs: torch.Tensor) -> list[str]:
    optimized = attnfuse.optimize(model)
    optimized(*inputs)
    return sorted(site.name for site in attnfuse.report(optimized).sites)


def test_names_follow_named_modules_through_decorated_forward():
    torch._dynamo.reset()
    names = _names(Stack(), torch.randn(2, 5, 8))
    expected = sorted(f"Stack.{n}" for n, m in Stack().named_modules() if isinstance(m, Attention))
    assert names == expected == ["Stack.extra.0.attn", "Stack.layers.0.attn", "Stack.layers.1.attn"]


def test_names_of_children_read_through_getattr():
    torch._dynamo.reset()
    assert _names(ConfigLookup(), torch.randn(2, 5, 8)) == ["ConfigLookup.blocks.0.attn"]


def test_graph_break_inside_a_submodule_keeps_its_path():
    """After a break inside ``Attention.forward`` Dynamo compiles the rest of it as a frame of its own,
    one graph for every instance: a row for each module that ran it."""
    torch._dynamo.reset()
    names = _names(Stack(graph_break=True), torch.randn(2, 5, 8))
    assert names == ["Stack.extra.0.attn", "Stack.layers.0.attn", "Stack.layers.1.attn"], names


def test_dynamic_sizes_are_named_and_json_is_valid():
    torch._dynamo.reset()

    class Causal(nn.Module):
        def forward(self, q, k, v):
            n = q.shape[-2]
            scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            keep = torch.ones(n, n, dtype=torch.bool)
            return (scores.masked_fill(~keep, float("-inf"))).softmax(-1) @ v

    model = attnfuse.optimize(Causal(), dynamic=True)
    for n in (5, 7):
        model(*(torch.randn(1, 2, n, 8) for _ in range(3)))
    report = attnfuse.report(model)
    text = str(report)
    assert "s0" not in text and "s1" not in text, text
    json.dumps(report.to_dict(), allow_nan=False)  # no -Infinity for a -inf fill


# ----------------------------------------------------------------------------- one compiled graph, many layers

class BrokenBlock(nn.Module):
    """A block whose ``forward`` starts with a graph break, as FSDP2's hooks break a model per layer: Dynamo
    compiles the rest of the first block's frame once and runs that graph for every block."""

    def __init__(self, keep_probabilities: bool = False) -> None:
        super().__init__()
        self.attn = Attention()
        self.keep_probabilities = keep_probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        if self.keep_probabilities:  # the probabilities are read twice: not an attention the pass may fuse
            probabilities = (x @ x.transpose(-1, -2)).softmax(-1)
            return x + probabilities @ x + probabilities.sum(-1, keepdim=True)
        return x + self.attn(x)


class BrokenStack(nn.Module):
    def __init__(self, layers: int = 4, keep_probabilities: bool = False, run: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([BrokenBlock(keep_probabilities) for _ in range(layers)])
        self.run = run or layers  # how many of the layers forward runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:self.run]:
            x = layer(x)
        return x


def _graphs_that_ran(report) -> int:
    return sum(1 for graph in report.graphs if graph.sites)


def test_one_graph_reused_by_every_layer_lists_every_layer():
    model = attnfuse.optimize(BrokenStack())
    x = torch.randn(2, 5, 8)
    for _ in range(3):
        model(x)
    report = attnfuse.report(model)
    # Dynamo reused a graph for several layers (layer 0 has its own: its input needs no grad, the others' do)
    assert _graphs_that_ran(report) == 2
    assert sorted(s.name for s in report.sites) == [f"BrokenStack.layers.{i}.attn" for i in range(4)]
    assert report.fused == 4 and report.skipped == 0 and report.to_dict()["fused"] == 4
    assert str(report).startswith("attnfuse: 4 fused, 0 skipped")


def test_skipped_sites_of_a_reused_graph_count_layers():
    model = attnfuse.optimize(BrokenStack(layers=3, keep_probabilities=True))
    model(torch.randn(2, 5, 8))
    report = attnfuse.report(model)
    assert report.fused == 0 and report.skipped == 3, str(report)
    assert sorted(s.name for s in report.sites) == [f"BrokenStack.layers.{i}" for i in range(3)]


def test_only_the_layers_that_ran_the_graph_are_listed():
    """Evidence, not the class: a layer of the same class that never ran is not in the report."""
    model = attnfuse.optimize(BrokenStack(layers=4, run=3))
    model(torch.randn(2, 5, 8))
    model(torch.randn(2, 5, 8))
    assert sorted(s.name for s in attnfuse.report(model).sites) == [f"BrokenStack.layers.{i}.attn" for i in range(3)]


def test_watching_the_layers_stops_after_a_call_that_saw_nothing_new():
    """The per-call cost: the stack is read only until a layer runs the graph again in a later call."""
    from attnfuse.capture import CompiledGraph

    graphs: list[CompiledGraph] = []
    original = CompiledGraph.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        graphs.append(self)

    CompiledGraph.__init__ = keep
    try:
        model = attnfuse.optimize(BrokenStack())
        model(torch.randn(2, 5, 8))
        with_sites = [g for g in graphs if g.sites.sites]
        assert with_sites and all(g.watching for g in with_sites)
        model(torch.randn(2, 5, 8))
        assert not any(g.watching for g in graphs)
    finally:
        CompiledGraph.__init__ = original


def test_identical_models_sharing_the_graph_each_list_their_own_layers():
    first, second = attnfuse.optimize(BrokenStack(layers=2)), attnfuse.optimize(BrokenStack(layers=3))
    x = torch.randn(2, 5, 8)
    first(x), second(x), first(x), second(x)
    assert sorted(s.name for s in attnfuse.report(first).sites) == ["BrokenStack.layers.0.attn",
                                                                    "BrokenStack.layers.1.attn"]
    assert attnfuse.report(second).fused == 3


def test_per_block_compile_with_a_model_backend_names_each_block():
    model = BrokenStack(layers=3)
    backend = attnfuse.backend(model, compiler="eager")
    for layer in model.layers:
        layer.compile(backend=backend)
    for _ in range(2):
        model(torch.randn(2, 5, 8))
    assert sorted(s.name for s in backend.report.sites) == [f"BrokenStack.layers.{i}.attn" for i in range(3)]


def test_per_block_compile_with_the_string_backend_counts_each_block():
    """Without a model the route cannot name a block's path: it labels the blocks of one class apart."""
    model = BrokenStack(layers=3)
    for layer in model.layers:
        layer.compile(backend="attnfuse", options={"compiler": "eager"})
    model(torch.randn(2, 5, 8))
    report = attnfuse.last_report()
    assert report.fused == 3
    assert sorted(s.name for s in report.sites) == [f"model.<BrokenBlock {i}>.attn" for i in range(3)]


def test_report_with_layers_still_pickles():
    import pickle

    model = attnfuse.optimize(BrokenStack(layers=2))
    model(torch.randn(2, 5, 8))
    clone = pickle.loads(pickle.dumps(attnfuse.report(model)))
    assert sorted(s.name for s in clone.sites) == ["BrokenStack.layers.0.attn", "BrokenStack.layers.1.attn"]

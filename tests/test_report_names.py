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
    one graph for every instance: the row names the modules that run it."""
    torch._dynamo.reset()
    names = _names(Stack(graph_break=True), torch.randn(2, 5, 8))
    assert names == ["Stack.{layers.*.attn, extra.*.attn}"], names


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

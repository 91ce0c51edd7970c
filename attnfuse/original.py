"""The original computation of a site, kept beside its fused call.

A rewrite may rely on a fact that holds for most calls but has to be checked on each one (a finite
fill acting as a mask depends on the scores' magnitude). When such a check fails, the fused node
runs the site's own ops instead: a copy of the subgraph from the fused call's inputs to the value
product, so the result is the original's by construction.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx import Node

from attnfuse.fx_utils import has_side_effect


class NoOriginal(Exception):
    """The site's original ops cannot be copied (they write in place)."""


def original_program(output: Node, inputs: Sequence[Node]) -> tuple[fx.GraphModule, list[Node]]:
    """A GraphModule computing ``output`` from ``inputs`` and the extra graph inputs it also needs.

    Returns the module and those extra nodes (placeholders the site reads beyond ``inputs``, such as
    symbolic sizes or a module buffer); the module takes ``(*inputs, *extras)``.
    """
    given = set(inputs)
    needed: set[Node] = set()
    extras: list[Node] = []
    pending = [output]
    while pending:
        node = pending.pop()
        if node in needed or node in given or node in extras:
            continue
        if node.op in ("placeholder", "get_attr"):
            extras.append(node)
            continue
        if has_side_effect(node):
            raise NoOriginal(f"`{node.name}` writes in place")
        needed.add(node)
        pending.extend(node.all_input_nodes)
    graph, env = fx.Graph(), {}
    for position, node in enumerate([*inputs, *extras]):
        if node not in env:
            env[node] = graph.placeholder(node.name)
        else:  # the same tensor given twice (q, k and v one projection): a placeholder of its own, unread
            graph.placeholder(f"{node.name}_again_{position}")
    order = {node: i for i, node in enumerate(output.graph.nodes)}
    for node in sorted(needed, key=order.__getitem__):
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(env[output])
    return fx.GraphModule(torch.nn.Module(), graph), extras

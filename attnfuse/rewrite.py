"""Rewrite: replace each matched site with one fused call and remove the nodes only it used.

Sites are matched before any is rewritten, so a site may read the output of another (chained
attention, ``attn(attn(q, k, v), k, v)``): when a site is rewritten its old output node is erased
and marked with the fused node that replaced it, and later sites read through that mark.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch.fx import GraphModule, Node

from attnfuse.effects import written_or_returned
from attnfuse.fx_utils import remove_dead_nodes
from attnfuse.lower import SitePlan, plan_for, site_function, site_inputs
from attnfuse.original import original_program
from attnfuse.site import AttentionSite

REPLACED_BY = "attnfuse_replaced_by"


def current(node: object) -> object:
    """``node``, or the fused node that replaced it if an earlier rewrite erased it."""
    while isinstance(node, Node) and REPLACED_BY in node.meta:
        node = node.meta[REPLACED_BY]
    return node


def _precedes_all(inputs: tuple, position: Node) -> bool:
    order = {node: i for i, node in enumerate(position.graph.nodes)}
    return all(order[node] < order[position] for node in inputs if isinstance(node, Node))


def rewrite_site(gm: GraphModule, site: AttentionSite, index: int,
                 kernels: Optional[tuple[str, ...]] = None, autotune: bool = False) -> SitePlan:
    """Insert ``attnfuse_site_<index>(q, k, v, ...)`` in place of the site's value product."""
    inputs = tuple(current(node) for node in site_inputs(site))
    if not _precedes_all(inputs, site.output):  # every input is an ancestor of the value product
        raise RuntimeError(f"attnfuse: an input of site {index} is defined after its value product")
    # kernels save their output for the backward pass, so one that may be written later is handed out fresh
    plan = plan_for(site, kernels, autotune, output_written=written_or_returned(site.output))
    if plan.needs_original:
        program, extras = original_program(site.output, inputs)
        plan = dataclasses.replace(plan, original=program, original_inputs=len(extras))
        inputs = (*inputs, *extras)
    graph = gm.graph
    with graph.inserting_before(site.output):
        fused = graph.call_function(site_function(plan, f"attnfuse_site_{index}"), inputs)
    fused.meta.update({key: value for key, value in site.output.meta.items() if not key.startswith("attnfuse")})
    site.output.replace_all_uses_with(fused)
    site.output.meta[REPLACED_BY] = fused
    remove_dead_nodes([site.output])
    return plan

"""Rewrite: replace each matched site with one fused call and remove the nodes only it used."""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch.fx import GraphModule

from attnfuse.canonical import remove_dead_nodes
from attnfuse.lower import SitePlan, plan_for, site_function, site_inputs
from attnfuse.original import original_program
from attnfuse.site import AttentionSite


def rewrite_site(gm: GraphModule, site: AttentionSite, index: int,
                 kernels: Optional[tuple[str, ...]] = None, autotune: bool = False) -> SitePlan:
    """Insert ``attnfuse_site_<index>(q, k, v, ...)`` in place of the site's value product."""
    plan = plan_for(site, kernels, autotune)
    inputs = site_inputs(site)
    if plan.needs_original:
        program, extras = original_program(site.output, inputs)
        plan = dataclasses.replace(plan, original=program, original_inputs=len(extras))
        inputs = (*inputs, *extras)
    graph = gm.graph
    with graph.inserting_before(site.output):
        fused = graph.call_function(site_function(plan, f"attnfuse_site_{index}"), inputs)
    fused.meta.update({key: value for key, value in site.output.meta.items() if not key.startswith("attnfuse")})
    site.output.replace_all_uses_with(fused)
    remove_dead_nodes([site.output])
    return plan

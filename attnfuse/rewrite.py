"""Rewrite: replace each matched site with one fused call and remove the nodes only it used."""
from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from attnfuse.lower import SitePlan, plan_for, site_function, site_inputs
from attnfuse.site import AttentionSite


def _remove_if_dead(node: Node) -> None:
    """Erase ``node`` and then its inputs, as long as nothing else reads them and they have no side effect."""
    pending = [node]
    while pending:
        current = pending.pop()
        if current.users or current.op in ("placeholder", "output", "get_attr") or current.is_impure():
            continue
        inputs = list(current.all_input_nodes)
        current.graph.erase_node(current)
        pending.extend(inputs)


def rewrite_site(gm: GraphModule, site: AttentionSite, index: int,
                 kernels: Optional[tuple[str, ...]] = None) -> SitePlan:
    """Insert ``attnfuse_site_<index>(q, k, v, ...)`` in place of the site's value product."""
    plan = plan_for(site, kernels)
    graph = gm.graph
    with graph.inserting_before(site.output):
        fused = graph.call_function(site_function(plan, f"attnfuse_site_{index}"), site_inputs(site))
    fused.meta.update({key: value for key, value in site.output.meta.items() if not key.startswith("attnfuse")})
    site.output.replace_all_uses_with(fused)
    _remove_if_dead(site.output)
    return plan

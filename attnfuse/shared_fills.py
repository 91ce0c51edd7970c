"""A ``0 / fill`` mask that several fused sites read, raised into the kernels' range once per graph call.

A site whose one bias holds only 0 and a fill below the fused kernels' range (transformers' ``finfo.min``
masks) raises that fill on each call without gradients (``kernels.rows.within_kernel_range``): one pass over
the mask, and on CUDA one kernel launch, in every layer. Where one mask node feeds several such sites, a single
``clamp_min`` node after it does that once for all of them, and their plans carry the raised fill.

The math is the original's: both fills lie below ``dominance.PROVEN_FILL``, so each absorbs every score it is
added to; rows that keep a key weigh the masked keys exactly 0 either way, and rows that keep none are uniform
either way, in the forward and in the gradients of the scores. Sites that read the bias's values on a call (checks,
the site's own ops, a run-time causal reading keyed by the tensor they are handed) are left as they are.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from torch.fx import GraphModule, Node

from attnfuse.fx_utils import is_written
from attnfuse.kernels.rows import KERNEL_SAFE_FILL
from attnfuse.lower import site_function


def share_raised_fills(gm: GraphModule) -> int:
    """Give every mask node that two or more fused sites of ``gm`` read as a fill-raising bias one ``clamp_min``
    node, read by those sites; returns how many masks were raised."""
    sites_of: dict[Node, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        plan = getattr(node.target, "plan", None) if node.op == "call_function" else None
        if plan is None or not plan.raises_its_fill:
            continue
        bias = node.args[plan.inputs.first("biases")]
        if isinstance(bias, Node) and not is_written(bias):
            sites_of[bias].append(node)
    raised = 0
    for bias, sites in sites_of.items():
        if len(sites) < 2:
            continue
        with gm.graph.inserting_after(bias):
            clamped = gm.graph.call_method("clamp_min", (bias, KERNEL_SAFE_FILL))
        clamped.meta.update({key: bias.meta[key] for key in ("example_value", "val", "tensor_meta")
                             if key in bias.meta})
        for site in sites:
            site.replace_input_with(bias, clamped)
            site.target = site_function(replace(site.target.plan, bias_fill=KERNEL_SAFE_FILL), site.target.__name__)
        raised += 1
    return raised

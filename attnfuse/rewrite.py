"""Rewrite: replace each matched site with one fused call and remove the nodes only it used.

Sites are matched before any is rewritten, so a site may read the output of another (chained
attention, ``attn(attn(q, k, v), k, v)``): when a site is rewritten its old output node is erased
and marked with the fused node that replaced it, and later sites read through that mark.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from attnfuse.canonical import has_side_effect, remove_dead_nodes
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
    plan = plan_for(site, kernels, autotune, output_written=output_may_be_written(site.output))
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


# Ops whose result may share memory with their input (a write to the result writes the input).
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten", "unflatten",
                 "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "narrow", "select", "split",
                 "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "as_strided", "detach",
                 "to", "type", "type_as", "float", "half", "bfloat16", "double", "diagonal",
                 "split_with_sizes", "tensor_split", "unfold", "view_as_real", "real", "imag"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind,
                   torch.movedim, torch.swapaxes, torch.swapdims, torch.t, torch.as_strided, torch.detach,
                   torch.diagonal, torch.tensor_split}


def _may_alias(node: Node) -> bool:
    """Whether ``node``'s result may be a view of (share memory with) its tensor input."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return True
    return node.target in _VIEW_FUNCTIONS or node.target in (operator.getitem, getattr)


def output_may_be_written(output: Node) -> bool:
    """Whether the value of ``output`` may be written in place (in the graph or after it is returned).

    Fused kernels save their output for the backward pass; the original value product did not, so
    such an output must be handed out as a fresh tensor. Followed through views; any other op
    makes a new tensor.
    """
    pending, seen = [output], set()
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output" or has_side_effect(user):
                return True
            if _may_alias(user):
                pending.append(user)
    return False

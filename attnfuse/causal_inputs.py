"""Inductor's form of a graph whose sites take their one bias as a graph input, run causal on the calls where it is.

A site whose one mask is handed in at run time (transformers' eager mask reaching a decoder layer's graph across a
graph break: FSDP2's per-layer graphs, torchtitan's per-block compile) reads it per call as the causal triangle
(``guards.RunTimeCausal``). Inductor compiles a graph once, and the traced site cannot read a value: it would run
with the bias on every call, and with gradients its kernels refuse it (a row the bias might mask whole), so the site
would run unfused. Here, where the first call's bias holds the triangle, Inductor compiles the graph with those
sites on the causal path without it (``guards.traced_as_causal``), and each call runs that compiled form where its
bias holds the triangle again (read before the graph runs, by the sites' own rule: a proof carried from the graph
that built it, or one host read), else the rewritten graph op by op, whose sites check their values themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule

from attnfuse.fx_utils import tensor_meta
from attnfuse.guards import RunTimeCausal, traced_as_causal


@dataclass(frozen=True)
class CausalInput:
    """A graph input that sites take unchanged as their one bias (``index`` among the graph's inputs), read by each
    site's check for the ``dtype`` its scores are added in."""

    index: int
    check: RunTimeCausal
    dtype: torch.dtype

    def alignment(self, args: tuple, example: bool = False) -> tuple[Optional[str], bool]:
        """The alignment this call's input holds (``RunTimeCausal.input_alignment``), and whether it was proven without
        a read."""
        return self.check.input_alignment(args[self.index], self.dtype, example)


def causal_inputs(gm: GraphModule) -> tuple[CausalInput, ...]:
    """The inputs of ``gm`` that a site takes as its one bias, unchanged, where nothing else of the site reads values
    per call (so the causal path is all that the call's reading decides)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    found = []
    for node in gm.graph.nodes:
        plan = getattr(node.target, "plan", None) if node.op == "call_function" else None
        if plan is None or not _decided_by_its_bias(plan):
            continue
        given = plan.inputs.split(node.args)
        bias, q = given.biases[0], tensor_meta(given.q)
        if bias in placeholders and q is not None:
            found.append(CausalInput(placeholders.index(bias), plan.run_time_causal, plan.dtype or q.dtype))
    return tuple(found)


def _decided_by_its_bias(plan: Any) -> bool:
    """Whether the site's bias's causal reading decides its call: one plain bias, and no mask, causal flag, window,
    score function, fill, padding, buffer guard, fill bound or added mask beside it (a check of rows without a live
    key passes where the bias holds the triangle)."""
    check = plan.run_time_causal
    return check is not None and check.kind == "bias" and plan.inputs.biases == 1 and plan.inputs.masks == 0 and \
        plan._one_plain_bias and plan.bias_fill is None and plan.causal is None and plan.window is None and \
        plan.bias_program is None and plan.unpadded is None and plan.causal_guard is None and \
        plan.dominance is None and not plan.keys_in_every_row and plan.added_mask is None


class CausalForm:
    """Runs a graph call on Inductor's causal form where every input of ``inputs`` holds the triangle it was
    compiled for (``alignments``), else on ``op_by_op`` (the rewritten graph, whose sites read each call)."""

    def __init__(self, inputs: tuple[CausalInput, ...], alignments: tuple[str, ...], compiled: Callable[..., Any],
                 op_by_op: Callable[..., Any]) -> None:
        self.inputs, self.alignments = inputs, alignments
        self.compiled, self.op_by_op = compiled, op_by_op

    def __call__(self, *args: Any) -> Any:
        read: dict[tuple, tuple[Optional[str], bool]] = {}  # one reading of an input for the sites that read it alike
        proven = []
        for found, alignment in zip(self.inputs, self.alignments):
            key = (found.index, found.dtype, found.check.threshold)
            first = key not in read
            if first:
                read[key] = found.alignment(args)
            if read[key][0] != alignment:  # the sites read their bias again op by op, and count those calls
                return self.op_by_op(*args)
            proven.append(read[key][1] or not first)
        for found, alignment, without_read in zip(self.inputs, self.alignments, proven):
            found.check.count_as(alignment, without_read)
        return self.compiled(*args)


def compile_causal_form(gm: GraphModule, example_inputs: list[Any], inputs: tuple[CausalInput, ...],
                        compile_graph: Callable[[GraphModule, list[Any]], Callable[..., Any]],
                        op_by_op: Callable[[GraphModule], Callable[..., Any]]) -> Optional[CausalForm]:
    """``compile_graph`` of ``gm`` with the sites of ``inputs`` traced on the causal path, where the example inputs
    (the first call's) hold their triangles; None where they do not (the graph compiles as it is). ``op_by_op(gm)``:
    what runs the other calls, made before the compile (whose passes may rewrite ``gm``)."""
    alignments = tuple(found.alignment(example_inputs, example=True)[0] for found in inputs)
    if any(alignment is None for alignment in alignments):
        return None
    fallback = op_by_op(gm)
    with traced_as_causal({found.check: alignment for found, alignment in zip(inputs, alignments)}):
        compiled = compile_graph(gm, example_inputs)
    return CausalForm(inputs, alignments, compiled, fallback)

"""Attention the model already runs through PyTorch's own fused entry points.

``F.scaled_dot_product_attention`` and FlexAttention calls are reported as already fused, so a user
reads that instead of "no attention found". ``nn.MultiheadAttention`` reaches the graph as one
``F.multi_head_attention_forward`` call: with ``need_weights=False`` it runs SDPA; with the default
``need_weights=True`` it computes the weights unfused, which is wasted when the caller drops them
(``mha(x, x, x)[0]``): there the call is switched to ``need_weights=False`` when that is exact.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from attnfuse.fx_utils import value_users

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MHA_KERNEL = "sdpa (nn.MultiheadAttention)"


@dataclass
class NativeSite:
    """A fused-attention call the model makes itself: ``status`` is ``"native"`` (left as is),
    ``"fused"`` (its fused path is exact: ``use_fused_path``) or ``"skipped"`` (left unfused, with the reason)."""

    node: Node
    status: str
    kernel: Optional[str]
    reason: str


def native_sites(graph: Graph) -> Iterator[NativeSite]:
    """Each call in ``graph`` to PyTorch's own attention, and whether its fused path can be used (``use_fused_path``)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SDPA_TARGETS:
            yield NativeSite(node, "native", "the model's own sdpa", "already a fused kernel; nothing to rewrite")
        elif "flex_attention" in getattr(node.target, "__name__", str(node.target)):
            yield NativeSite(node, "native", "the model's own flex_attention", "already a fused kernel")
        elif node.target is F.multi_head_attention_forward:
            yield _multihead(node)


def _argument(node: Node, name: str, default: object = None) -> object:
    if name in node.kwargs:
        return node.kwargs[name]
    index = _MHA_PARAMETERS.index(name)
    return node.args[index] if index < len(node.args) else default


_MHA_PARAMETERS = list(inspect.signature(F.multi_head_attention_forward).parameters)


def _weights_used(node: Node) -> bool:
    """Whether anything reads the attention weights (item 1 of the call's result)."""
    for user in value_users(node):
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            return True
    return False


def _multihead(node: Node) -> NativeSite:
    if _argument(node, "need_weights", True) is False:
        return NativeSite(node, "native", _MHA_KERNEL, "already a fused kernel (need_weights=False)")
    if _weights_used(node):
        return NativeSite(node, "skipped", None, "nn.MultiheadAttention returns its attention weights "
                          "(need_weights=True, the default), so it computes them unfused; pass need_weights=False "
                          "where the weights are not needed")
    masked = _argument(node, "attn_mask") is not None or _argument(node, "key_padding_mask") is not None
    dropout = _argument(node, "training", True) is not False and _argument(node, "dropout_p", 0.0) != 0.0
    if masked or dropout or not isinstance(_argument(node, "need_weights", True), bool):
        what = "a mask" if masked else ("dropout" if dropout else "a need_weights decided at run time")
        return NativeSite(node, "skipped", None, f"nn.MultiheadAttention with need_weights=True (the default) and "
                          f"{what}: its fused path may treat fully masked rows or dropout differently, so it is "
                          "left as written; pass need_weights=False to run it on SDPA")
    return NativeSite(node, "fused", _MHA_KERNEL, "need_weights=False: its weights were never read")


def use_fused_path(site: NativeSite) -> None:
    """Rewrite a ``"fused"`` site's call to ``need_weights=False`` (SDPA inside ``nn.MultiheadAttention``)."""
    node = site.node
    if "need_weights" in node.kwargs:
        node.update_kwarg("need_weights", False)
    else:
        node.update_arg(_MHA_PARAMETERS.index("need_weights"), False)

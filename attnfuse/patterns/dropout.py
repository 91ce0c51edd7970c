"""Dropout rules: ``F.dropout`` / ``torch.dropout`` / inlined ``nn.Dropout`` on the probabilities.

``p`` is a number, or a graph node giving one at run time (Dynamo makes a float attribute dynamic
under ``dynamic=True`` or when a second instance has another ``p``); ``training`` is always baked in.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.fx import Node

from attnfuse.canonical import canonicalizer
from attnfuse.fx_utils import bind, example_value, is_call, is_scalar
from attnfuse.vocabulary import Dropout


def _probability(p: object) -> Union[float, Node, None]:
    """``p`` as a float, or the node computing it when it is a run-time number (a ``SymFloat``)."""
    if is_scalar(p) and not isinstance(p, (torch.SymInt, torch.SymFloat)):
        return float(p)
    if isinstance(p, Node) and is_scalar(example_value(p)):
        return p
    return None


@canonicalizer
def dropout_rule(node: Node) -> Optional[Dropout]:
    if is_call(node, (F.dropout,)):
        args = bind(node, ("x", "p", "training", "inplace"), p=0.5, training=True)
    elif is_call(node, (torch.dropout,)):
        args = bind(node, ("x", "p", "train"))
        args["training"] = args.get("train")
    else:
        return None
    p = _probability(args.get("p"))
    if p is None or not isinstance(args.get("training"), bool):
        return None
    return Dropout(args["x"], p, args["training"])

"""Softmax rules: ``x.softmax(d)``, ``F.softmax``, ``torch.softmax``, ``nn.Softmax`` (inlined), with ``dtype=``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from attnfuse.canonical import canonicalizer
from attnfuse.fx_utils import bind, is_call
from attnfuse.vocabulary import Softmax


def calls_softmax(node: Node) -> bool:
    """Whether ``node`` calls a softmax: the only nodes ``softmax_rule`` (the one rule that reads a ``Softmax``)
    may read as one, so a search for softmaxes canonicalizes no other node."""
    return is_call(node, (F.softmax, torch.softmax, torch.Tensor.softmax), ("softmax",))


@canonicalizer
def softmax_rule(node: Node) -> Optional[Softmax]:
    if not calls_softmax(node):
        return None
    args = bind(node, ("x", "dim"), dtype=None)
    if node.op == "call_function" and node.target is F.softmax:
        args = bind(node, ("x", "dim", "_stacklevel", "dtype"), dtype=None)
    if not isinstance(args.get("dim"), int) or not isinstance(args["x"], Node):
        return None
    return Softmax(args["x"], args["dim"], args.get("dtype"))

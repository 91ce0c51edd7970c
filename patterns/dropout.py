"""Dropout rules: ``F.dropout`` / ``torch.dropout`` / inlined ``nn.Dropout`` on the probabilities."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from attnfuse.canonical import bind, canonicalizer, is_call


@dataclass(frozen=True)
class Dropout:
    """Dropout with probability ``p``; a no-op unless ``training`` (Dynamo bakes ``self.training`` in)."""

    x: Node
    p: float
    training: bool

    @property
    def active(self) -> bool:
        return self.training and self.p > 0


@canonicalizer
def dropout_rule(node: Node) -> Optional[Dropout]:
    if is_call(node, (F.dropout,)):
        args = bind(node, ("x", "p", "training", "inplace"), p=0.5, training=True)
    elif is_call(node, (torch.dropout,)):
        args = bind(node, ("x", "p", "train"))
        args["training"] = args.get("train")
    else:
        return None
    if not isinstance(args.get("p"), (int, float)) or not isinstance(args.get("training"), bool):
        return None
    return Dropout(args["x"], float(args["p"]), args["training"])

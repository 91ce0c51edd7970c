"""Score-transform rules: elementwise functions of the scores themselves (tanh logit softcapping).

Gemma 2 writes ``s = tanh(s / cap) * cap`` between the QK product and the softmax. SDPA has no
kernel for it; FlexAttention runs it as a ``score_mod``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from attnfuse.canonical import canonicalizer
from attnfuse.fx_utils import is_call
from attnfuse.vocabulary import Tanh


@canonicalizer
def tanh_rule(node: Node) -> Optional[Tanh]:
    if is_call(node, (torch.tanh, torch.nn.functional.tanh), ("tanh",)) and len(node.args) == 1:
        return Tanh(node.args[0])
    return None

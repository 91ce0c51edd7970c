"""Score-modification benchmark: naive vs SDPA with a materialized bias vs attnfuse vs hand-written Flex.

    python benchmarks/bench_scores.py --out docs/bench_scores.json

Sites (causal, b=8, h=16, n=4096, d=64, bf16 by default): ALiBi, an MPT layer (its ALiBi built as an fp32
``(h, 1, n)`` tensor and sliced, against hand-written Flex gathering that tensor in fp32), a learned (h, n, n)
bias, a tanh softcap of 50, and plain causal as the ceiling. Forward and forward+backward, one run.

    python benchmarks/bench_scores.py --n 2048 --sites mpt,alibi,causal --out docs/bench_scores_mpt.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, measure, save  # noqa: E402
from score_modules import AlibiCausal, alibi_slopes  # noqa: E402
from seed_modules import MegabyteStyle  # noqa: E402


class LearnedBiasCausal(nn.Module):
    def __init__(self, heads: int, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(heads, n, n) * 0.1)

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        sim = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + self.bias
        sim = sim.masked_fill(torch.ones(i, j, dtype=torch.bool, device=q.device).triu(j - i + 1), -torch.finfo(sim.dtype).max)
        return sim.softmax(-1) @ v


def mpt_alibi(heads: int, max_len: int, device=None) -> torch.Tensor:
    """MPT's ALiBi (transformers' ``build_mpt_alibi_tensor``): ``arange(1 - n, 1) * slopes``, an fp32 ``(h, 1, n)``."""
    positions = torch.arange(1 - max_len, 1, dtype=torch.int32, device=device).view(1, 1, 1, max_len)
    return (positions * alibi_slopes(heads, device).view(1, heads, 1, 1)).squeeze(0)


class MptStyleCausal(nn.Module):
    """One MPT attention layer as transformers writes it: the ALiBi built for ``max_seq_len`` keys and sliced to the
    call's (``[:, -q:, -k:]``, fp32, added to the scores), then ``masked_fill`` of the causal mask with ``finfo.min``,
    the softmax in fp32."""

    def __init__(self, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.max_len = heads, max_len

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        alibi = mpt_alibi(self.heads, self.max_len, q.device)
        alibi = alibi[:, max(0, alibi.size(1) - L):, max(0, alibi.size(2) - S):]
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + alibi
        drop = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(S - L + 1)
        scores = scores.masked_fill(drop, torch.finfo(q.dtype).min)
        return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class SoftcapCausal(nn.Module):
    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        w = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        w = torch.tanh(w / 50.0) * 50.0
        w = w.masked_fill(torch.ones(i, j, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return w.softmax(-1) @ v


def hand_sdpa_with_bias(site, module, n, h):
    """Hand-written SDPA: the bias materialized once per call, causal folded into it, best kernel."""
    def run(q, k, v):
        if site == "alibi":
            rel = torch.arange(n, device="cuda")[None, :] - torch.arange(n, device="cuda")[:, None]
            bias = (alibi_slopes(h, "cuda")[:, None, None] * rel).to(q.dtype)
        elif site == "learned":
            bias = module.bias.to(q.dtype)
        else:
            return None
        bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    return run


def hand_flex(site, module, n, h):
    compiled = torch.compile(flex_attention)
    blocks = create_block_mask(lambda b, hh, i, j: j <= i, None, None, n, n, device="cuda")
    slopes = alibi_slopes(h, "cuda")
    table = mpt_alibi(h, n, "cuda").float()  # the same (h, 1, n) bias gathered in fp32
    mods = {
        "alibi": lambda s, b, hh, i, j: s + slopes[hh] * (j - i),
        "mpt": lambda s, b, hh, i, j: s + table[hh, 0, j],
        "learned": lambda s, b, hh, i, j: s + module.bias[hh, i, j],
        "softcap": lambda s, b, hh, i, j: 50.0 * torch.tanh(s / 50.0),
        "causal": None,
    }
    return lambda q, k, v: compiled(q, k, v, score_mod=mods[site], block_mask=blocks)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_scores.json")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sites", default="alibi,mpt,learned,softcap,causal",
                        help="comma-separated: alibi (computed), mpt (an MPT layer: ALiBi read from an fp32 (h, 1, n) "
                             "tensor; hand Flex gathers that tensor), learned, softcap, causal")
    args = parser.parse_args()
    b, h, n, d = args.batch, 16, args.n, 64
    rows = []
    print(environment())
    print("| site | pass | naive ms | SDPA + bias ms | attnfuse ms | hand Flex ms | attnfuse / Flex | attnfuse GB | naive GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    modules = {"alibi": AlibiCausal(h), "mpt": MptStyleCausal(h, n), "learned": LearnedBiasCausal(h, n),
               "softcap": SoftcapCausal(), "causal": MegabyteStyle(causal=True)}
    modules = {site: modules[site] for site in args.sites.split(",")}
    for site, module in modules.items():
        module = module.to("cuda", torch.bfloat16)
        for grad in (False, True):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))

            def step(fn):
                def call():
                    out = fn(q, k, v)
                    if grad:
                        out.backward(torch.ones_like(out))
                return call

            result = {}
            torch._dynamo.reset()
            result["naive"] = measure(step(module))
            sdpa = hand_sdpa_with_bias(site, module, n, h)
            result["sdpa_bias"] = measure(step(sdpa)) if site in ("alibi", "learned") else (None, None)
            torch._dynamo.reset()
            result["attnfuse"] = measure(step(attnfuse.optimize(copy.deepcopy(module))))
            torch._dynamo.reset()
            result["flex"] = measure(step(hand_flex(site, module, n, h)))
            ms = {key: value[0] for key, value in result.items()}
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            ratio = "-" if not (ms["attnfuse"] and ms["flex"]) else f"{ms['flex'] / ms['attnfuse']:.2f}"
            print(f"| {site} | {'fwd+bwd' if grad else 'fwd'} | {fmt(ms['naive'])} | {fmt(ms['sdpa_bias'])} | "
                  f"{fmt(ms['attnfuse'])} | {fmt(ms['flex'])} | {ratio} | {fmt(result['attnfuse'][1])} | "
                  f"{fmt(result['naive'][1])} |", flush=True)
            rows.append({"site": site, "pass": "fwd+bwd" if grad else "fwd", "b": b, "h": h, "n": n, "d": d,
                         "results": {key: {"ms": value[0], "peak_gb": value[1]} for key, value in result.items()}})
    save(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()

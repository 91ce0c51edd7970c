"""One sliding-window attention call with a left-padded key mask, as transformers' Mistral / Gemma 2 layers make it.

    python benchmarks/bench_window_padding.py --shape 8x16x2048x64 --window 1024 --pad 512

b x h x n x d, bf16, half the batch left-padded by ``--pad`` keys. Variants, each timed in turn (CUDA events,
median): the model's own additive ``(B, 1, n, n)`` mask on SDPA (what an eager model hands to the ``sdpa``
path), ``attnfuse.attend`` with the window and the ``(B, 1, 1, n)`` key mask (what attnfuse reads from the eager
model's mask), the same forced onto SDPA, and hand-written FlexAttention with the padding in the block mask (built
once, outside the timing, as transformers' ``flex_attention`` path builds it once a forward). ``--softcap`` adds
Gemma 2's tanh softcap (no SDPA kernel: the SDPA rows are then left out).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, measure, save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x16x2048x64", help="b x h x n x d")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--pad", type=int, default=512)
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--out", default="docs/bench_window_padding.json")
    args = parser.parse_args()
    b, h, n, d = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    padding = torch.ones(b, n, dtype=torch.bool, device="cuda")
    padding[b // 2:, :args.pad] = False
    i, j = torch.arange(n, device="cuda")[:, None], torch.arange(n, device="cuda")[None, :]
    keep = (j <= i) & (j > i - args.window) & padding[:, None, None, :]
    bias = torch.where(keep, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    key_mask = padding[:, None, None, :]

    def mask_mod(bb, hh, qi, kj):
        return (kj <= qi) & (kj > qi - args.window) & padding[bb, kj]

    def softcapped(score, bb, hh, qi, kj):
        return args.softcap * torch.tanh(score / args.softcap)

    blocks = create_block_mask(mask_mod, b, None, n, n, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    variants = {
        "attnfuse.attend(window, key mask)": lambda: attnfuse.attend(
            q, k, v, mask=key_mask, causal="top_left", window=args.window, softcap=args.softcap,
            fully_masked_rows="mean"),
        "flex, padding in the block mask": lambda: flex(
            q, k, v, block_mask=blocks, score_mod=softcapped if args.softcap else None),
    }
    if args.softcap is None:
        variants["sdpa, the model's (B,1,n,n) bias"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        variants["attnfuse.attend, SDPA forced"] = lambda: attnfuse.attend(
            q, k, v, mask=key_mask, causal="top_left", window=args.window, fully_masked_rows="mean",
            kernels=("cudnn", "flash", "efficient", "math"))
    rows = []
    print(environment())
    print(f"| {args.shape} window {args.window} pad {args.pad} softcap {args.softcap} | ms | vs first |")
    print("|---|---|---|")
    for name, fn in variants.items():
        with torch.no_grad():
            ms, gb = measure(fn)
        rows.append({"variant": name, "ms": ms, "peak_gb": gb})
    first = rows[0]["ms"]
    for row in rows:
        print(f"| {row['variant']} | {row['ms']:.3f} | {first / row['ms']:.2f}x |")
    save(args.out, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

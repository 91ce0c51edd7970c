"""Which SDPA kernel is fastest, by sequence length, head dim, mask and layout: the data behind dispatch.

    python benchmarks/bench_kernels.py --out docs/bench_kernels_h100.json

Times cuDNN, flash and memory-efficient attention directly (``sdpa_kernel([one])``) on bf16
inputs for lengths that are and are not multiples of the kernels' tiles, two batch regimes
(32k tokens per call, and a fixed batch of 8, like MEGABYTE's global model at 129 patches), q/k/v
contiguous ``(b, h, n, d)`` or the transposed views a model's ``(b, n, h, d)`` projection gives,
forward and forward+backward. ``attnfuse.dispatch`` orders the kernels from these figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))

from common import FUSED_KERNELS as KERNELS, environment, measure, save  # noqa: E402


def inputs(b: int, h: int, n: int, d: int, layout: str, grad: bool):
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    tensors = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)]
    return tensors if layout == "bhnd" else [t.transpose(1, 2) for t in tensors]


def time_kernel(kernel: str, q, k, v, mask, causal: bool, grad: bool):
    def step():
        with sdpa_kernel([KERNELS[kernel]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if grad:
            out.backward(torch.ones_like(out))
        return out
    try:
        step()
    except RuntimeError:
        return None
    return measure(step, warmup_ms=10, rep_ms=40)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_kernels.json")
    parser.add_argument("--lengths", default="17,64,100,128,129,200,256,257,384,500,512,513,1000,1024,1025,2047,2048,4096")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    print(environment())
    print("| batch | d | n | mask | layout | pass | cuDNN ms | flash ms | mem-eff ms | fastest | cuDNN / fastest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for regime in ("tokens32k", "batch8"):
        for d in (64, 128):
            for n in map(int, args.lengths.split(",")):
                b = max(1, 32768 // n) if regime == "tokens32k" else 8
                for mode in ("none", "causal", "padding"):
                    for layout in ("bhnd", "bnhd"):
                        for grad in (False, True):
                            if layout == "bnhd" and (grad or mode == "padding"):
                                continue
                            q, k, v = inputs(b, 16, n, d, layout, grad)
                            mask = None
                            if mode == "padding":
                                lengths = torch.randint(n // 2 + 1, n + 1, (b,), device="cuda")
                                mask = (torch.arange(n, device="cuda") < lengths[:, None])[:, None, None, :]
                            times = {name: time_kernel(name, q, k, v, mask, mode == "causal", grad) for name in KERNELS}
                            valid = {name: ms for name, ms in times.items() if ms}
                            fastest = min(valid, key=valid.get)
                            row = {"regime": regime, "b": b, "h": 16, "n": n, "d": d, "mask": mode, "layout": layout,
                                   "pass": "fwd+bwd" if grad else "fwd", "ms": times, "fastest": fastest}
                            rows.append(row)
                            cell = lambda name: "-" if times[name] is None else f"{times[name]:.3f}"
                            ratio = "-" if times["cudnn"] is None else f"{times['cudnn'] / valid[fastest]:.2f}"
                            print(f"| {b} | {d} | {n} | {mode} | {layout} | {row['pass']} | {cell('cudnn')} | "
                                  f"{cell('flash')} | {cell('efficient')} | {fastest} | {ratio} |", flush=True)
                            save(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()

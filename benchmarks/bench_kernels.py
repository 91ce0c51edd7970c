"""Which SDPA kernel is fastest, by sequence length, head dim, mask and layout: the data behind dispatch.

    python benchmarks/bench_kernels.py --out docs/bench_kernels_h100.json

Times cuDNN, flash and memory-efficient attention directly (``sdpa_kernel([one])``) on bf16
inputs for lengths that are and are not multiples of the kernels' tiles, two batch regimes
(32k tokens per call, and a fixed batch of 8, like MEGABYTE's global model at 129 patches), q/k/v
contiguous ``(b, h, n, d)``, the transposed views a model's ``(b, n, h, d)`` projection gives, or
k/v split from one packed projection,
forward and forward+backward. ``attnfuse.kernels.sdpa`` orders the kernels from these figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))

from common import FUSED_KERNELS as KERNELS, environment, measure, save  # noqa: E402


LAYOUTS = ("bhnd", "bnhd", "kvpacked")


def inputs(b: int, h: int, n: int, d: int, layout: str, grad: bool):
    """q, k, v of shape (b, h, n, d): contiguous (``bhnd``), transposed views of (b, n, h, d) tensors
    (``bnhd``), or k and v as the two halves of one (b, n, 2*h*d) projection, as lucidrains' models
    split ``to_kv`` (``kvpacked``)."""
    def randn(*shape):
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    if layout == "bhnd":
        return [randn(b, h, n, d) for _ in range(3)]
    if layout == "bnhd":
        return [randn(b, n, h, d).transpose(1, 2) for _ in range(3)]
    q = randn(b, n, h * d).unflatten(-1, (h, d)).transpose(1, 2)
    k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in randn(b, n, 2 * h * d).chunk(2, dim=-1))
    return [q, k, v]


def host_us(step, calls: int = 50) -> float:
    """Microseconds of host time per call: the time to enqueue ``calls`` calls without waiting for the GPU.

    ``measure`` gives GPU time; a model of small calls is bound by this instead, and the kernels'
    host costs differ (cuDNN builds and looks up an execution plan per call).
    """
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def time_kernel(kernel: str, q, k, v, mask, causal: bool, grad: bool) -> tuple:
    """(GPU ms, host us) of one kernel on this call, (None, None) where it refuses the call."""
    def step():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if grad:
            out.backward(torch.ones_like(out))
        return out
    with sdpa_kernel([KERNELS[kernel]]):
        try:
            step()
        except RuntimeError:
            return None, None
        return measure(step, warmup_ms=10, rep_ms=40)[0], host_us(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_kernels.json")
    parser.add_argument("--lengths", default="17,64,100,128,129,200,256,257,384,500,512,513,1000,1024,1025,2047,2048,4096")
    parser.add_argument("--regimes", default="tokens32k,batch8")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    print(environment())
    print("| batch | d | n | mask | layout | pass | cuDNN ms | flash ms | mem-eff ms | fastest | cuDNN / fastest "
          "| host us cuDNN / flash / mem-eff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for regime in args.regimes.split(","):
        for d in (64, 128):
            for n in map(int, args.lengths.split(",")):
                b = max(1, 32768 // n) if regime == "tokens32k" else 8
                for mode in ("none", "causal", "padding"):
                    for layout in args.layouts.split(","):
                        for grad in (False, True):
                            if layout != "bhnd" and mode == "padding":
                                continue
                            q, k, v = inputs(b, 16, n, d, layout, grad)
                            mask = None
                            if mode == "padding":
                                lengths = torch.randint(n // 2 + 1, n + 1, (b,), device="cuda")
                                mask = (torch.arange(n, device="cuda") < lengths[:, None])[:, None, None, :]
                            measured = {name: time_kernel(name, q, k, v, mask, mode == "causal", grad) for name in KERNELS}
                            times = {name: ms for name, (ms, _) in measured.items()}
                            host = {name: us for name, (_, us) in measured.items()}
                            valid = {name: ms for name, ms in times.items() if ms}
                            fastest = min(valid, key=valid.get)
                            row = {"regime": regime, "b": b, "h": 16, "n": n, "d": d, "mask": mode, "layout": layout,
                                   "pass": "fwd+bwd" if grad else "fwd", "ms": times, "host_us": host, "fastest": fastest}
                            rows.append(row)
                            cell = lambda name: "-" if times[name] is None else f"{times[name]:.3f}"
                            ratio = "-" if times["cudnn"] is None else f"{times['cudnn'] / valid[fastest]:.2f}"
                            hosts = " / ".join("-" if host[name] is None else f"{host[name]:.0f}" for name in KERNELS)
                            print(f"| {b} | {d} | {n} | {mode} | {layout} | {row['pass']} | {cell('cudnn')} | "
                                  f"{cell('flash')} | {cell('efficient')} | {fastest} | {ratio} | {hosts} |", flush=True)
                            save(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()

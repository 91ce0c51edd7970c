"""Per-op benchmark: the seeds' naive attention vs attnfuse vs hand-written SDPA on each kernel.

    python benchmarks/bench_ops.py --out docs/bench_ops.json [--compile] [--quick]

For each head dim, sequence length (batch * n = 32k tokens, 16 heads) and mask kind (none, causal,
key padding) it times, forward and forward+backward, in one run: the naive module in eager mode,
``attnfuse.optimize`` of it (eager), hand-written ``F.scaled_dot_product_attention`` on every
SDPA kernel that accepts the call (the best of them is the target), and with ``--compile``
``torch.compile`` of the naive module and ``torch.compile(backend="attnfuse")``. It prints
TFLOP/s, peak extra memory and the ratios, and writes them as JSON.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import FUSED_KERNELS as KERNELS, environment, measure, save  # noqa: E402
from seed_modules import MegabyteStyle, PaddingStyle  # noqa: E402


def build(mode: str, b: int, h: int, n: int, d: int, dtype: torch.dtype, grad: bool):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3))
    if mode == "padding":
        lengths = torch.randint(n // 2, n + 1, (b,), device="cuda")
        mask = torch.arange(n, device="cuda")[None, :] < lengths[:, None]
        return PaddingStyle().eval(), (q, k, v, mask), mask[:, None, None, :]
    return MegabyteStyle(causal=(mode == "causal")).eval(), (q, k, v), None


def step(fn, args, grad: bool):
    def run():
        out = fn(*args)
        if grad:
            out.backward(torch.ones_like(out))
        return out
    return run


def bench_shape(mode, n, d, dtype, grad, compile_variants):
    b, h = max(1, 32768 // n), 16
    naive, args, sdpa_mask = build(mode, b, h, n, d, dtype, grad)
    flops = 4 * b * h * n * n * d * (0.5 if mode == "causal" else 1.0) * (3.5 if grad else 1.0)
    results = {}

    def record(name, fn):
        ms, gb = measure(step(fn, args, grad))
        results[name] = {"ms": ms, "tflops": None if ms is None else flops / ms / 1e9, "peak_gb": gb}

    record("naive", naive)
    torch._dynamo.reset()
    record("attnfuse", attnfuse.optimize(copy.deepcopy(naive)))
    q, k, v = args[:3]
    for kernel, backend in KERNELS.items():
        def hand(q, k, v, *_, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=mode == "causal")
        try:
            hand(q, k, v)
        except RuntimeError:
            results[f"sdpa_{kernel}"] = None
            continue
        record(f"sdpa_{kernel}", hand)
    if compile_variants:
        torch._dynamo.reset()
        record("compile_naive", torch.compile(copy.deepcopy(naive)))
        torch._dynamo.reset()
        record("compile_attnfuse", torch.compile(copy.deepcopy(naive), backend="attnfuse"))
    best = min((r["ms"] for key, r in results.items() if key.startswith("sdpa_") and r and r["ms"]), default=None)
    results["best_sdpa_ms"] = best
    return {"mode": mode, "n": n, "d": d, "b": b, "h": h, "dtype": str(dtype).replace("torch.", ""),
            "pass": "fwd+bwd" if grad else "fwd", "results": results}


def fmt(row):
    r = row["results"]
    cell = lambda key: "-" if not r.get(key) or r[key]["ms"] is None else f"{r[key]['tflops']:.0f}"
    ratio = "-"
    if r.get("attnfuse") and r["attnfuse"]["ms"] and r["best_sdpa_ms"]:
        ratio = f"{r['best_sdpa_ms'] / r['attnfuse']['ms']:.2f}"
    speedup = "-"
    if r["naive"]["ms"] and r["attnfuse"]["ms"]:
        speedup = f"{r['naive']['ms'] / r['attnfuse']['ms']:.1f}x"
    mem = lambda key: "-" if not r.get(key) or r[key]["peak_gb"] is None else f"{r[key]['peak_gb']:.2f}"
    best_mem = min((r[k]["peak_gb"] for k in r if k.startswith("sdpa_") and r[k] and r[k]["peak_gb"] is not None), default=None)
    return (f"| {row['dtype']} | {row['pass']} | {row['d']} | {row['n']} | {row['mode']} | {cell('naive')} | "
            f"{cell('compile_naive')} | {cell('attnfuse')} | {cell('compile_attnfuse')} | {cell('sdpa_cudnn')} | "
            f"{cell('sdpa_flash')} | {cell('sdpa_efficient')} | {speedup} | {ratio} | {mem('naive')} | {mem('attnfuse')} | "
            f"{'-' if best_mem is None else f'{best_mem:.2f}'} |")


HEADER = ("| dtype | pass | d | n | mask | naive | compile(naive) | attnfuse | compile(attnfuse) | cuDNN | flash | "
          "mem-eff | attnfuse vs naive | attnfuse / best SDPA speed | naive GB | attnfuse GB | best SDPA GB |\n"
          "|" + "---|" * 17)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_ops.json")
    parser.add_argument("--compile", action="store_true", help="also torch.compile variants (slow to compile)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--modes", default="none,causal,padding")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # SDPA explains every kernel it refuses; the table says it
    rows = []
    print(environment())
    print(HEADER)
    for dtype in args.dtypes.split(","):
        for grad in [p == "fwd+bwd" for p in args.passes.split(",")]:
            for d in map(int, args.head_dims.split(",")):
                for n in map(int, args.lengths.split(",")):
                    for mode in args.modes.split(","):
                        row = bench_shape(mode, n, d, getattr(torch, dtype), grad, args.compile)
                        rows.append(row)
                        print(fmt(row), flush=True)
                        save(args.out, {"environment": environment(), "unit": "TFLOP/s (causal counts half the FLOPs)",
                                        "rows": rows})  # after every row: a run cut short keeps what it measured


if __name__ == "__main__":
    main()

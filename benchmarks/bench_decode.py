"""Decode steps against long caches: one query per sequence (q_len 1) against S cached keys, per kernel.

    python benchmarks/bench_decode.py [--lengths 4096,16384,65536] [--configs llama8b,small] [--out docs/...]

For each cache length S and head configuration, times the call a decode step makes per layer:
``attnfuse.attend`` (the kernel it picks), each SDPA kernel pinned (cuDNN, flash, memory-efficient, math)
and FlexAttention (``torch.compile``'d), without a mask and with a ``(B, 1, 1, S)`` key-padding mask (a
left-padded batch). Two regimes:

- ``steady``: the same S every call (a cache of fixed size; CUDA-event median via ``do_bench``);
- ``growing``: S grows by one key each call, as in decoding with a cache that grows (DynamicCache),
  so every call has a shape the kernel has not seen; mean time per call over ``--steps`` calls,
  each variant timed in turn (interleaved rounds, best round kept). FlexAttention is left out of this
  regime (its block mask is rebuilt, and its kernel specialized, per new length).

Prints each variant's time and its ratio to the fastest valid pinned kernel, with device, torch and
date; writes JSON (``--out``). A kernel that cannot take a call is listed as such, not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, save  # noqa: E402

# (query heads, kv heads, head dim, batch): Llama-3-8B's attention at batch 8, and a small model at batch 4.
CONFIGS = {"llama8b": (32, 8, 128, 8), "small": (8, 2, 32, 4)}
PINNED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def pinned_call(backend: SDPBackend) -> Callable:
    """SDPA on one kernel; k and v shared across query groups by SDPA's ``enable_gqa``."""

    def call(q, k, v, keep):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    return call


def flex_call() -> Callable:
    """FlexAttention compiled once with dynamic shapes; key padding as a block mask built per call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=True)

    def call(q, k, v, keep):
        block_mask = None
        if keep is not None:
            keys = keep[:, 0, 0]
            block_mask = create_block_mask(lambda b, h, i, j: keys[b, j], keep.shape[0], None, 1, k.shape[-2],
                                           device=q.device)
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    return call


def attnfuse_call(q, k, v, keep):
    return attnfuse.attend(q, k, v, mask=keep)


def variants() -> dict[str, Callable]:
    return {"attnfuse": attnfuse_call, **{name: pinned_call(b) for name, b in PINNED.items()}, "flex": flex_call()}


def inputs(config: tuple, S: int, padded: bool, dtype: torch.dtype, device: torch.device):
    """q (B, H, 1, d) and a cache of ``S`` keys (B, Hk, S, d); half the batch left-padded by S/4 keys."""
    H, Hk, d, B = config
    generator = torch.Generator(device).manual_seed(S)
    q = torch.randn(B, H, 1, d, device=device, dtype=dtype, generator=generator)
    k, v = (torch.randn(B, Hk, S, d, device=device, dtype=dtype, generator=generator) for _ in range(2))
    keep = None
    if padded:
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
        keep[B // 2:, ..., : S // 4] = False
    return q, k, v, keep


def runs(call: Callable, args: tuple) -> Optional[str]:
    """None when ``call`` takes ``args``, else why not (a kernel that cannot take the call)."""
    try:
        call(*args)
        torch.cuda.synchronize()
        return None
    except RuntimeError as error:
        return str(error).splitlines()[0][:120]


def steady_ms(call: Callable, args: tuple) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: call(*args), warmup=25, rep=100, return_mode="median")


def growing_ms(calls: dict[str, Callable], args: tuple, steps: int, rounds: int) -> dict[str, float]:
    """Mean ms per call while S grows by one key a call (views of one preallocated cache), best round."""
    q, k, v, keep = args
    S = k.shape[-2] - steps
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for step in range(steps):
                n = S + step
                call(q, k[..., :n, :], v[..., :n, :], None if keep is None else keep[..., :n])
            torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e3)
    return best


def bench(config_name: str, S: int, padded: bool, args: argparse.Namespace) -> dict:
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    tensors = inputs(CONFIGS[config_name], S, padded, dtype, device)
    with torch.no_grad():
        calls = variants()
        refused = {name: why for name, call in calls.items() if (why := runs(call, tensors)) is not None}
        valid = {name: call for name, call in calls.items() if name not in refused}
        kernels: list[str] = []
        attnfuse.attend(*tensors[:3], mask=tensors[3], on_kernel=kernels.append)
        steady = {name: steady_ms(call, tensors) for name, call in valid.items()}
        growing_calls = {name: call for name, call in valid.items() if name != "flex"}
        growing = growing_ms(growing_calls, tensors, args.steps, args.rounds) if not args.no_growing else {}
    row = {"config": config_name, "S": S, "padded": padded, "attnfuse_kernel": kernels[-1] if kernels else None,
           "refused": refused, "steady_ms": steady, "growing_ms": growing}
    for regime in ("steady_ms", "growing_ms"):
        times = row[regime]
        pinned = [times[name] for name in (*PINNED, "flex") if name in times]
        if pinned:
            row[regime.replace("_ms", "_attnfuse_vs_best")] = times["attnfuse"] / min(pinned)
    return row


def print_rows(rows: list[dict], header: bool = True) -> None:
    names = ["attnfuse", *PINNED, "flex"]
    for regime in ("steady", "growing"):
        if header:
            print(f"\n{regime} (ms per call; ratio attnfuse / fastest valid kernel)")
            print("| config | S | padded | " + " | ".join(names) + " | attnfuse/best | attnfuse ran |")
            print("|" + "---|" * (len(names) + 5))
        for row in rows:
            times = row[f"{regime}_ms"]
            if not times:
                continue
            cells = [f"{times[n]:.4f}" if n in times else "-" for n in names]
            print(f"| {row['config']} | {row['S']} | {row['padded']} | " + " | ".join(cells) +
                  f" | {row.get(f'{regime}_attnfuse_vs_best', float('nan')):.2f} | {row['attnfuse_kernel']} |"
                  + ("" if header else f" {regime}"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--configs", default="llama8b,small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=32, help="calls per round in the growing regime")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-growing", action="store_true")
    parser.add_argument("--out", default="docs/bench_decode.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py times CUDA kernels; run it on a GPU machine")
    env = environment()
    print(env, flush=True)
    rows = []
    for config in args.configs.split(","):
        for S in args.lengths.split(","):
            for padded in (False, True):
                rows.append(bench(config, int(S), padded, args))
                print_rows(rows[-1:], header=False)
                save(args.out, {"environment": env, "args": vars(args), "rows": rows})
    print_rows(rows)


if __name__ == "__main__":
    main()

"""Timing and memory helpers shared by the benchmark scripts (CUDA events via triton's do_bench)."""
from __future__ import annotations

import json
import platform
import statistics
from datetime import date
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend

# The fused SDPA kernels a hand-written call can be pinned to (the benchmarks' "best SDPA" candidates).
FUSED_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def environment() -> dict:
    cpu = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
            "torch": torch.__version__, "date": date.today().isoformat()}


def measure(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> tuple[Optional[float], Optional[float]]:
    """(median milliseconds, peak extra GB of a steady-state call) of ``fn``; (None, None) on out of memory.

    The first call (compilation, caches, lazily created gradients) runs before memory is measured.
    """
    from triton.testing import do_bench

    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, peak


def paired_ratios(values: list[float], reference: list[float]) -> dict:
    """Round by round ratios of ``values`` to ``reference`` (timed next to each other in one round): their
    median and quartiles, which the machine's drift between rounds moves less than a ratio of best rounds."""
    ratios = sorted(v / r for v, r in zip(values, reference))
    n = len(ratios)
    return {"median": statistics.median(ratios), "q1": ratios[(n - 1) // 4], "q3": ratios[(3 * (n - 1) + 3) // 4],
            "ratios": ratios}


def save(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)

"""What ``verify=True`` costs: first call and a later call of MEGABYTE (naive attention), with and without.

    python benchmarks/bench_verify.py
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))
from common import environment  # noqa: E402


def seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from MEGABYTE_pytorch import MEGABYTE

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = MEGABYTE(num_tokens=256, dim=(128, 64), depth=(2, 2), max_seq_len=(64, 8), heads=4, dim_head=32,
                    flash_attn=False).to(device).eval()
    tokens = torch.randint(0, 256, (2, 512), device=device)
    print(environment())
    for verify in (False, True):
        torch._dynamo.reset()
        model = attnfuse.optimize(copy.deepcopy(base), verify=verify)
        with torch.no_grad():
            first = seconds(lambda: model(tokens))
            later = min(seconds(lambda: model(tokens)) for _ in range(5))
        print(f"verify={verify}: first call {first * 1e3:.0f} ms (capture + rewrite{' + check' if verify else ''}), "
              f"later calls {later * 1e3:.1f} ms, fused {attnfuse.report(model).fused}")


if __name__ == "__main__":
    main()

"""Render the benchmark JSON under docs/ as the markdown tables README.md shows (numbers are not typed).

    python benchmarks/render.py > /tmp/tables.md
"""
from __future__ import annotations

import glob
import json
import os

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def ops_table(path: str) -> str:
    data = json.load(open(path))
    env = data["environment"]
    lines = [f"Per op, {env['device']}, torch {env['torch']}, {env['date']}; TFLOP/s (causal counts half the FLOPs), "
             "16 heads, batch x n = 32k tokens; `best SDPA` is the fastest hand-written kernel that accepts the call.",
             "", "| pass | d | n | mask | naive | attnfuse | best SDPA (kernel) | attnfuse / best | vs naive | GB naive / attnfuse / SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        r = row["results"]
        if row["n"] not in (1024, 4096, 16384):
            continue
        kernels = {k[5:]: v for k, v in r.items() if k.startswith("sdpa_") and v and v["ms"]}
        best = min(kernels, key=lambda k: kernels[k]["ms"])
        fused, naive = r["attnfuse"], r["naive"]
        speedup = f"{naive['ms'] / fused['ms']:.1f}x" if naive["ms"] else "OOM"
        naive_tf = f"{naive['tflops']:.0f}" if naive["ms"] else "OOM"
        naive_gb = f"{naive['peak_gb']:.2f}" if naive["ms"] else "OOM"
        lines.append(f"| {row['pass']} | {row['d']} | {row['n']} | {row['mode']} | {naive_tf} | {fused['tflops']:.0f} | "
                     f"{kernels[best]['tflops']:.0f} ({best}) | {kernels[best]['ms'] / fused['ms']:.2f} | {speedup} | "
                     f"{naive_gb} / {fused['peak_gb']:.2f} / {kernels[best]['peak_gb']:.2f} |")
    return "\n".join(lines)


def models_table(paths: list[str]) -> str:
    rows, env = [], None
    for path in paths:
        data = json.load(open(path))
        env = data["environment"]
        rows += data["rows"]
    lines = [f"End to end, transformers models in eager mode (8 layers, hidden 1024, 16 heads, bf16), {env['device']}, "
             f"torch {env['torch']}, {env['date']}; ms per call (peak extra GB of the first call):", "",
             "| model | seq x batch | pass | eager | attnfuse.optimize | transformers `sdpa` | compile(eager) | "
             "compile(eager, backend=\"attnfuse\") | compile(`sdpa` model) |", "|---|---|---|---|---|---|---|---|---|"]
    keys = {}
    for row in rows:
        keys.setdefault((row["model"], row["seq"], row["batch"], row["pass"]), {})[row["variant"]] = row
    order = ["eager", "attnfuse", "hf_sdpa", "compile(eager)", "compile(eager, backend=attnfuse)", "compile(sdpa)"]
    for (model, seq, batch, kind), variants in keys.items():
        cells = []
        for name in order:
            row = variants.get(name)
            cells.append("-" if row is None else ("OOM" if row["ms"] is None else f"{row['ms']:.1f} ({row['peak_gb']:.1f})"))
        lines.append(f"| {model} | {seq} x {batch} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_table(path: str) -> str:
    data = json.load(open(path))
    env = data["environment"]
    row0 = data["rows"][0]
    lines = [f"Score modifications, causal, b={row0['b']} h={row0['h']} n={row0['n']} d={row0['d']} bf16, {env['device']}, "
             f"torch {env['torch']}, {env['date']}; ms:", "",
             "| site | pass | naive eager | SDPA + materialized bias (cuDNN) | attnfuse | hand-written Flex | "
             "attnfuse vs Flex | attnfuse GB / naive GB |", "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        r = row["results"]
        ms = lambda key: "-" if r[key]["ms"] is None else f"{r[key]['ms']:.2f}"  # noqa: E731
        ratio = r["flex"]["ms"] / r["attnfuse"]["ms"]
        lines.append(f"| {row['site']} | {row['pass']} | {ms('naive')} | {ms('sdpa_bias')} | {ms('attnfuse')} | "
                     f"{ms('flex')} | {ratio:.2f} | {r['attnfuse']['peak_gb']:.2f} / {r['naive']['peak_gb']:.2f} |")
    return "\n".join(lines)


def compile_table(path: str) -> str:
    data = json.load(open(path))
    env = data["environment"]
    lines = [f"torch.compile per op, d=64 n=4096 bf16, {env['device']}, torch {env['torch']}, {env['date']}; TFLOP/s:", "",
             "| pass | mask | naive eager | torch.compile(naive) | attnfuse eager | compile(backend=\"attnfuse\") | "
             "best SDPA |", "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        r = row["results"]
        tf = lambda key: "-" if not r.get(key) or r[key]["ms"] is None else f"{r[key]['tflops']:.0f}"  # noqa: E731
        best = max((r[k]["tflops"] for k in r if k.startswith("sdpa_") and r[k] and r[k]["ms"]), default=None)
        lines.append(f"| {row['pass']} | {row['mode']} | {tf('naive')} | {tf('compile_naive')} | {tf('attnfuse')} | "
                     f"{tf('compile_attnfuse')} | {best:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(ops_table(os.path.join(DOCS, "bench_ops_h100.json")))
    print()
    print(compile_table(os.path.join(DOCS, "bench_ops_compile_h100.json")))
    print()
    print(scores_table(os.path.join(DOCS, "bench_scores_h100.json")))
    print()
    print(models_table(sorted(glob.glob(os.path.join(DOCS, "bench_models_h100_*.json")))))

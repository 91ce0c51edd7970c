"""Render the benchmark JSON under docs/ as the markdown tables README.md shows (numbers are not typed).

    python benchmarks/render.py > /tmp/tables.md
"""
from __future__ import annotations

import glob
import json
import os

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def _best_sdpa(r: dict) -> tuple[str, dict]:
    kernels = {k[5:]: v for k, v in r.items() if k.startswith("sdpa_") and v and v["ms"]}
    best = min(kernels, key=lambda k: kernels[k]["ms"])
    return best, kernels[best]


def ops_table(path: str, lengths: tuple[int, ...] = (1024, 4096, 16384)) -> str:
    data = json.load(open(path))
    env = data["environment"]
    dtype = data["rows"][0]["dtype"]
    lines = [f"Per op, {dtype}, {env['device']}, torch {env['torch']}, {env['date']}; TFLOP/s (causal counts half the "
             "FLOPs), 16 heads, batch x n = 32k tokens; `best SDPA` is the fastest hand-written kernel that accepts the call.",
             "", "| pass | d | n | mask | naive | compile(naive) | attnfuse | compile(attnfuse) | best SDPA (kernel) | "
             "attnfuse / best | vs naive | GB naive / attnfuse / SDPA |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        r = row["results"]
        if row["n"] not in lengths:
            continue
        best, kernel = _best_sdpa(r)
        fused, naive = r["attnfuse"], r["naive"]
        tf = lambda key: "-" if not r.get(key) else ("OOM" if r[key]["ms"] is None else f"{r[key]['tflops']:.0f}")  # noqa: E731
        speedup = f"{naive['ms'] / fused['ms']:.1f}x" if naive["ms"] else "OOM"
        naive_gb = f"{naive['peak_gb']:.2f}" if naive["ms"] else "OOM"
        lines.append(f"| {row['pass']} | {row['d']} | {row['n']} | {row['mode']} | {tf('naive')} | {tf('compile_naive')} | "
                     f"{tf('attnfuse')} | {tf('compile_attnfuse')} | {kernel['tflops']:.0f} ({best}) | "
                     f"{kernel['ms'] / fused['ms']:.2f} | {speedup} | {naive_gb} / {fused['peak_gb']:.2f} / "
                     f"{kernel['peak_gb']:.2f} |")
    return "\n".join(lines)


def ratio_summary(paths: list[str]) -> str:
    """Speed relative to the best hand-picked SDPA kernel over every benchmarked shape, per dtype, pass and mask."""
    lines = ["Speed / best hand-picked SDPA kernel over every shape of the per-op runs (d 64 and 128, n 512 to 16384): "
             "min, median and max of each ratio, and the worst shape.", "",
             "| dtype | pass | mask | attnfuse eager | worst at (d, n) | compile(backend=\"attnfuse\") | worst at (d, n) | "
             "attention memory attnfuse / SDPA (max) |", "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            groups.setdefault((row["dtype"], row["pass"], row["mode"]), []).append(row)

    def stats(rows: list, key: str) -> tuple[str, str]:
        ratios = sorted((_best_sdpa(r["results"])[1]["ms"] / r["results"][key]["ms"], (r["d"], r["n"])) for r in rows
                        if r["results"].get(key) and r["results"][key]["ms"])
        if not ratios:
            return "-", "-"
        values = [value for value, _ in ratios]
        return f"{values[0]:.2f} / {values[len(values) // 2]:.2f} / {values[-1]:.2f}", f"{ratios[0][1]}"

    for (dtype, kind, mode), rows in groups.items():
        eager, eager_worst = stats(rows, "attnfuse")
        compiled, compiled_worst = stats(rows, "compile_attnfuse")
        memory = max(r["results"]["attnfuse"]["peak_gb"] / _best_sdpa(r["results"])[1]["peak_gb"] for r in rows)
        lines.append(f"| {dtype} | {kind} | {mode} | {eager} | {eager_worst} | {compiled} | {compiled_worst} | {memory:.2f} |")
    return "\n".join(lines)


def models_table(paths: list[str]) -> str:
    rows, env = [], None
    for path in paths:
        data = json.load(open(path))
        env = data["environment"]
        rows += data["rows"]
    lines = [f"End to end, models with hand-written attention (bf16), {env['device']}, torch {env['torch']}, "
             f"{env['date']}; ms per call (peak extra GB of a steady-state call). `own SDPA path`: transformers' `sdpa`, "
             "MEGABYTE's `flash_attn=True`, x-transformers' `attn_flash=True`.", "",
             "| model | seq x batch | pass | eager | attnfuse.optimize | own SDPA path | compile(eager) | "
             "compile(eager, backend=\"attnfuse\") | compile(own SDPA path) |", "|---|---|---|---|---|---|---|---|---|"]
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


def gpu_time_table(path: str) -> str:
    """A ``bench_models.py --gpu-time --rounds N`` run: GPU kernel ms per step beside the fastest wall ms."""
    data = json.load(open(path))
    env, rows = data["environment"], data["rows"]
    names = list(dict.fromkeys(row["variant"] for row in rows))
    wall = "one wall-clock run" if data["rounds"] == 1 else f"the fastest of {data['rounds']} wall-clock rounds"
    lines = [f"GPU kernel time per step (torch.profiler) and {wall}, "
             f"{rows[0]['model']}, bf16, {env['device']}, torch {env['torch']}, {env['date']}; ms, GPU / wall:", "",
             "| seq x batch | pass | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    cells: dict[tuple, dict] = {}
    for row in rows:
        cells.setdefault((row["seq"], row["batch"], row["pass"]), {})[row["variant"]] = row
    for (seq, batch, kind), variants in cells.items():
        values = [f"{variants[n]['gpu_ms']:.2f} / {variants[n]['ms']:.1f}" if n in variants else "-" for n in names]
        lines.append(f"| {seq} x {batch} | {kind} | " + " | ".join(values) + " |")
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


if __name__ == "__main__":
    print(ratio_summary([os.path.join(DOCS, "bench_ops_h100.json"), os.path.join(DOCS, "bench_ops_fp16_h100.json")]))
    print()
    print(ops_table(os.path.join(DOCS, "bench_ops_h100.json")))
    print()
    print(scores_table(os.path.join(DOCS, "bench_scores_h100.json")))
    print()
    print(models_table(sorted(glob.glob(os.path.join(DOCS, "bench_models_h100_*.json")))))
    for path in ("gpu_time_megabyte_h100.json", "gpu_time_megabyte_compile_h100.json"):
        print()
        print(gpu_time_table(os.path.join(DOCS, path)))

"""Plot the per-op benchmark (docs/bench_ops_h100.json) as TFLOP/s against sequence length.

    python benchmarks/plot.py   # writes docs/bench_ops_h100.png (needs matplotlib)
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def main() -> None:
    data = json.load(open(os.path.join(DOCS, "bench_ops_h100.json")))
    env = data["environment"]
    modes, passes = ["none", "causal", "padding"], ["fwd", "fwd+bwd"]
    fig, axes = plt.subplots(len(passes), len(modes), figsize=(13, 7), sharex=True)
    for row_index, kind in enumerate(passes):
        for col_index, mode in enumerate(modes):
            ax = axes[row_index][col_index]
            for d, style in ((64, "-"), (128, "--")):
                rows = [r for r in data["rows"] if r["pass"] == kind and r["mode"] == mode and r["d"] == d]
                rows.sort(key=lambda r: r["n"])
                n = [r["n"] for r in rows]

                def series(key):
                    return [r["results"][key]["tflops"] if r["results"].get(key) and r["results"][key]["ms"] else None
                            for r in rows]

                best = [max((r["results"][k]["tflops"] for k in r["results"] if k.startswith("sdpa_")
                             and r["results"][k] and r["results"][k]["ms"]), default=None) for r in rows]
                ax.plot(n, series("naive"), style, color="tab:red", label=f"naive eager d{d}")
                ax.plot(n, best, style, color="tab:gray", label=f"best SDPA kernel d{d}")
                ax.plot(n, series("compile_naive"), style, color="tab:orange", label=f"torch.compile(naive) d{d}")
                ax.plot(n, series("attnfuse"), style, color="tab:blue", marker="o", ms=3, label=f"attnfuse d{d}")
                ax.plot(n, series("compile_attnfuse"), style, color="tab:green", marker="x", ms=3,
                        label=f'compile(backend="attnfuse") d{d}')
            ax.set_xscale("log", base=2)
            ax.set_title(f"{kind}, mask: {mode}")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("sequence length n (batch x n = 32k tokens, 16 heads)")
    fig.suptitle(f"attnfuse per op, bf16, {env['device']}, torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "bench_ops_h100.png"), dpi=110)


if __name__ == "__main__":
    main()

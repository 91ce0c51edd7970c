"""Where the first call of ``attnfuse.optimize(model)`` spends its time, phase by phase.

    python benchmarks/bench_first_call.py [--rounds 3] [--seq 1024] [--modes eager,verify,dynamo]
        [--cases llama,mistral,megabyte,xtransformers,seeds] [--checkouts before=/old/checkout,after=.]
        [--out docs/bench_first_call_cpu.json]

Each (checkout, case, mode) runs in a fresh subprocess, so Dynamo's caches are cold: the model is built
(random weights, seeded), called eagerly (its first call ``eager1`` and best later one ``eager``), then
optimized, and its first call is timed with a wall clock and split with ``report.timings``: Dynamo's
capture, attnfuse's own rewrite (copy, effects, canonicalize, matching, lowering: ``own``, and the most
for one graph, ``own/gr``), the compile (Inductor with ``--modes inductor``), the first run of the
rewritten graph, and verification (``verify`` mode); ``other`` is what no phase accounts for. Mode
``dynamo`` is ``torch.compile(model, backend="eager")``: Dynamo's capture with no attnfuse at all.
The subprocesses of the checkouts, cases and modes run in turn, ``--rounds`` times (A, B, A, B, ...), and
each keeps its fastest round by first-call wall time; every round is in the JSON. Models: 8-layer
transformers Llama and Mistral (sliding window of half the sequence) in ``attn_implementation="eager"``
(hidden 256), MEGABYTE (naive attention, 4 + 4 layers), an x-transformers decoder (naive ``Attend``, 8
layers), and an 8-layer stack of the seed ``Attend`` forms of ``tests/seed_modules.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = ("llama", "mistral", "megabyte", "xtransformers", "seeds")
MODES = {"eager": {}, "verify": {"verify": True}, "inductor": {"compiler": "inductor"},
         "dynamo": None}  # torch.compile(model, backend="eager"): Dynamo's capture alone, no attnfuse
OWN = ("copy", "effects", "canonicalize", "matching", "lowering")
SHOWN = ("capture", "own", "compile", "first_run", "verification", "other")


# ----------------------------------------------------------------------------- one case, in its own process

def build(case: str, seq: int = 64):
    """``(model, inputs)`` for ``case``: 8 attention layers, random weights, seeded; ``seq`` tokens a row."""
    import torch

    torch.manual_seed(0)
    if case in ("llama", "mistral"):
        import transformers

        settings = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(512, seq),
                        attn_implementation="eager")
        if case == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
        else:
            model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=seq // 2, **settings))
        model.config.use_cache = False
        return model.eval(), {"input_ids": torch.randint(0, 1000, (2, seq))}
    if case == "megabyte":
        from MEGABYTE_pytorch import MEGABYTE

        model = MEGABYTE(num_tokens=256, dim=(128, 64), depth=(4, 4), max_seq_len=(seq // 4, 8), heads=4, dim_head=32,
                         flash_attn=False)
        return model.eval(), {"ids": torch.randint(0, 256, (2, seq * 2))}
    if case == "xtransformers":
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(num_tokens=1000, max_seq_len=seq,
                                   attn_layers=Decoder(dim=256, depth=8, heads=8))
        return model.eval(), {"x": torch.randint(0, 1000, (2, seq))}
    if case == "seeds":
        return _seed_stack(seq), {"x": torch.randn(2, seq, 256), "mask": torch.rand(2, seq) > 0.2}
    raise ValueError(f"unknown case {case}")


def _seed_stack(seq: int):
    """Eight pre-norm blocks, each around one of the seed ``Attend`` forms (causal, padding mask, bias)."""
    import torch
    from torch import nn

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from seed_modules import BiasThenCausalStyle, GenomicsStyle, MegabyteStyle, PaddingStyle

    class Block(nn.Module):
        def __init__(self, kind: int, dim: int = 256, heads: int = 8):
            super().__init__()
            self.kind, self.heads = kind, heads
            self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.attend = [MegabyteStyle(causal=True), PaddingStyle(), GenomicsStyle(causal=True),
                           BiasThenCausalStyle(causal=True)][kind]
            self.bias = nn.Parameter(torch.zeros(heads, seq, seq)) if kind in (2, 3) else None

        def forward(self, x, mask):
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if self.kind == 1:
                out = self.attend(q, k, v, mask=mask)
            elif self.kind in (2, 3):
                out = self.attend(q, k, v, self.bias[:, :n, :n]) if self.kind == 3 else \
                    self.attend(q, k, v, attn_bias=self.bias[:, :n, :n])
            else:
                out = self.attend(q, k, v)
            return x + self.out(out.transpose(1, 2).reshape(b, n, d))

    class SeedStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(i % 4) for i in range(8))

        def forward(self, x, mask):
            for block in self.blocks:
                x = block(x, mask)
            return x

    return SeedStack().eval()


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_case(case: str, mode: str, seq: int) -> dict:
    """The first call of ``case`` under ``mode``, timed and split (in this process, which must be fresh)."""
    import torch

    import attnfuse

    torch.set_num_threads(1)
    model, inputs = build(case, seq)
    with torch.no_grad():
        eager_first = _seconds(lambda: model(**inputs))
        eager = min(_seconds(lambda: model(**inputs)) for _ in range(3))
        if MODES[mode] is None:
            model = torch.compile(model, backend="eager")
        else:
            attnfuse.optimize(model, **MODES[mode])
        wall = _seconds(lambda: model(**inputs))
        later = min(_seconds(lambda: model(**inputs)) for _ in range(3))
    result = {"case": case, "mode": mode, "seq": seq, "first_call_s": wall, "eager_first_s": eager_first,
              "eager_s": eager, "later_call_s": later}
    if MODES[mode] is None:
        return result
    report = attnfuse.report(model)
    timings = report.timings
    total = timings.total.to_dict()
    phases = {"capture": total["capture"] or 0.0, "own": timings.attnfuse_own, "compile": total["compile"],
              "first_run": total["first_run"], "verification": total["verification"]}
    phases["other"] = wall - sum(phases.values())
    return result | {"fused": report.fused, "sites": len(report.sites), "graphs": len(timings.graphs),
                     "phases_s": phases, "own_s": {name: total[name] for name in OWN},
                     "own_per_graph_max_s": timings.attnfuse_own_per_graph,
                     "per_graph": [graph.to_dict() for graph in timings.graphs]}


def rewrite_only(case: str, seq: int, repeats: int = 5) -> dict:
    """attnfuse's own phases for one graph of ``case``, captured once: the backend run on ``repeats`` fresh
    copies of it in this process (best of them per phase), which isolates the rewrite from Dynamo."""
    import copy

    import torch

    from attnfuse import logs
    from attnfuse.capture import AttnfuseBackend
    from attnfuse.options import Options

    torch.set_num_threads(1)
    model, inputs = build(case, seq)
    captured = []

    def keep(gm, example_inputs):
        captured.append((copy.deepcopy(gm), list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=keep)(**inputs)
    gm, example_inputs = captured[0]
    backend, best = AttnfuseBackend(Options()), {}
    for graph in [copy.deepcopy(gm) for _ in range(repeats)]:
        timings = backend(graph, example_inputs).timings
        for name in logs.Timings.ATTNFUSE_OWN:
            best[name] = min(best.get(name, float("inf")), getattr(timings, name))
    return {"case": case, "seq": seq, "nodes": len(gm.graph.nodes), "own_s": best, "own_total_s": sum(best.values())}


# ----------------------------------------------------------------------------- the driver

def _child(checkout: str, *arguments: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *arguments], env=env,
                          capture_output=True, text=True, cwd=os.path.abspath(checkout))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{checkout} {arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _row(label: str, result: dict) -> str:
    wall = result["first_call_s"]
    eager = f"  {result['eager_first_s']:6.3f} {result['eager_s']:6.3f}"
    if "phases_s" not in result:  # Dynamo alone
        return f"{label:<34} {'':>2} {'':>5} {wall:6.2f}  " + "  ".join(f"{'-':>11}" for _ in SHOWN) + \
            f"  {'-':>6}" + eager
    phases = result["phases_s"]
    cells = [f"{phases[name]:6.2f} {100 * phases[name] / wall:3.0f}%" for name in SHOWN]
    return (f"{label:<34} {result['graphs']:>2} {result['fused']:>2}/{result['sites']:<2} {wall:6.2f}  " + "  ".join(cells)
            + f"  {result['own_per_graph_max_s']:6.3f}" + eager)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CASE", "MODE", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=1024, help="tokens a row (MEGABYTE: twice as many bytes)")
    parser.add_argument("--child-rewrite", nargs=2, metavar=("CASE", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--rewrite-seq", type=int, default=2048,
                        help="also time the rewrite alone of the Llama and Mistral graphs at this length (0: not)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--modes", default="eager,verify,dynamo")
    parser.add_argument("--checkouts", default=f"this={ROOT}",
                        help="label=path pairs: each label's subprocesses import attnfuse from that checkout")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench_first_call_cpu.json"))
    args = parser.parse_args()
    if args.child_rewrite:
        print(json.dumps(rewrite_only(args.child_rewrite[0], int(args.child_rewrite[1]))))
        return
    if args.child:
        case, mode, seq = args.child
        print(json.dumps(run_case(case, mode, int(seq))))
        return

    sys.path.insert(0, HERE)
    from common import environment

    checkouts = dict(pair.split("=", 1) for pair in args.checkouts.split(","))
    first_label = next(iter(checkouts))
    jobs = [(label, case, mode) for case in args.cases.split(",") for mode in args.modes.split(",")
            for label in checkouts if MODES[mode] is not None or label == first_label]  # Dynamo alone: once
    rounds: dict[tuple, list[dict]] = {job: [] for job in jobs}
    for number in range(args.rounds):
        for job in jobs:
            rounds[job].append(_child(checkouts[job[0]], "--child", job[1], job[2], str(args.seq)))
            print(f"round {number + 1}: {' '.join(job)}: {rounds[job][-1]['first_call_s']:.2f} s", file=sys.stderr)
    best = {job: min(results, key=lambda r: r["first_call_s"]) for job, results in rounds.items()}

    env = environment()
    print(f"{env['device']}, torch {env['torch']}, {env['date']}; {args.seq} tokens; best of {args.rounds} interleaved "
          "rounds, each call in a fresh process; seconds and share of the first call (dynamo: torch.compile with "
          "backend='eager', no attnfuse)")
    print(f"{'checkout case mode':<34} gr fused  first   " + "  ".join(f"{name:>11}" for name in SHOWN)
          + "  own/gr  eager1  eager")
    for job in jobs:
        print(_row(" ".join(job), best[job]))
    if len(checkouts) == 2:
        first, second = checkouts
        for case in args.cases.split(","):
            for mode in [m for m in args.modes.split(",") if MODES[m] is not None]:
                a, b = best[(first, case, mode)], best[(second, case, mode)]
                print(f"{case} {mode}: attnfuse's own {a['phases_s']['own']:.3f} -> {b['phases_s']['own']:.3f} s "
                      f"({a['phases_s']['own'] / max(b['phases_s']['own'], 1e-9):.2f}x), first call "
                      f"{a['first_call_s']:.2f} -> {b['first_call_s']:.2f} s")

    rewrites = []
    if args.rewrite_seq:
        print(f"the rewrite alone (one graph, captured once, best of 5 copies in one process), {args.rewrite_seq} tokens:")
        for case in ("llama", "mistral"):
            for label, checkout in checkouts.items():
                found = _child(checkout, "--child-rewrite", case, str(args.rewrite_seq)) | {"checkout": label}
                rewrites.append(found)
                own = ", ".join(f"{name} {value * 1e3:.1f}" for name, value in found["own_s"].items())
                print(f"  {label} {case} ({found['nodes']} nodes): {found['own_total_s']:.3f} s ({own} ms)")

    payload = {"environment": env, "rewrite_only": rewrites, "seq": args.seq, "rounds": args.rounds, "checkouts": checkouts,
               "method": "each call in a fresh subprocess (cold Dynamo caches), OMP_NUM_THREADS=1; jobs interleaved "
                         "round by round; best round by first-call wall time",
               "best": [best[job] | {"checkout": job[0]} for job in jobs],
               "all_rounds": [r | {"checkout": job[0]} for job in jobs for r in rounds[job]]}
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

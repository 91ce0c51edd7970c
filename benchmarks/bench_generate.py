"""Generation: transformers ``generate`` on a small eager Llama, eager vs attnfuse vs transformers' ``sdpa``.

    python benchmarks/bench_generate.py --rounds 5 [--pad 16] [--static] [--compiled] [--per-call] [--device cpu]

A 4-layer Llama (hidden 256, GQA 8/2, random weights from a config, no download) decodes ``--new-tokens``
greedy tokens for a batch of ``--batch`` prompts of ``--prompt`` tokens (half the batch left-padded by
``--pad`` tokens when given), with a ``DynamicCache`` (``--static``: a ``StaticCache``). Variants: the eager
model, the eager model under ``attnfuse.optimize`` and transformers' ``sdpa`` model, all with the same
weights; ``generate``'s own compilation of a static-cache forward is turned off (``disable_compile``), so
this is the eager route. ``--compiled`` (implies ``--static``) times the compiled route instead: transformers'
recommended fast path (a static cache, whose forward ``generate`` compiles with Inductor in
``reduce-overhead`` mode, CUDA graphs) for the ``sdpa`` model and for the eager model, against the eager
model compiled the same way through attnfuse (``CompileConfig(backend="attnfuse")``: attnfuse's rewrite,
then Inductor in the same mode). Each variant runs once untimed (capture, rewrite, first shapes), then the variants are timed in
turn (A, B, C, A, B, C, ...) for ``--rounds`` rounds and each keeps its fastest round: small models decode
bound by host time, which varies between runs on a shared machine. Tokens/s counts the batch's new tokens.

``--per-call``: one fused site at q_len 1 against S cached keys (S = ``--lengths``), the call a decode step
makes per layer: transformers' own ``eager_attention_forward`` (Llama's, additive ``(B, 1, 1, S)`` mask)
rewritten by attnfuse and its fused call timed directly (``lower.run_site``), against the same eager ops
and a bare ``F.scaled_dot_product_attention`` on the same tensors; the difference attnfuse - SDPA is
attnfuse's host overhead per call. Timed interleaved, best of rounds, in microseconds.

Prints tables with ratios, device, torch and date; writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import paired_ratios, save  # noqa: E402

VOCAB = 1000


def environment(device: torch.device) -> dict:
    """Device, torch and transformers versions, date and threads of this run."""
    import platform

    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": date.today().isoformat()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_llama(implementation: str, device: torch.device, dtype: torch.dtype, layers: int, hidden: int,
                heads: int, kv_heads: int, max_positions: int) -> torch.nn.Module:
    """A Llama with random weights (seed 0, the same for every implementation), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, attn_implementation=implementation,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def prompts(batch: int, length: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; the second half of the batch left-padded by ``pad`` tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[batch // 2:, :pad] = 0
        ids[batch // 2:, :pad] = 0
    return ids.to(device), mask.to(device)


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
             static: bool, compile_backend: Optional[str] = None) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens; ``generate`` compiles the static-cache forward with
    ``compile_backend`` (its default mode, ``reduce-overhead``) when given, else runs it eagerly."""
    from transformers import CompileConfig

    extra = {"cache_implementation": "static"} if static else {}
    if compile_backend is None:
        extra["disable_compile"] = True
    else:
        extra["compile_config"] = CompileConfig(backend=compile_backend)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **extra)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def bench_generate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Tokens/s per variant, best of interleaved rounds, and whether each decoded eager's tokens."""
    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                 max_positions=max(4096, args.prompt + args.new_tokens))
    if args.compiled:  # (model, backend generate compiles the static-cache forward with)
        variants = {"eager": (build_llama("eager", device, dtype, **shape), "inductor"),
                    "attnfuse": (build_llama("eager", device, dtype, **shape), "attnfuse"),
                    "sdpa": (build_llama("sdpa", device, dtype, **shape), "inductor")}
    else:
        variants = {"eager": (build_llama("eager", device, dtype, **shape), None),
                    "attnfuse": (attnfuse.optimize(build_llama("eager", device, dtype, **shape)), None),
                    "sdpa": (build_llama("sdpa", device, dtype, **shape), None)}
        if args.floor:  # Dynamo's own per-step cost on the same eager model, without attnfuse's rewrite
            floor = build_llama("eager", device, dtype, **shape)
            floor.compile(backend="eager")
            variants["dynamo_eager_backend"] = (floor, None)
    static = args.static or args.compiled
    ids, mask = prompts(args.batch, args.prompt, args.pad, device)
    tokens, first = {}, {}
    for name, (model, backend) in variants.items():
        first[name], tokens[name] = timed(lambda: generate(model, ids, mask, args.new_tokens, static, backend), device)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, backend) in variants.items():
            seconds, _ = timed(lambda: generate(model, ids, mask, args.new_tokens, static, backend), device)
            rounds[name].append(args.batch * args.new_tokens / seconds)
    best = {name: max(values) for name, values in rounds.items()}
    paired = {name: paired_ratios(rounds[name], rounds["sdpa"]) for name in variants if name != "sdpa"}
    if args.profile:
        profile_steps(variants, ids, mask, args, static, device)
    report = attnfuse.last_report() if args.compiled else attnfuse.report(variants["attnfuse"][0])
    return {"config": {**shape, "batch": args.batch, "prompt": args.prompt, "pad": args.pad,
                       "new_tokens": args.new_tokens, "cache": "static" if static else "dynamic",
                       "route": "compiled (generate's static-cache compile, reduce-overhead)" if args.compiled
                       else "eager", "dtype": str(dtype).replace("torch.", "")},
            "tokens_per_s": best, "rounds": rounds, "first_call_s": first,
            "ratios": {"attnfuse/eager": best["attnfuse"] / best["eager"],
                       "attnfuse/sdpa": best["attnfuse"] / best["sdpa"], "sdpa/eager": best["sdpa"] / best["eager"]},
            "paired_vs_sdpa": paired,
            "same_tokens_as_eager": {name: bool(torch.equal(t, tokens["eager"])) for name, t in tokens.items()},
            "fused_sites": None if report is None else report.to_dict()["fused"]}


def profile_steps(variants: dict, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace, static: bool,
                  device: torch.device) -> None:
    """Per variant, one profiled ``generate``: the host's busiest operators and the synchronizations, to
    show where a variant's host time per decoded token goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, (model, backend) in variants.items():
        with profile(activities=activities) as prof:
            generate(model, ids, mask, args.new_tokens, static, backend)
        events = prof.key_averages()
        print(f"\nprofile of {name}: {args.new_tokens} new tokens")
        syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key or
                 e.key in ("aten::item", "aten::_local_scalar_dense")}
        print(f"  synchronizations and copies: {syncs}")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]:
            print(f"  {event.key[:70]:70s} calls {event.count:6d}  self cpu {event.self_cpu_time_total / 1e3:9.2f} ms")


# ----------------------------------------------------------------------------- one fused call

class DecodeAttention(torch.nn.Module):
    """Llama's eager attention as transformers writes it (``eager_attention_forward``), output only. With
    ``causal`` the additive mask is built in the graph as a bottom-right causal triangle over the cache (the
    form a decode step without padding takes); otherwise a ``(B, 1, 1, S)`` ``0 / finfo.min`` mask is built in
    the graph from the 0/1 padding mask passed in, as transformers builds it once per forward."""

    def __init__(self, kv_groups: int, causal: bool) -> None:
        super().__init__()
        self.num_key_value_groups, self.causal = kv_groups, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        if self.causal:
            L, S = q.shape[-2], k.shape[-2]
            mask = torch.full((L, S), torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype).triu(S - L + 1)
        else:
            zero = torch.zeros((), device=q.device, dtype=q.dtype)
            mask = torch.where(mask.bool()[:, None, None, :], zero, torch.finfo(q.dtype).min)
        return eager_attention_forward(self, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


def fused_call(module: torch.nn.Module, inputs: tuple) -> tuple[Callable, tuple]:
    """The fused site function attnfuse puts in ``module``'s graph and the tensors it is called with."""
    from attnfuse.capture import backend_for
    from attnfuse.options import Options

    graphs = []

    def grab(gm, example_inputs):
        graphs.append((backend_for(Options())(gm, example_inputs).graph_module, list(example_inputs)))
        return gm.forward

    torch.compile(module, backend=grab, fullgraph=True, dynamic=False)(*inputs)
    (graph, example_inputs), = graphs
    found = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if hasattr(target, "plan"):
                found.append((target, args))
            return super().call_function(target, args, kwargs)

    Recorder(graph).run(*example_inputs)
    if len(found) != 1:
        raise RuntimeError(f"expected one fused site, found {len(found)}")
    return found[0]


def best_microseconds(calls: dict[str, Callable[[], object]], rounds: int, repeats: int,
                      device: torch.device) -> dict[str, float]:
    """Each call's fastest mean time over ``repeats`` calls, the calls timed in turn for ``rounds`` rounds."""
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1e6)
    return best


def bench_per_call(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Per-call microseconds of the fused site, the eager ops and bare SDPA at q_len 1 against S keys, for a
    padding mask passed in (``bias``: the left-padded decode step) and a causal mask built in the graph."""
    B, H, Hk, d = args.batch, args.heads, args.kv_heads, args.hidden // args.heads
    rows = []
    for form, S in ((form, S) for form in ("bias", "causal") for S in args.lengths):
        module = DecodeAttention(H // Hk, causal=form == "causal")
        generator = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(B, h, n, d, generator=generator).to(device, dtype)
                   for h, n in ((H, 1), (Hk, S), (Hk, S)))
        mask = torch.ones(B, S, dtype=torch.long)  # transformers' attention_mask: 0 at padding
        if args.pad:
            mask[B // 2:, :args.pad] = 0
        mask = mask.to(device)
        site, site_args = fused_call(module, (q, k, v, mask))
        with torch.no_grad():
            # q_len 1, bottom-right: every key is kept; the padding as SDPA's boolean mask
            bare_mask = None if form == "causal" else mask.bool()[:, None, None, :]
            calls = {"attnfuse": lambda: site(*site_args),
                     "eager ops": lambda: module(q, k, v, mask),
                     "bare sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bare_mask, enable_gqa=True)}
            best = best_microseconds(calls, args.rounds, args.repeats, device)
        rows.append({"mask": form, "S": S, "us": best, "attnfuse_overhead_us": best["attnfuse"] - best["bare sdpa"],
                     "kernel": site.plan.record.kernel})
    return rows


# ----------------------------------------------------------------------------- main

def print_generate(result: dict, rounds: int) -> None:
    config, best, paired = result["config"], result["tokens_per_s"], result["paired_vs_sdpa"]
    print(f"\ngenerate: {config}")
    print(f"| variant | tokens/s (best of {rounds}) | vs eager | vs sdpa | vs sdpa, round by round: median (quartiles) "
          "| same tokens as eager |")
    print("|---|---|---|---|---|---|")
    for name, value in best.items():
        pair = paired.get(name)
        rounds_text = "-" if pair is None else f"{pair['median']:.3f}x ({pair['q1']:.3f}-{pair['q3']:.3f})"
        print(f"| {name} | {value:.0f} | {value / best['eager']:.2f}x | {value / best['sdpa']:.2f}x | {rounds_text} | "
              f"{result['same_tokens_as_eager'][name]} |")


def print_per_call(rows: list[dict], rounds: int) -> None:
    print(f"\none fused call at q_len 1 (us, best of {rounds} interleaved rounds)")
    print("| mask | S | attnfuse | eager ops | bare sdpa | attnfuse - sdpa | kernel |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        us = row["us"]
        print(f"| {row['mask']} | {row['S']} | {us['attnfuse']:.1f} | {us['eager ops']:.1f} | {us['bare sdpa']:.1f} | "
              f"{row['attnfuse_overhead_us']:.1f} | {row['kernel']} |")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--pad", type=int, default=0, help="left-pad half the batch by this many tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--static", action="store_true", help="StaticCache instead of DynamicCache")
    parser.add_argument("--compiled", action="store_true",
                        help="the compiled route: static cache, generate's own compile (reduce-overhead)")
    parser.add_argument("--profile", action="store_true", help="print a host profile of one generate per variant")
    parser.add_argument("--floor", action="store_true",
                        help="also time the eager model under torch.compile(backend='eager'): Dynamo's own per-step cost")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-call", action="store_true", help="also time one fused call at q_len 1")
    parser.add_argument("--lengths", default="64,256,1024,4096", help="cached keys S for --per-call")
    parser.add_argument("--repeats", type=int, default=200, help="calls per timed round in --per-call")
    parser.add_argument("--no-generate", action="store_true", help="only --per-call")
    parser.add_argument("--out", default="docs/bench_generate_cpu.json")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.compiled and device.type != "cuda":
        raise SystemExit("--compiled times generate's own compile of a static-cache forward, which transformers "
                         "does only on accelerators; run it with --device cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    print(env)
    payload: dict = {"environment": env, "rounds": args.rounds, "timing": "best of interleaved rounds, one process"}
    if not args.no_generate:
        payload["generate"] = bench_generate(args, device, dtype)
        print_generate(payload["generate"], args.rounds)
    if args.per_call:
        payload["per_call"] = bench_per_call(args, device, dtype)
        print_per_call(payload["per_call"], args.rounds)
    if args.out:
        save(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

"""Host time of a decode step: attnfuse's fused call against a bare SDPA call, and a whole decode step.

    python benchmarks/bench_host_overhead.py [--rounds 7] [--repeats 200] [--batches 1,8] [--lengths 64,512]
                                             [--profile] [--device cpu] [--out docs/bench_host_overhead_cpu.json]

A decode step of a small model is bound by host time, which is host time on any device: the kernels here
are tiny (heads of 8 dims, fp32 on the CPU by default) so that what is timed is the Python and dispatch
around them.

``per_call``: one site at q_len 1 against S cached keys, the call a decode step makes per layer:
transformers' own ``eager_attention_forward`` (Llama's, GQA 4/2) rewritten by attnfuse, its fused call
timed directly (``lower.run_site``, as the rewritten graph calls it) and, one level down, the
``attnfuse.attend`` call it makes (the same arguments), against a bare ``F.scaled_dot_product_attention``
on the same tensors with the mask transformers' ``sdpa`` path would pass. Masks: ``none`` (a causal
triangle built in the graph, which at q_len 1 keeps every key), ``zeros`` (transformers' additive
``(B, 1, 1, S)`` mask of an unpadded batch: 0 everywhere; its ``sdpa`` path passes no mask) and ``padded``
(the same mask with half the batch left-padded; its ``sdpa`` path passes a boolean mask).

``decode_step``: one decode step of a tiny 8-layer transformers Llama (``DynamicCache``, prompt ``--prompt``,
the step's key appended and cropped again, so every step sees the same cache length): the eager model under
``attnfuse.optimize``, transformers' ``sdpa`` model, the eager model, and the eager model under
``torch.compile(backend="eager")`` (Dynamo's own share: its guards and frame handling with no rewrite).
Also: graphs run and guards evaluated per step for the two Dynamo variants.

``model_call``: what ``attnfuse.optimize`` installs on a model, called around a stub of the ``torch.compile`` result
(``torch.compile`` replaced while ``optimize`` runs), against the stub alone: attnfuse's own host time per model
call outside Dynamo and the graphs; and ``CompiledGraph.__call__`` of an identity graph against the graph's run.

Every variant of a table is timed in turn (A, B, C, A, B, C, ...) for ``--rounds`` rounds, each keeping its
fastest mean over ``--repeats`` calls. ``--profile`` prints cProfile's busiest functions of the fused call.
Prints tables with ratios, device, torch and date; writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from bench_generate import DecodeAttention, best_microseconds, build_llama, environment, fused_call  # noqa: E402
from common import save  # noqa: E402

MASKS = ("none", "zeros", "padded")


# ----------------------------------------------------------------------------- one fused call

def attend_call(site: Callable, site_args: tuple) -> tuple[Callable, tuple, dict]:
    """The call the fused site makes one level down (``attnfuse.attend``, or ``checked_attend`` where the lowering
    calls that), with the arguments of one call (recorded) and the audit's callback dropped."""
    import attnfuse.lower as lower

    name = "checked_attend" if hasattr(lower, "checked_attend") else "attend"
    real, recorded = getattr(lower, name), []

    def recording(*args, **kwargs):
        recorded.append((args, kwargs))
        return real(*args, **kwargs)

    setattr(lower, name, recording)
    try:
        site(*site_args)
    finally:
        setattr(lower, name, real)
    (args, kwargs), = recorded
    if name == "attend":
        return real, args, {**kwargs, "on_kernel": None}
    return real, args[:-1] + (None,), kwargs


def attnfuse_mask(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The mask tensor the recorded call hands on (its bias, else its keep-mask), for a bare SDPA call."""
    if kwargs:
        return kwargs["bias"] if kwargs["bias"] is not None else kwargs["mask"]
    keep, bias = args[3], args[4]
    return bias if bias is not None else keep


def decode_inputs(B: int, S: int, heads: int, kv_heads: int, head_dim: int, mask: str, device: torch.device,
                  dtype: torch.dtype) -> tuple:
    """q ``(B, H, 1, d)``, k and v ``(B, Hk, S, d)`` and transformers' 0/1 ``attention_mask`` ``(B, S)`` (half the
    batch left-padded by S/4 tokens for ``padded``; one row padded where B is 1)."""
    generator = torch.Generator().manual_seed(S + B)
    q, k, v = (torch.randn(B, h, n, head_dim, generator=generator).to(device, dtype)
               for h, n in ((heads, 1), (kv_heads, S), (kv_heads, S)))
    attention_mask = torch.ones(B, S, dtype=torch.long)
    if mask == "padded":
        attention_mask[B // 2:, :S // 4] = 0
    return q, k, v, attention_mask.to(device)


def bench_per_call(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Microseconds per call of the fused site, of its ``attend`` call and of bare SDPA, per mask, batch and S."""
    rows = []
    for mask in MASKS:
        for B in args.batches:
            for S in args.lengths:
                q, k, v, attention_mask = decode_inputs(B, S, args.heads, args.kv_heads, args.head_dim, mask, device,
                                                        dtype)
                module = DecodeAttention(args.heads // args.kv_heads, causal=mask == "none")
                torch._dynamo.reset()  # one capture of the same forward per configuration: no recompile limit
                site, site_args = fused_call(module, (q, k, v, attention_mask))
                below, below_args, below_kwargs = attend_call(site, site_args)
                # what transformers' sdpa path passes at q_len 1: no mask unless some key is padded
                sdpa_mask = attention_mask.bool()[:, None, None, :] if mask == "padded" else None
                with torch.no_grad():
                    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
                    loose = dtype in (torch.float16, torch.bfloat16)  # another kernel may take the call
                    torch.testing.assert_close(site(*site_args), expected, atol=2e-2 if loose else None,
                                               rtol=2e-2 if loose else None)
                    # the mask as attnfuse hands it on: its host cost apart from what the mask costs the kernel
                    own_mask = attnfuse_mask(below_args, below_kwargs)
                    q4, k4, v4 = below_args[:3]
                    scale = below_kwargs["scale"] if below_kwargs else below_args[10]
                    calls = {"fused site": lambda: site(*site_args),
                             "attend": lambda: below(*below_args, **below_kwargs),
                             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask,
                                                                            enable_gqa=True),
                             "sdpa, same mask": lambda: F.scaled_dot_product_attention(
                                 q4, k4, v4, attn_mask=own_mask, scale=scale, enable_gqa=True)}
                    us = best_microseconds(calls, args.rounds, args.repeats, device)
                rows.append({"mask": mask, "batch": B, "S": S, "us": us, "kernel": site.plan.record.kernel,
                             "fused_over_sdpa": us["fused site"] / us["sdpa"],
                             "overhead_us": us["fused site"] - us["sdpa"],
                             "overhead_same_mask_us": us["fused site"] - us["sdpa, same mask"]})
                if args.profile and B == args.batches[-1] and S == args.lengths[-1]:
                    with torch.no_grad():
                        print(f"\ncProfile of the fused call, mask {mask}, batch {B}, S {S}:")
                        print(profile_text(lambda: site(*site_args), 2000, args.profile_lines))
    return rows


def profile_text(call: Callable[[], object], repeats: int, lines: int) -> str:
    """cProfile's busiest functions (by own time) over ``repeats`` calls."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# ----------------------------------------------------------------------------- a whole decode step

def decode_step(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor) -> Callable[[], object]:
    """One decode step after a prefill of ``ids``: the next token's forward over the cache, whose new key is then
    cropped away, so every step sees the same cache length."""
    from transformers import DynamicCache

    B, P = ids.shape
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    step_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
    positions = attention_mask.sum(-1, keepdim=True)  # left padding: each row's own next position
    position_ids = positions.clone() if bool((attention_mask == 0).any()) else torch.full((B, 1), P,
                                                                                        device=ids.device)

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=token, attention_mask=step_mask, past_key_values=cache, use_cache=True,
                        position_ids=position_ids).logits
        cache.crop(-1)
        return out

    return step


class CountingEager:
    """A Dynamo backend that runs the graph as captured and counts the graph calls (``torch.compile``'s
    ``backend="eager"`` with a counter)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def guard_counts(model: torch.nn.Module, reference: CountingEager) -> dict[str, Optional[list[int]]]:
    """Leaf guards of each entry Dynamo holds for ``model``'s outermost ``forward`` frame (the first frame it
    compiles), by whose backend compiled it: ``reference``'s or another's (attnfuse's); None where this torch
    lacks the private API."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        def count(manager) -> int:
            return len(manager.get_leaf_guards()) + sum(count(child) for child in manager.get_child_managers())

        found: dict[str, Optional[list[int]]] = {"attnfuse": [], "dynamo eager": []}
        for entry in _debug_get_cache_entry_list(type(model).forward.__code__):
            ours = getattr(entry.backend, "compiler_fn", entry.backend) is reference
            found["dynamo eager" if ours else "attnfuse"].append(count(entry.guard_manager.root))
        return found
    except Exception:  # noqa: BLE001 - a private API that may differ in another torch
        return {"attnfuse": None, "dynamo eager": None}


def attnfuse_graph_calls(step: Callable[[], object]) -> int:
    """How many rewritten graphs one call of ``step`` runs."""
    from attnfuse.capture import CompiledGraph

    real, count = CompiledGraph.__call__, [0]

    def counting(self, *args):
        count[0] += 1
        return real(self, *args)

    CompiledGraph.__call__ = counting
    try:
        step()
    finally:
        CompiledGraph.__call__ = real
    return count[0]


def bench_decode_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Microseconds per decode step of the tiny Llama per variant, without and with left padding."""
    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                 max_positions=4096)
    rows = []
    for padded in (False, True):
        counting = CountingEager()
        models = {"attnfuse": attnfuse.optimize(build_llama("eager", device, dtype, **shape)),
                  "sdpa": build_llama("sdpa", device, dtype, **shape),
                  "eager": build_llama("eager", device, dtype, **shape)}
        dynamo = build_llama("eager", device, dtype, **shape)
        dynamo.compile(backend=counting)  # Dynamo's guards and frame handling, the graph run as captured
        models["dynamo eager"] = dynamo
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 1000, (args.step_batch, args.prompt), generator=generator).to(device)
        attention_mask = torch.ones_like(ids)
        if padded:
            attention_mask[args.step_batch // 2:, :args.prompt // 4] = 0
        steps = {name: decode_step(model, ids, attention_mask) for name, model in models.items()}
        logits = {name: step() for name, step in steps.items()}
        for name, step in steps.items():  # warm: Dynamo's recompiles for the step's shapes
            for _ in range(3):
                step()
        us = best_microseconds(steps, args.rounds, args.step_repeats, device)
        before = counting.calls
        steps["dynamo eager"]()
        rows.append({"padded": padded, "batch": args.step_batch, "cache": args.prompt, "us": us,
                     "attnfuse_over_sdpa": us["attnfuse"] / us["sdpa"],
                     "dynamo_eager_over_eager": us["dynamo eager"] / us["eager"],
                     "same_logits": {name: bool(torch.allclose(out, logits["eager"], atol=1e-4, rtol=1e-4))
                                     for name, out in logits.items()},
                     "graphs_per_step": {"attnfuse": attnfuse_graph_calls(steps["attnfuse"]),
                                         "dynamo eager": counting.calls - before},
                     "guards_per_entry": guard_counts(models["attnfuse"], counting),
                     "fused_sites": attnfuse.report(models["attnfuse"]).to_dict()["fused"]})
        if args.profile:
            print(f"\ncProfile of an attnfuse decode step (padded={padded}):")
            print(profile_text(steps["attnfuse"], 100, args.profile_lines))
    return rows


# ----------------------------------------------------------------------------- the model call's wrapper

class StubCompile:
    """Stands in for ``torch.compile`` while ``attnfuse.optimize`` runs: the "compiled" call it returns counts one
    graph call into the active capture (what a compiled model call does) and runs nothing, so that timing the
    optimized model's call times attnfuse's wrapper around Dynamo alone."""

    def __call__(self, fn: Callable, **kwargs: object) -> Callable:
        from attnfuse import capture as capture_module

        def compiled(*args: object, **kwargs: object) -> None:
            active = capture_module._ACTIVE.get()
            if active is not None:
                active.graph_calls += 1

        self.compiled = compiled
        return compiled


def bench_model_call(args: argparse.Namespace) -> dict:
    """Microseconds per call of what ``optimize`` installs on a model (``_compiled_call_impl``) around a stub of the
    ``torch.compile`` result, against the stub alone; and of ``CompiledGraph.__call__`` around an identity graph
    (a later call under the model's capture) against the graph's own run."""
    from attnfuse import capture as capture_module
    from attnfuse.options import Options
    from attnfuse.report import FusionReport

    stub, real = StubCompile(), torch.compile
    torch.compile = stub
    try:
        model = attnfuse.optimize(torch.nn.Linear(2, 2))
    finally:
        torch.compile = real
    x = torch.ones(2)
    kwargs = dict(input_ids=x, attention_mask=x, past_key_values=None, use_cache=True, position_ids=x)
    installed, bare = model._compiled_call_impl, stub.compiled
    installed(**kwargs)
    identity = torch.fx.symbolic_trace(torch.nn.Identity())
    graph = capture_module.CompiledGraph(identity, identity, [], capture_module.backend_for(Options()), [x])
    token = capture_module._ACTIVE.set(capture_module.Capture(FusionReport(root="Stub")))
    try:
        graph(x)
        graph(x)
        us = best_microseconds({"model call": lambda: installed(**kwargs), "stub": lambda: bare(**kwargs),
                                "graph call": lambda: graph(x), "graph run": lambda: graph.run(x)},
                               args.rounds, 20 * args.repeats, torch.device("cpu"))
    finally:
        capture_module._ACTIVE.reset(token)
    return {"us": us, "model_call_overhead_us": us["model call"] - us["stub"],
            "graph_call_overhead_us": us["graph call"] - us["graph run"]}


def print_model_call(row: dict, rounds: int) -> None:
    us = row["us"]
    print(f"\nattnfuse's wrappers (us per call, best of {rounds} interleaved rounds)")
    print("| optimize's model call | stub compiled call | overhead | graph call | graph run | overhead |")
    print("|---|---|---|---|---|---|")
    print(f"| {us['model call']:.2f} | {us['stub']:.2f} | {row['model_call_overhead_us']:.2f} | {us['graph call']:.2f} | "
          f"{us['graph run']:.2f} | {row['graph_call_overhead_us']:.2f} |")


# ----------------------------------------------------------------------------- main

def print_per_call(rows: list[dict], rounds: int) -> None:
    print(f"\none call at q_len 1 (us, best of {rounds} interleaved rounds)")
    print("| mask | batch | S | fused site | attend | sdpa | sdpa, same mask | fused / sdpa | fused - sdpa | "
          "fused - sdpa, same mask | kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        us = row["us"]
        print(f"| {row['mask']} | {row['batch']} | {row['S']} | {us['fused site']:.1f} | {us['attend']:.1f} | "
              f"{us['sdpa']:.1f} | {us['sdpa, same mask']:.1f} | {row['fused_over_sdpa']:.2f}x | {row['overhead_us']:.1f} | "
              f"{row['overhead_same_mask_us']:.1f} | {row['kernel']} |")


def print_decode_step(rows: list[dict], rounds: int) -> None:
    print(f"\none decode step of the tiny Llama (us, best of {rounds} interleaved rounds)")
    print("| padded | batch | cache | attnfuse | sdpa | eager | dynamo eager | attnfuse / sdpa | graphs/step | "
          "guards (attnfuse / dynamo eager) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        us = row["us"]
        print(f"| {row['padded']} | {row['batch']} | {row['cache']} | {us['attnfuse']:.0f} | {us['sdpa']:.0f} | "
              f"{us['eager']:.0f} | {us['dynamo eager']:.0f} | {row['attnfuse_over_sdpa']:.2f}x | "
              f"{row['graphs_per_step']} | {row['guards_per_entry']['attnfuse']} / "
              f"{row['guards_per_entry']['dynamo eager']} |")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=8, help="per-call head dim (tiny: the kernel costs little)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--lengths", default="64,512", help="cached keys S for the per-call table")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=200, help="calls per timed round (per call)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32, help="decode step: the Llama's hidden size")
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="decode step: cached tokens")
    parser.add_argument("--step-repeats", type=int, default=20, help="decode steps per timed round")
    parser.add_argument("--only", choices=["per_call", "decode_step", "model_call"], default=None)
    parser.add_argument("--profile", action="store_true", help="print cProfile's busiest functions")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--out", default="docs/bench_host_overhead_cpu.json")
    args = parser.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers >= 5.2x renames it
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    print(env)
    payload: dict = {"environment": env, "rounds": args.rounds, "timing": "best of interleaved rounds, one process",
                     "config": {k: v for k, v in vars(args).items() if k not in ("out", "profile", "only")}}
    if args.only in (None, "per_call"):
        payload["per_call"] = bench_per_call(args, device, dtype)
        print_per_call(payload["per_call"], args.rounds)
    if args.only in (None, "model_call"):
        payload["model_call"] = bench_model_call(args)
        print_model_call(payload["model_call"], args.rounds)
    if args.only in (None, "decode_step"):
        payload["decode_step"] = bench_decode_step(args, device, dtype)
        print_decode_step(payload["decode_step"], args.rounds)
    if args.out:
        save(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

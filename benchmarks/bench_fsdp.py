"""FSDP2 training step: transformers Llama with hand-written attention under attnfuse, against its own SDPA path.

    torchrun --nproc-per-node 2 benchmarks/bench_fsdp.py --out docs/bench_fsdp_h100x2.json

Each rank trains on its own ``--batch`` x ``--tokens`` token ids (bf16 parameters, AdamW); every model is
sharded with ``fully_shard`` per decoder layer, then at the root. Variants, built from the same weights and
trained on the same data in one process: ``sdpa`` (transformers' ``attn_implementation="sdpa"``), ``eager``
(its hand-written attention), ``shard_then_optimize`` (``attnfuse.optimize`` after ``fully_shard``),
``optimize_then_shard`` (before it) and ``compile_blocks`` (torchtitan's order: each decoder layer
``layer.compile(backend=attnfuse.backend(model))``, Inductor by default, then ``fully_shard``). The variants
are timed in turn, ``--rounds`` times, ``--steps`` steps a round; each keeps its best round (ms a step; all rounds
are in the JSON). Two diagnostics run when named in ``--variants``: ``sdpa_under_dynamo`` (the ``sdpa`` model sharded,
then compiled by Dynamo's ``eager`` backend: Dynamo's share of a step without attnfuse) and ``direct_sdpa_sites``
(``shard_then_optimize`` with each fused call replaced by a bare causal SDPA call: the share of attnfuse's call path).
Two more on the compiled route: ``shard_then_optimize_inductor`` (``optimize(..., compiler="inductor")`` after
``fully_shard``) against ``sdpa_inductor`` (the ``sdpa`` model sharded, then ``model.compile()``). Memory per GPU: the peak allocated during a variant's steps above what was allocated
before them, plus the variant's own resident shards (parameters, gradients, optimizer state). Every step's loss
(rank 0's) is kept; the table gives the largest difference from ``sdpa``'s. Runs on the CPU too (gloo;
``python benchmarks/bench_fsdp.py --device cpu ...`` as one process), for the code path, not the figures.
``--profile`` profiles two more steps of each variant and prints where they go (kernels, synchronizations, the
operators with the most device and host time).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, paired_ratios, save  # noqa: E402

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the machines' notes)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

VARIANTS = ("sdpa", "eager", "shard_then_optimize", "optimize_then_shard", "compile_blocks")
# Diagnostics (``--variants`` only). ``sdpa_under_dynamo``: Dynamo's own share, without attnfuse (the ``sdpa`` model
# sharded, then compiled with Dynamo's ``eager`` backend as ``optimize`` compiles a model). ``direct_sdpa_sites``:
# ``shard_then_optimize`` with each fused site's call replaced by a bare causal SDPA call (``direct_sdpa_sites``), the
# share of attnfuse's call path (per-call checks, kernel choice, the autograd switch). The compiled route:
# ``shard_then_optimize_inductor`` against ``sdpa_inductor``.
BASELINES = ("sdpa_under_dynamo", "direct_sdpa_sites", "shard_then_optimize_inductor", "sdpa_inductor")


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file (written by rank 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="sequences a rank")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens a sequence")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-compiler", default="inductor", choices=["inductor", "eager"],
                        help="what runs each compiled block of compile_blocks after attnfuse's rewrite")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, profile two steps of each variant (rank 0 prints where the time goes)")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, attention: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.tokens),
                         attn_implementation=attention)
    return LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).train()


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def prepare(args: argparse.Namespace, variant: str, device: torch.device
            ) -> tuple[torch.nn.Module, Optional[Callable[[], attnfuse.FusionReport]]]:
    """The sharded model of ``variant`` and how to read its attnfuse report (None for the unfused ones)."""
    model = build(args, "sdpa" if variant.startswith("sdpa") else "eager", device)
    if variant in ("sdpa", "eager"):
        return shard(model), None
    if variant == "shard_then_optimize":
        attnfuse.optimize(shard(model))
        return model, lambda: attnfuse.report(model)
    if variant == "optimize_then_shard":
        shard(attnfuse.optimize(model))
        return model, lambda: attnfuse.report(model)
    if variant == "shard_then_optimize_inductor":
        attnfuse.optimize(shard(model), compiler="inductor")
        return model, lambda: attnfuse.report(model)
    if variant == "sdpa_inductor":
        shard(model).compile()
        return model, None
    if variant == "sdpa_under_dynamo":
        shard(model).compile(backend="eager")
        return model, None
    if variant == "direct_sdpa_sites":
        attnfuse.optimize(shard(model))
        return model, lambda: attnfuse.report(model)
    if variant == "compile_blocks":
        backend = attnfuse.backend(model, compiler=args.block_compiler)
        for layer in model.model.layers:
            layer.compile(backend=backend)
        return shard(model), lambda: backend.report
    raise SystemExit(f"bench_fsdp: unknown variant {variant!r}; choose from {', '.join(VARIANTS + BASELINES)}")


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds for the model between steps: its parameter shards and optimizer state."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local(t).numel() * local(t).element_size() for t in state.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total


@contextlib.contextmanager
def direct_sdpa_sites() -> Iterator[None]:
    """Measurement only: every fused site runs ``scaled_dot_product_attention(q, k, v, is_causal=True)`` on its own q,
    k and v instead of attnfuse's call path. Exact for this benchmark's model alone (causal, unpadded, no dropout),
    whose sites read transformers' causal mask; the losses column shows it."""
    import attnfuse.lower as lower

    def direct(plan, *tensors: torch.Tensor) -> torch.Tensor:
        given = plan.inputs.split(tensors)
        q, k, v = plan.q.apply(given.q), plan.k.apply(given.k), plan.v.apply(given.v)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=plan.scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        out = out.permute(plan.out_perm)
        return out.contiguous() if plan.contiguous_out else out

    fused_call, lower.run_site = lower.run_site, direct
    try:
        yield
    finally:
        lower.run_site = fused_call


class Run:
    """One variant: its model and optimizer, the step it takes, and what it measured."""

    def __init__(self, args: argparse.Namespace, variant: str, device: torch.device) -> None:
        self.variant, self.device = variant, device
        self.call_path = direct_sdpa_sites if variant == "direct_sdpa_sites" else contextlib.nullcontext
        self.model, self.report = prepare(args, variant, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.losses: list[torch.Tensor] = []
        self.rounds_ms: list[float] = []
        self.peak_step_bytes = 0

    def step(self, ids: torch.Tensor) -> None:
        with self.call_path():
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())

    def steps_ms(self, data: list[torch.Tensor]) -> float:
        """Milliseconds a step over ``data``, the ranks started together and the device drained at the end."""
        dist.barrier()
        started = time.perf_counter()
        for ids in data:
            self.step(ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1e3 / len(data)

    def timed_round(self, data: list[torch.Tensor]) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.rounds_ms.append(self.steps_ms(data))
        if cuda:
            self.peak_step_bytes = max(self.peak_step_bytes, torch.cuda.max_memory_allocated() - before)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    started_here = not dist.is_initialized()
    if started_here:
        if "RANK" not in os.environ:  # one process without torchrun
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29593")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        return _run(args, rank, world, device)
    finally:
        if started_here:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    variants = args.variants.split(",")
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, the same for every variant
    total = args.warmup + args.rounds * args.steps
    data = [torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator).to(device)
            for _ in range(total)]
    runs = [Run(args, variant, device) for variant in variants]
    for run in runs:
        for ids in data[:args.warmup]:
            run.step(ids)
    for round_ in range(args.rounds):
        chunk = data[args.warmup + round_ * args.steps: args.warmup + (round_ + 1) * args.steps]
        for run in runs:
            run.timed_round(chunk)
    profiles = {run.variant: profile_steps(run, data[-2:]) for run in runs} if args.profile else {}
    results = {run.variant: {**_result(run), **({"profile": profiles[run.variant]} if profiles else {})}
               for run in runs}
    if "sdpa" in results:  # step time over sdpa's, round by round (ms: the reverse of a speed ratio)
        for result in results.values():
            result["paired_vs_sdpa"] = paired_ratios(result["rounds_ms"], results["sdpa"]["rounds_ms"])
    payload = {**environment(), "world": world, "config": {k: v for k, v in vars(args).items() if k != "out"},
               "results": results}
    if rank == 0:
        _print(payload)
        save(args.out, payload)
    return payload


def profile_steps(run: Run, data: list[torch.Tensor]) -> dict[str, Any]:
    """Where a variant's step goes (``--profile``): wall time, GPU kernel time summed over the streams, host
    synchronizations, and the operators with the most device and host time, from ``torch.profiler`` over ``data``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall_ms = run.steps_ms(data)
    events = prof.key_averages()
    steps = len(data)

    def per_step(total_us: float) -> float:
        return round(total_us / 1e3 / steps, 3)

    device_time = (lambda e: getattr(e, "self_device_time_total", 0.0)) if cuda else (lambda e: 0.0)
    syncs = {e.key: e.count // steps for e in events
             if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")}
    top_device = sorted(events, key=lambda e: -device_time(e))[:15]
    top_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"wall_ms": round(wall_ms, 3), "kernel_ms": per_step(sum(device_time(e) for e in events)),
            "syncs_per_step": syncs,
            "top_device_ms": {e.key[:60]: per_step(device_time(e)) for e in top_device},
            "top_host_ms": {e.key[:60]: per_step(e.self_cpu_time_total) for e in top_host}}


def _result(run: Run) -> dict[str, Any]:
    resident = resident_bytes(run.model, run.optimizer)
    report = run.report() if run.report is not None else None
    cuda = run.device.type == "cuda"
    return {"best_ms": min(run.rounds_ms), "rounds_ms": run.rounds_ms,
            "peak_gb": (run.peak_step_bytes + resident) / 1e9 if cuda else None,
            "peak_step_gb": run.peak_step_bytes / 1e9 if cuda else None, "resident_gb": resident / 1e9,
            "losses": [loss.item() for loss in run.losses],
            "fused": report.fused if report else None, "skipped": report.skipped if report else None,
            "fused_sites": sorted(s.name for s in report.sites if s.status == "fused") if report else None,
            "causal_calls": _causal_calls(report) if report else None,
            "notes": report.notes if report else None}


def _causal_calls(report: attnfuse.FusionReport) -> Optional[list[int]]:
    """``[calls read as causal, calls checked, causal calls that read nothing]`` over the compiled sites whose run-time
    mask is checked per call for the causal triangle (each compiled graph once; its layers share its counts; the
    last: proven where the mask was built, or read by an earlier layer, ``attnfuse.carried``), or None where no
    site is."""
    counts = [site.record.causal_checks for graph in report.graphs for site in graph.sites
              if site.status == "fused" and site.record is not None and site.record.causal_checks is not None]
    if not counts:
        return None
    return [sum(c["causal"] for c in counts), sum(c["causal"] + c["as given"] for c in counts),
            sum(c["proven"] for c in counts)]


def _print(payload: dict[str, Any]) -> None:
    results = payload["results"]
    base = results.get("sdpa")
    print(f"bench_fsdp: {payload['device']} x {payload['world']}, torch {payload['torch']}, {payload['date']}; "
          f"Llama {payload['config']['layers']}L/{payload['config']['hidden']} GQA {payload['config']['heads']}/"
          f"{payload['config']['kv_heads']}, {payload['config']['batch']} x {payload['config']['tokens']} tokens a "
          f"rank, {payload['config']['dtype']}")
    print(f"{'variant':30} {'ms/step':>9} {'vs sdpa':>8} {'median (quartiles) by round':>29} {'peak GB':>8} {'max |loss - sdpa|':>18} {'fused':>6} "
          f"{'causal calls':>13} {'unread':>7}")
    for variant, result in results.items():
        ratio = f"{result['best_ms'] / base['best_ms']:.3f}" if base else "-"
        pair = result.get("paired_vs_sdpa")
        paired = f"{pair['median']:.3f} ({pair['q1']:.3f}-{pair['q3']:.3f})" if pair else "-"
        diff = (f"{max(abs(a - b) for a, b in zip(result['losses'], base['losses'])):.2e}" if base else "-")
        peak = f"{result['peak_gb']:.2f}" if result["peak_gb"] is not None else "-"
        fused = "-" if result["fused"] is None else str(result["fused"])
        causal = "-" if result["causal_calls"] is None else "{}/{}".format(*result["causal_calls"][:2])
        unread = "-" if result["causal_calls"] is None else str(result["causal_calls"][2])
        print(f"{variant:30} {result['best_ms']:9.2f} {ratio:>8} {paired:>29} {peak:>8} {diff:>18} {fused:>6} {causal:>13} "
              f"{unread:>7}")
    for variant, result in results.items():
        if "profile" in result:
            found = result["profile"]
            print(f"\nprofile of {variant}: {found['wall_ms']} ms a step (profiled), kernels {found['kernel_ms']} ms, "
                  f"synchronizations a step {found['syncs_per_step']}")
            print("  device ms a step: " + ", ".join(f"{k} {v}" for k, v in found["top_device_ms"].items()))
            print("  host ms a step: " + ", ".join(f"{k} {v}" for k, v in found["top_host_ms"].items()))


if __name__ == "__main__":
    main()

"""Context parallel training on 1, 2 and 4 GPUs: tokens/s and peak memory per GPU, attnfuse vs the model's own SDPA.

The model is transformers' Llama, 8 layers, hidden 1024, GQA 16/4, vocab 32000, bf16, AdamW, batch 1: its
hand-written (``eager``) attention under ``attnfuse.optimize`` ("attnfuse") and transformers' ``sdpa`` path
("sdpa"), both trained with the sequence sharded by PyTorch's ``context_parallel`` (causal load balancing on,
global positions fed to the rotary embedding, gradients all-reduced), as in README's recipe. Sequence lengths
double from ``--min-seq`` until a length runs out of memory (that length is recorded as OOM on every rank, and
the next variant or GPU count follows) or passes ``--max-seq``. One GPU runs the same model without context
parallel. Without activation checkpointing unless ``--checkpoint`` (each decoder layer recomputed in backward).

    python benchmarks/bench_distributed.py --gpus 1 2 4 --out docs/bench_distributed_h100.json

runs one ``torchrun`` per GPU count (NCCL's NVLink multicast off) and prints, with device, torch and date,
the tokens/s of each count against one GPU at the longest length one GPU holds. Under ``torchrun`` directly
(``torchrun --nproc-per-node 4 benchmarks/bench_distributed.py --worker --out run4.json``) it runs one count.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

from common import environment, save  # noqa: E402

MODEL = "llama-8L-1024-gqa16/4-vocab32000"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def build(variant: str, checkpoint: bool) -> torch.nn.Module:
    import transformers

    import attnfuse

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1 << 20,
                                      attn_implementation="eager" if variant == "attnfuse" else "sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # static shapes: under dynamic ones transformers' mask (its packed-sequence check) is read as a bias tensor,
    # which context parallel cannot ring
    return attnfuse.optimize(model, dynamic=False) if variant == "attnfuse" else model


def all_reduce_gradients(model: torch.nn.Module, group) -> None:
    """Average the gradients over the ranks in one flat all-reduce (what FSDP or DDP would do for CP)."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def measure_length(model, optimizer, seq: int, mesh, steps: int) -> dict:
    """One warm-up step, then ``steps`` timed steps at ``seq`` tokens; OOM agreed on by every rank."""
    import torch.distributed as dist
    from torch.distributed.tensor.experimental import context_parallel

    from attnfuse.context_parallel import feed_positions

    world = dist.get_world_size()
    generator = torch.Generator(device="cuda").manual_seed(seq)
    tokens = torch.randint(0, 32000, (1, seq + 1), device="cuda", generator=generator)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(seq, device="cuda")[None].contiguous()
    hook = feed_positions(model.model.rotary_emb, positions)
    sharded = context_parallel(mesh, buffers=[inputs, labels, positions], buffer_seq_dims=[1, 1, 1]) \
        if world > 1 else contextlib.nullcontext()

    def train_step() -> None:
        logits = model(inputs, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
        if world > 1:
            all_reduce_gradients(model, mesh.get_group())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record = {"seq": seq, "oom": False}
    try:
        with sharded:
            train_step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                train_step()
            end.record()
            torch.cuda.synchronize()
            record["ms_per_step"] = start.elapsed_time(end) / steps
    except torch.OutOfMemoryError:
        record["oom"] = True
    finally:
        hook.remove()
        optimizer.zero_grad(set_to_none=True)
    flags = torch.tensor([float(record["oom"]), torch.cuda.max_memory_allocated() / 1e9], device="cuda")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    record["oom"], record["peak_gb_per_gpu"] = bool(flags[0].item()), round(flags[1].item(), 2)
    if record["oom"]:
        record.pop("ms_per_step", None)
    else:
        record["ms_per_step"] = round(record["ms_per_step"], 2)
        record["tokens_per_s"] = round(seq / record["ms_per_step"] * 1000)
    del tokens, inputs, labels, positions
    gc.collect()
    torch.cuda.empty_cache()
    return record


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", timeout=timedelta(seconds=args.collective_timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    runs = []
    for variant in args.variants:
        model = build(variant, args.checkpoint)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        seq = args.min_seq
        while seq <= args.max_seq:
            record = {"world": world, "variant": variant, **measure_length(model, optimizer, seq, mesh, args.steps)}
            runs.append(record)
            if rank == 0:  # saved after every length: a run stopped later keeps what it finished
                print(json.dumps(record), flush=True)
                save(args.out, {**environment(), "world": world, "runs": runs})
            if record["oom"]:
                break
            seq *= 2
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
    dist.destroy_process_group()


def ratios(runs: list[dict]) -> dict:
    """Per variant: the longest length each GPU count trained, and tokens/s against one GPU at the longest
    length one GPU holds; per GPU count and length: attnfuse's tokens/s over sdpa's."""
    done = [r for r in runs if not r["oom"]]
    out: dict = {"longest_seq": {}, "speedup_vs_1gpu": {}, "attnfuse_over_sdpa": {}}
    for variant in sorted({r["variant"] for r in runs}):
        mine = {(r["world"], r["seq"]): r["tokens_per_s"] for r in done if r["variant"] == variant}
        worlds = sorted({world for world, _ in mine})
        out["longest_seq"][variant] = {world: max(seq for w, seq in mine if w == world) for world in worlds}
        if 1 in worlds:
            at = out["longest_seq"][variant][1]
            out["speedup_vs_1gpu"][variant] = {"seq": at, **{world: round(mine[(world, at)] / mine[(1, at)], 2)
                                                             for world in worlds if world > 1 and (world, at) in mine}}
    sdpa = {(r["world"], r["seq"]): r["tokens_per_s"] for r in done if r["variant"] == "sdpa"}
    for r in done:
        if r["variant"] == "attnfuse" and (r["world"], r["seq"]) in sdpa:
            out["attnfuse_over_sdpa"][f"{r['world']}gpu/{r['seq']}"] = round(
                r["tokens_per_s"] / sdpa[(r["world"], r["seq"])], 3)
    return out


def drive(args: argparse.Namespace) -> None:
    runs, env = [], None
    env_vars = {**os.environ, **NO_MULTICAST}
    for world in args.gpus:
        if world > torch.cuda.device_count():
            print(f"skipping {world} GPUs: {torch.cuda.device_count()} available")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                       "--master-port", str(args.master_port or 29500 + world), __file__, "--worker", "--out", out,
                       "--min-seq", str(args.min_seq), "--max-seq", str(args.max_seq), "--steps", str(args.steps),
                       "--variants", *args.variants] + (["--checkpoint"] if args.checkpoint else [])
            try:
                subprocess.run(command, env=env_vars, timeout=args.launch_timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"{world} GPUs: stopped after {args.launch_timeout} s; keeping what it finished")
            if os.path.exists(out):
                with open(out) as f:
                    result = json.load(f)
                env, runs = {k: result[k] for k in ("device", "torch", "date")}, runs + result["runs"]
    payload = {**(env or environment()), "model": MODEL, "batch": 1, "checkpoint": args.checkpoint,
               "context_parallel": "torch context_parallel(), head-tail load balancing, all-gather rotation",
               "runs": runs, "ratios": ratios(runs)}
    save(args.out, payload)
    print(f"\n{MODEL}, batch 1, bf16, AdamW; {payload['device']}, torch {payload['torch']}, {payload['date']}")
    print(f"{'gpus':>4} {'variant':>9} {'seq':>8} {'tokens/s':>10} {'ms/step':>9} {'peak GB/GPU':>12}")
    for r in runs:
        figures = ("OOM", "", "") if r["oom"] else (r["tokens_per_s"], r["ms_per_step"], r["peak_gb_per_gpu"])
        print(f"{r['world']:>4} {r['variant']:>9} {r['seq']:>8} {figures[0]:>10} {figures[1]:>9} {figures[2]:>12}")
    print(json.dumps(payload["ratios"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_distributed.json")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--variants", nargs="+", default=["attnfuse", "sdpa"], choices=["attnfuse", "sdpa"])
    parser.add_argument("--min-seq", type=int, default=8192)
    parser.add_argument("--max-seq", type=int, default=262144)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpoint", action="store_true", help="recompute each decoder layer in backward")
    parser.add_argument("--worker", action="store_true", help="one GPU count, under torchrun")
    parser.add_argument("--launch-timeout", type=int, default=200, help="seconds for each GPU count's torchrun")
    parser.add_argument("--collective-timeout", type=int, default=120)
    parser.add_argument("--master-port", type=int, default=None,
                        help="torchrun's port (default 29500 + GPU count); give runs that share a host their own")
    args = parser.parse_args()
    worker(args) if args.worker or "RANK" in os.environ else drive(args)


if __name__ == "__main__":
    main()

"""FSDP2 training runs shared by the FSDP tests: a small transformers Llama with hand-written (``eager``)
attention, sharded per decoder layer and at the root, and made fused by attnfuse in each of three orders.

``run_rank`` is what each process runs (spawned by the tests on the gloo or NCCL backend); ``train`` is the
unsharded reference the tests compare it with.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn

import attnfuse

# shard then optimize; optimize then shard; compile each block with attnfuse then shard (torchtitan's order)
ORDERS = ("shard_then_optimize", "optimize_then_shard", "compile_blocks")
DIST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}  # NVLink multicast off


def build_llama(layers: int, hidden: int, heads: int, kv_heads: int, attention: str = "eager",
                dtype: torch.dtype = torch.float32, device: str = "cpu", vocab: int = 128) -> nn.Module:
    """A transformers Llama with the same weights on every rank (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def prepare(model: nn.Module, order: str, block_compiler: str = "eager") -> Callable[[], attnfuse.FusionReport]:
    """Shard ``model`` and fuse its attention in ``order``; returns how to get its report."""
    if order == "shard_then_optimize":
        attnfuse.optimize(shard(model))
        return lambda: attnfuse.report(model)
    if order == "optimize_then_shard":
        shard(attnfuse.optimize(model))
        return lambda: attnfuse.report(model)
    if order == "compile_blocks":
        backend = attnfuse.backend(model, compiler=block_compiler)
        for layer in model.model.layers:
            layer.compile(backend=backend)
        shard(model)
        return lambda: backend.report
    raise ValueError(f"unknown order {order!r}")


def batches(rank: int, steps: int, batch: int, tokens: int, vocab: int, device: str) -> list[torch.Tensor]:
    """The token ids rank ``rank`` trains on, one tensor a step (the same on every run)."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, vocab, (batch, tokens), generator=generator).to(device) for _ in range(steps)]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def train(model: nn.Module, data: list[list[torch.Tensor]], lr: float = 1e-2) -> tuple[list[list[float]], dict]:
    """Unsharded reference: at each step the mean of the ranks' losses (FSDP2 averages their gradients).
    Returns each step's loss per rank, and the gradients of the first step by parameter name."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, first_grads = [], {}
    for step in range(len(data[0])):
        per_rank = [_loss(model, data[rank][step]) for rank in range(len(data))]
        (sum(per_rank) / len(per_rank)).backward()
        if step == 0:
            first_grads = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append([loss.item() for loss in per_rank])
    return losses, first_grads


def train_sharded(model: nn.Module, ids: list[torch.Tensor], lr: float = 1e-2) -> tuple[list[float], dict]:
    """One rank's FSDP2 run: its loss at each step, and the full gradients of the first step (every rank
    gathers them; each returns them)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, first_grads = [], {}
    for step, batch in enumerate(ids):
        loss = _loss(model, batch)
        loss.backward()
        if step == 0:
            first_grads = {name.replace("._orig_mod", ""): _full(p.grad).detach().float().cpu().clone()
                           for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run_rank(rank: int, world: int, port: int, out: str, backend: str, config: dict[str, Any]) -> None:
    """One process of an FSDP2 run: every order in ``config["orders"]`` (and ``"sdpa"``: transformers' own
    SDPA model, sharded the same way), saved to ``out/rank{rank}.pt``: losses, first-step gradients (rank 0),
    the report's site names and counts."""
    import torch.distributed as dist

    os.environ.update(DIST_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dtype = getattr(torch, config.get("dtype", "float32"))
        shape = {k: config[k] for k in ("layers", "hidden", "heads", "kv_heads")}
        ids = batches(rank, config["steps"], config["batch"], config["tokens"], 128, device)
        results: dict[str, Any] = {}
        for order in config["orders"]:  # later orders may run graphs Dynamo compiled for earlier ones
            model = build_llama(**shape, attention="sdpa" if order == "sdpa" else "eager", dtype=dtype, device=device)
            report: Optional[Callable[[], attnfuse.FusionReport]] = None
            if order == "sdpa":
                shard(model)
            else:
                report = prepare(model, order)
            losses, grads = train_sharded(model, ids, config.get("lr", 1e-2))
            entry: dict[str, Any] = {"losses": losses, "grads": grads if rank == 0 else None}
            if report is not None:
                fused = report()
                entry.update(names=sorted(s.name for s in fused.sites if s.status == "fused"), fused=fused.fused,
                             skipped=fused.skipped, text=str(fused),
                             features=[s["features"] for s in fused.to_dict()["sites"] if s["status"] == "fused"])
            results[order] = entry
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, out: str, backend: str, config: dict[str, Any], port: int = 29571) -> list[dict]:
    """Run ``run_rank`` in ``world`` processes; their results, by rank."""
    import torch.multiprocessing as mp

    os.environ.update(DIST_ENV)
    mp.spawn(run_rank, args=(world, port, out, backend, config), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]

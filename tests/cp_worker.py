"""One rank of the multi-GPU context-parallel checks (``torchrun``; run by tests/test_context_parallel_multigpu.py).

Each rank trains, for a few steps, (1) the unrewritten model on the whole sequence on its own GPU (the
one-GPU reference) and (2) the attnfuse-optimized copy with the sequence sharded by PyTorch's
``context_parallel`` (causal load balancing on), gradients averaged over the ranks; rank 0 writes both
loss curves, and what happened to the sites CP must refuse, as JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel

import attnfuse
from attnfuse.context_parallel import ContextParallelError, feed_positions

VOCAB, BATCH, STEPS, LR = 256, 2, 3, 0.05
SHARPEN = 8.0  # q and k projections scaled up: random weights attend almost uniformly, where positions hardly show


def build(kind: str, alibi: bool = False) -> torch.nn.Module:
    """A small bf16 decoder whose attention is hand-written, the same weights on every rank."""
    torch.manual_seed(0)
    if kind == "xtransformers":
        from x_transformers import Decoder, TransformerWrapper

        layers = Decoder(dim=256, depth=2, heads=4, rotary_pos_emb=not alibi, alibi_pos_bias=alibi)
        model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=0, attn_layers=layers)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight", "q_proj.weight", "k_proj.weight")):
                parameter.mul_(SHARPEN)
    return model.cuda().bfloat16().train()


def logits_of(model: torch.nn.Module, kind: str, ids: torch.Tensor, positions=None,
              attention_mask=None) -> torch.Tensor:
    if kind == "xtransformers":
        return model(ids) if positions is None else model(ids, pos=positions)
    return model(ids, attention_mask=attention_mask, use_cache=False).logits


def step(model, optimizer, loss, group=None) -> float:
    loss.backward()
    if group is not None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=group)
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def one_gpu_run(model, kind, inputs, labels) -> tuple[list[float], torch.Tensor]:
    """The losses of ``STEPS`` steps on the whole sequence, and the first step's logits."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, first = [], None
    for _ in range(STEPS):
        logits = logits_of(model, kind, inputs)
        first = logits.detach().float() if first is None else first
        losses.append(step(model, optimizer, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())))
    return losses, first


def context_parallel_run(model, kind, inputs, labels, mesh, global_positions=True) -> tuple[list[float], torch.Tensor]:
    """``STEPS`` training steps with the sequence sharded over ``mesh`` (the recipe of the README): the losses
    (averaged over the ranks) and the first step's logits, gathered back into the sequence's order."""
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, labels = inputs.clone(), labels.clone()
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs).contiguous()
    hook = feed_positions(model.model.rotary_emb, positions) if kind == "llama" and global_positions else None
    losses, first = [], None
    try:
        with context_parallel(mesh, buffers=[inputs, labels, positions], buffer_seq_dims=[1, 1, 1]):
            for _ in range(STEPS):
                logits = logits_of(model, kind, inputs, positions if kind == "xtransformers" and global_positions
                                   else None)
                if first is None:
                    first = context_parallel_unshard(mesh, [logits.detach().float().contiguous()], [1])[0]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
                losses.append(step(model, optimizer, loss, mesh.get_group()))
    finally:
        if hook is not None:
            hook.remove()
    return losses, first


def refused(kind, mesh, inputs, labels, alibi=False, padding=False) -> str:
    """The error a site CP must refuse raises (or 'no error')."""
    model = attnfuse.optimize(build(kind, alibi=alibi), dynamic=False)
    inputs, labels = inputs.clone(), labels.clone()
    mask = torch.ones_like(inputs, dtype=torch.bool)
    mask[0, : inputs.shape[1] // 8] = False  # a left-padded row
    try:
        with context_parallel(mesh, buffers=[inputs, labels, mask], buffer_seq_dims=[1, 1, 1]):
            logits_of(model, kind, inputs, attention_mask=mask.long() if padding else None).float().sum().backward()
    except ContextParallelError as error:
        return str(error)
    return "no error"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, args.seq + 1), device="cuda")
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    result = {"world": world, "seq": args.seq, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    for kind in ("xtransformers", "llama"):
        try:
            plain = build(kind)
            # static shapes: under dynamic ones transformers' mask (packed-sequence check) is read as a bias tensor
            one_gpu_fused, optimized, local_positions = (attnfuse.optimize(copy.deepcopy(plain), dynamic=False)
                                                         for _ in range(3))
            reference, reference_logits = one_gpu_run(plain, kind, inputs, labels)
            fused, fused_logits = one_gpu_run(one_gpu_fused, kind, inputs, labels)
            sharded, sharded_logits = context_parallel_run(optimized, kind, inputs, labels, mesh)
            wrong, wrong_logits = context_parallel_run(local_positions, kind, inputs, labels, mesh,
                                                       global_positions=False)
            result[kind] = {
                "reference": reference, "one_gpu_fused": fused, "context_parallel": sharded, "local_positions": wrong,
                "logits_diff": {name: (logits - reference_logits).abs().max().item() for name, logits in
                                (("one_gpu_fused", fused_logits), ("context_parallel", sharded_logits),
                                 ("local_positions", wrong_logits))},
                "logits_max": reference_logits.abs().max().item(),
                "kernels": sorted({s.backend or "" for s in attnfuse.report(optimized).sites}),
                "fused": attnfuse.report(optimized).fused,
            }
        except Exception:
            result[kind] = {"error": traceback.format_exc()}
    result["alibi"] = refused("xtransformers", mesh, inputs, labels, alibi=True)
    result["padding"] = refused("llama", mesh, inputs, labels, padding=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

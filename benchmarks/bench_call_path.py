"""Host time of a fused call with gradients, and of a host-bound training step, against bare SDPA and transformers' `sdpa`.

    python benchmarks/bench_call_path.py [--device cuda] [--rounds 7] [--attnfuse PATH] [--out docs/bench_call_path.json]

``per_call``: one causal GQA site (16 query heads, 4 kv heads, 128 tokens, head dim 64, half precision on CUDA, fp32 on
the CPU: kernels small enough that the host's Python and dispatch are what is timed), forward alone and forward +
backward: the fused call as the rewritten graph makes it (``lower.run_site``), its plan's compute without the autograd
gate (``lower.compute_site``), and a bare ``scaled_dot_product_attention(is_causal=True)`` on the same tensors.

``step``: a training step (forward, loss, backward) of a transformers Llama 4L/1024 (GQA 16/4) on 1 x 128 tokens, host-
bound on a GPU: transformers' ``sdpa`` model, the ``eager`` model under ``attnfuse.optimize``, and the same with a
graph break before every decoder layer (as FSDP2's hooks make: the mask then reaches each layer's graph as an input).

Every variant of a table is timed in turn (A, B, C, A, B, C, ...) for ``--rounds`` rounds; each keeps its fastest
round. ``--attnfuse PATH`` imports attnfuse from another checkout (before / after comparisons on one machine). Prints
tables with ratios, device, torch and date; writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=200, help="fused calls per timed round")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    parser.add_argument("--only", choices=["per_call", "step"], default=None)
    parser.add_argument("--attnfuse", default=None, help="import attnfuse from this checkout instead of this one")
    parser.add_argument("--out", default="docs/bench_call_path.json")
    return parser.parse_args(argv)


class CausalGroupedAttention(torch.nn.Module):
    """Llama's eager attention: kv heads repeated for the query groups, a causal mask built in the graph."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def best_ms(calls: dict[str, Callable[[], object]], rounds: int, repeats: int, device: torch.device) -> dict:
    """Each call's fastest mean over ``repeats`` calls (milliseconds), after three warm-up calls each, the calls timed in
    turn for ``rounds`` rounds (``bench_generate.best_microseconds``)."""
    from bench_generate import best_microseconds

    for call in calls.values():
        for _ in range(3):
            call()
    return {name: us / 1e3 for name, us in best_microseconds(calls, rounds, repeats, device).items()}


def bench_per_call(args: argparse.Namespace, device: torch.device) -> dict:
    """Microseconds per call: the fused call, its compute without the gate, and bare SDPA; forward and forward +
    backward."""
    import attnfuse.lower as lower
    from bench_generate import fused_call

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, 128, 64, device=device, dtype=dtype, generator=generator).requires_grad_()
               for heads in (16, 4, 4))
    site, site_args = fused_call(CausalGroupedAttention(), (q, k, v))
    plan = site.plan
    grad = torch.randn(1, 16, 128, 64, device=device, dtype=dtype, generator=generator)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(lower.run_site(plan, *site_args), expected, atol=2e-2, rtol=2e-2)

    def bare() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def with_backward(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: run().backward(grad)

    calls = {"forward: fused call": lambda: lower.run_site(plan, *site_args),
             "forward: compute, no gate": lambda: lower.compute_site(plan, *site_args),
             "forward: bare sdpa": bare,
             "forward+backward: fused call": with_backward(lambda: lower.run_site(plan, *site_args)),
             "forward+backward: compute, no gate": with_backward(lambda: lower.compute_site(plan, *site_args)),
             "forward+backward: bare sdpa": with_backward(bare)}
    ms = best_ms(calls, args.rounds, args.repeats, device)
    return {"kernel": plan.record.kernel, "us": {name: round(value * 1e3, 1) for name, value in ms.items()}}


def _llama(implementation: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, attn_implementation=implementation)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device, dtype).train()


def _break_before_layers(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:  # a graph break before each layer, as FSDP2's hooks make
        layer.register_forward_pre_hook(lambda module, inputs: torch._dynamo.graph_break())
    return model


def bench_step(args: argparse.Namespace, device: torch.device) -> dict:
    """Milliseconds per training step of the three models, interleaved."""
    import attnfuse

    ids = torch.randint(0, 32000, (1, 128), device=device, generator=torch.Generator(device=device).manual_seed(0))
    models = {"sdpa": _llama("sdpa", device), "attnfuse": attnfuse.optimize(_llama("eager", device)),
              "attnfuse, a graph break per layer": attnfuse.optimize(_break_before_layers(_llama("eager", device)))}
    losses = {}

    def step(name: str) -> Callable[[], None]:
        model = models[name]

        def run() -> None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses[name] = loss.detach()

        return run

    ms = best_ms({name: step(name) for name in models}, args.rounds, args.steps, device)
    reports = {name: attnfuse.report(model).fused for name, model in models.items() if name != "sdpa"}
    return {"ms": {name: round(value, 3) for name, value in ms.items()},
            "vs_sdpa": {name: round(value / ms["sdpa"], 3) for name, value in ms.items()},
            "loss": {name: float(loss) for name, loss in losses.items()}, "fused_sites": reports}


def main(argv=None) -> None:
    args = parse(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.abspath(args.attnfuse) if args.attnfuse else os.path.join(here, ".."))
    import attnfuse  # noqa: F401  (this checkout's, or --attnfuse's, before bench_generate imports one)
    from bench_generate import environment
    from common import save

    device = torch.device(args.device)
    result = {**environment(device), "attnfuse": os.path.dirname(attnfuse.__file__)}
    print(result)
    if args.only in (None, "per_call"):
        result["per_call"] = bench_per_call(args, device)
        print(f"\none fused call ({result['per_call']['kernel']}), us, best of {args.rounds} interleaved rounds:")
        for name, us in result["per_call"]["us"].items():
            print(f"  {name:38s} {us:8.1f}")
    if args.only in (None, "step") and device.type == "cuda":
        result["step"] = bench_step(args, device)
        print(f"\nLlama 4L/1024 training step, 1 x 128 tokens, ms (best of {args.rounds} interleaved rounds):")
        for name, ms in result["step"]["ms"].items():
            print(f"  {name:38s} {ms:8.3f}  {result['step']['vs_sdpa'][name]:.3f}x sdpa")
    save(args.out, result)


if __name__ == "__main__":
    main()

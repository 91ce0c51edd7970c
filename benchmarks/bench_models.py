"""End-to-end benchmark: models with hand-written attention, with and without attnfuse.

    python benchmarks/bench_models.py --out docs/bench_models.json [--compile] [--shapes 2048x8,8192x2]

Models: transformers Llama, Gemma 2 and MPT in ``attn_implementation="eager"``, MEGABYTE-pytorch
(``flash_attn=False``) and an x-transformers decoder (naive ``Attend``). Variants, timed in one run
with the same weights and inputs: the hand-written-attention model, that model under
``attnfuse.optimize`` (eager), the model's own SDPA path (transformers' ``sdpa``, MEGABYTE's
``flash_attn=True``, x-transformers' ``attn_flash=True``; column ``hf_sdpa``), with ``--flex``
transformers' ``flex_attention`` path (``hf_flex_attention``), and with ``--compile`` ``torch.compile``
of the eager model, ``torch.compile(backend="attnfuse")`` of the eager model and ``torch.compile`` of the
``sdpa`` model. Inference is a no-grad forward; a train
step is forward + backward of the LM loss. Prints a table of ms and peak GB, writes JSON. Small
models are bound by host time, which varies between runs on a shared machine: ``--rounds N`` times
the variants in turn N times and keeps each one's fastest round (all rounds are in the JSON).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, measure, save  # noqa: E402


TRANSFORMERS_MODELS = {
    "llama": ("llama-8L-1024-gqa16/4", "LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, max_position_embeddings=8192)),
    "gemma2": ("gemma2-8L-1024-gqa16/4-softcap50-window1024", "Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=64, sliding_window=1024, max_position_embeddings=8192)),
    "mistral": ("mistral-8L-1024-gqa16/4-window1024", "MistralConfig", "MistralForCausalLM",
                dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=4, sliding_window=1024, max_position_embeddings=8192)),
    "mpt": ("mpt-8L-1024-16h-alibi", "MptConfig", "MptForCausalLM",
            dict(d_model=1024, n_layers=8, n_heads=16, max_seq_len=8192)),
    # Bloom: ALiBi added by baddbmm over batch*heads (transformers has no sdpa or flex path for it)
    "bloom": ("bloom-8L-1024-16h-alibi", "BloomConfig", "BloomForCausalLM",
              dict(hidden_size=1024, n_layer=8, n_head=16)),
    # Falcon with ALiBi (falcon-rw's layout); transformers' sdpa path adds the ALiBi as a mask
    "falcon": ("falcon-8L-1024-16h-alibi", "FalconConfig", "FalconForCausalLM",
               dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, alibi=True,
                    max_position_embeddings=8192)),
}
LUCIDRAINS_MODELS = {
    # MEGABYTE: a global causal transformer over patches of 16 bytes and a local one inside each patch;
    # "eager" is its naive Attend (flash_attn=False), "sdpa" its own F.scaled_dot_product_attention path.
    "megabyte": "megabyte-global(1024,6L)-local(512,4L)-patch16",
    # x-transformers Decoder: naive Attend by default, attn_flash=True is its hand-written SDPA path.
    "xtransformers": "x-transformers-decoder-8L-1024-16h",
}
MODELS = {**{name: spec[0] for name, spec in TRANSFORMERS_MODELS.items()}, **LUCIDRAINS_MODELS}
VOCAB = {"megabyte": 256}


def build(name: str, implementation: str, seq: int):
    """The model ``name`` with its hand-written attention (``"eager"``) or its SDPA path (``"sdpa"``)."""
    torch.manual_seed(0)
    if name == "megabyte":
        from MEGABYTE_pytorch import MEGABYTE

        model = MEGABYTE(num_tokens=256, dim=(1024, 512), depth=(6, 4), max_seq_len=(seq // 16, 16), heads=16,
                         dim_head=64, flash_attn=implementation == "sdpa")
    elif name == "xtransformers":
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(num_tokens=32000, max_seq_len=seq, attn_layers=Decoder(
            dim=1024, depth=8, heads=16, attn_flash=implementation == "sdpa"))
    else:
        import transformers

        _, config_name, model_name, kwargs = TRANSFORMERS_MODELS[name]
        config = getattr(transformers, config_name)(vocab_size=32000, attn_implementation=implementation, **kwargs)
        model = getattr(transformers, model_name)(config)
        model.config.use_cache = False
    return model.to("cuda", torch.bfloat16)


def variants(name: str, compile_variants: bool, autotune: bool = False, forced: tuple[str, ...] = (),
             flex: bool = False):
    yield "eager", lambda seq: build(name, "eager", seq)
    yield "attnfuse", lambda seq: attnfuse.optimize(build(name, "eager", seq))
    if autotune:
        yield "attnfuse(autotune)", lambda seq: attnfuse.optimize(build(name, "eager", seq), autotune=True)
    for kernel in forced:
        yield f"attnfuse[{kernel}]", lambda seq, kernel=kernel: attnfuse.optimize(build(name, "eager", seq),
                                                                                 kernels=(kernel, "math"))
    yield "hf_sdpa", lambda seq: build(name, "sdpa", seq)
    if flex:
        yield "hf_flex_attention", lambda seq: build(name, "flex_attention", seq)
    if compile_variants:
        yield "compile(eager)", lambda seq: torch.compile(build(name, "eager", seq))
        yield "compile(eager, backend=attnfuse)", lambda seq: torch.compile(build(name, "eager", seq),
                                                                            backend="attnfuse")
        yield "compile(sdpa)", lambda seq: torch.compile(build(name, "sdpa", seq))


def loss_or_logits(name: str, model, tokens: torch.Tensor, train: bool) -> torch.Tensor:
    if name == "megabyte":
        return model(tokens, return_loss=True) if train else model(tokens)
    if name == "xtransformers":
        logits = model(tokens)
        if not train:
            return logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    if train:
        return model(input_ids=tokens, labels=tokens).loss
    return model(input_ids=tokens).logits


def run(name: str, model, tokens, train: bool):
    def step():
        if train:
            loss = loss_or_logits(name, model, tokens, True)
            loss.backward()
            return loss
        with torch.no_grad():
            return loss_or_logits(name, model, tokens, False)
    return step


def profile_steps(step, with_host: bool, steps: int = 3):
    """torch.profiler's per-op averages over ``steps`` calls of ``step``: GPU kernels, and host ops
    too when ``with_host`` (then an op and its kernel can both list the kernel's time as their own, as
    seen in the MEGABYTE profile, so only the GPU-only averages are summed)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if with_host else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


def gpu_ms(step, steps: int = 3) -> float:
    """Milliseconds of GPU kernel time per step, which host-time noise does not move."""
    return sum(event.self_device_time_total for event in profile_steps(step, False, steps)) / steps / 1e3


def append_profile(step, path: str, title: str) -> None:
    """Append the top ops of three steps by GPU time, with their host time, to ``path``."""
    table = profile_steps(step, True).table(sort_by="cuda_time_total", row_limit=30)
    with open(path, "a") as f:
        f.write(f"\n## {title}\n{table}\n")


def main(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_models.json")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--autotune", action="store_true", help="also attnfuse.optimize(autotune=True)")
    parser.add_argument("--shapes", default="2048x8,8192x2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    parser.add_argument("--kernels", default="", help="also attnfuse forced to each of these kernels, e.g. flash,efficient")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times, in turn, and keep the fastest (host-bound models vary "
                             "from run to run)")
    parser.add_argument("--flex", action="store_true", help="also transformers' own flex_attention path (hf_flex_attention)")
    parser.add_argument("--gpu-time", action="store_true", help="also GPU kernel ms per step (torch.profiler)")
    parser.add_argument("--profile", default=None, help="append a torch.profiler table per variant to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    print(environment())
    print("| model | seq x batch | pass | variant | ms | GPU ms | peak GB | vs eager |\n|---|---|---|---|---|---|---|---|")
    forced = tuple(k for k in args.kernels.split(",") if k)
    for shape in args.shapes.split(","):
        seq, batch = map(int, shape.split("x"))
        tokens = torch.randint(0, VOCAB.get(args.model, 32000), (batch, seq), device="cuda")
        for train in (False, True):
            runs: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for name, make in variants(args.model, args.compile, args.autotune, forced, args.flex):
                    if args.only and name not in args.only.split(","):
                        continue
                    row = time_variant(args, name, make, seq, batch, tokens, train)
                    if row is None:
                        continue
                    runs.setdefault(name, []).append(row)
                    eager_ms = fastest(runs["eager"])["ms"] if "eager" in runs else None
                    ms, gb, kernel_ms = row["ms"], row["peak_gb"], row["gpu_ms"]
                    ratio = "-" if not (ms and eager_ms) else f"{eager_ms / ms:.2f}x"
                    print(f"| {args.model} | {seq}x{batch} | {'train' if train else 'infer'} | {name} | "
                          f"{'OOM' if ms is None else f'{ms:.1f}'} | {'-' if kernel_ms is None else f'{kernel_ms:.2f}'} | "
                          f"{'-' if gb is None else f'{gb:.1f}'} | {ratio} |", flush=True)
                    save(args.out, {"environment": environment(), "rounds": args.rounds,
                                    "rows": rows + [fastest(r) for r in runs.values()]})
            rows.extend(fastest(r) for r in runs.values())
    save(args.out, {"environment": environment(), "rounds": args.rounds, "rows": rows})


def fastest(rounds: list[dict]) -> dict:
    """The round with the lowest time (out of memory counts as slowest), with every round's time."""
    best = min(rounds, key=lambda row: float("inf") if row["ms"] is None else row["ms"])
    return dict(best, ms_rounds=[row["ms"] for row in rounds])


def time_variant(args, name: str, make, seq: int, batch: int, tokens: torch.Tensor, train: bool) -> Optional[dict]:
    """One timed (and optionally profiled) run of one variant, as a JSON row; None if it cannot be built."""
    torch._dynamo.reset()
    try:
        model = make(seq)
    except Exception as error:  # e.g. a model without an sdpa implementation
        print(f"| {args.model} | {seq}x{batch} | - | {name} | unavailable: {type(error).__name__}: {error} | - | - | - |")
        return None
    model.train(train)
    ms, gb = measure(run(args.model, model, tokens, train), warmup_ms=50, rep_ms=300)
    if args.profile and ms is not None:
        append_profile(run(args.model, model, tokens, train), args.profile,
                       f"{args.model} {seq}x{batch} {'train' if train else 'inference'} {name}")
    kernel_ms = gpu_ms(run(args.model, model, tokens, train)) if args.gpu_time and ms is not None else None
    report = attnfuse.report(model).to_dict() if name.startswith("attnfuse") else None
    del model
    torch.cuda.empty_cache()
    return {"model": MODELS[args.model], "seq": seq, "batch": batch, "pass": "train" if train else "inference",
            "variant": name, "ms": ms, "gpu_ms": kernel_ms, "peak_gb": gb, "report": report}

if __name__ == "__main__":
    main()

"""End-to-end benchmark: eager transformers Llama (and naive lucidrains models) with and without attnfuse.

    python benchmarks/bench_models.py --out docs/bench_models.json [--compile] [--shapes 2048x8,8192x2]

Variants, timed in one run with the same weights and inputs: the eager-attention model, that model
under ``attnfuse.optimize`` (eager), transformers' own hand-written ``sdpa`` attention, and with
``--compile`` ``torch.compile`` of the eager model, ``torch.compile(backend="attnfuse")`` of the
eager model and ``torch.compile`` of the ``sdpa`` model. Inference is a no-grad forward; a train
step is forward + backward of the LM loss. Prints a table of ms and peak GB, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from common import environment, measure, save  # noqa: E402


MODELS = {
    "llama": ("llama-8L-1024-gqa16/4", "LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, max_position_embeddings=8192)),
    "gemma2": ("gemma2-8L-1024-gqa16/4-softcap50-window1024", "Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=64, sliding_window=1024, max_position_embeddings=8192)),
    "mpt": ("mpt-8L-1024-16h-alibi", "MptConfig", "MptForCausalLM",
            dict(d_model=1024, n_layers=8, n_heads=16, max_seq_len=8192)),
}


def build(name: str, attn_implementation: str):
    import transformers

    _, config_name, model_name, kwargs = MODELS[name]
    config = getattr(transformers, config_name)(vocab_size=32000, attn_implementation=attn_implementation, **kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to("cuda", torch.bfloat16)


def variants(name: str, compile_variants: bool):
    yield "eager", lambda: build(name, "eager")
    yield "attnfuse", lambda: attnfuse.optimize(build(name, "eager"))
    yield "hf_sdpa", lambda: build(name, "sdpa")
    if compile_variants:
        yield "compile(eager)", lambda: torch.compile(build(name, "eager"))
        yield "compile(eager, backend=attnfuse)", lambda: torch.compile(build(name, "eager"), backend="attnfuse")
        yield "compile(sdpa)", lambda: torch.compile(build(name, "sdpa"))


def run(model, tokens, train: bool):
    def step():
        if train:
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            return loss
        with torch.no_grad():
            return model(input_ids=tokens).logits
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_models.json")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--shapes", default="2048x8,8192x2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    args = parser.parse_args()
    rows = []
    print(environment())
    print("| model | seq x batch | pass | variant | ms | peak GB | vs eager |\n|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        seq, batch = map(int, shape.split("x"))
        tokens = torch.randint(0, 32000, (batch, seq), device="cuda")
        for train in (False, True):
            eager_ms = None
            for name, make in variants(args.model, args.compile):
                if args.only and name not in args.only.split(","):
                    continue
                torch._dynamo.reset()
                try:
                    model = make()
                except Exception as error:  # e.g. a model without an sdpa implementation
                    print(f"| {args.model} | {seq}x{batch} | - | {name} | unavailable: {type(error).__name__} | - | - |")
                    continue
                model.train(train)
                model.config.use_cache = False
                ms, gb = measure(run(model, tokens, train), warmup_ms=50, rep_ms=300)
                if name == "eager":
                    eager_ms = ms
                report = None
                if name == "attnfuse":
                    report = attnfuse.report(model).to_dict()
                rows.append({"model": MODELS[args.model][0], "seq": seq, "batch": batch,
                             "pass": "train" if train else "inference", "variant": name, "ms": ms, "peak_gb": gb,
                             "report": report})
                ratio = "-" if not (ms and eager_ms) else f"{eager_ms / ms:.2f}x"
                print(f"| {args.model} | {seq}x{batch} | {'train' if train else 'infer'} | {name} | "
                      f"{'OOM' if ms is None else f'{ms:.1f}'} | {'-' if gb is None else f'{gb:.1f}'} | {ratio} |",
                      flush=True)
                del model
                torch.cuda.empty_cache()
    save(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()

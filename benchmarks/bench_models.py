"""End-to-end benchmark: models with hand-written attention, with and without attnfuse.

    python benchmarks/bench_models.py --out docs/bench_models.json [--compile] [--shapes 2048x8,8192x2]

Models: transformers Llama, Gemma 2 and MPT in ``attn_implementation="eager"``, MEGABYTE-pytorch
(``flash_attn=False``) and an x-transformers decoder (naive ``Attend``). Variants, timed in one run
with the same weights and inputs: the hand-written-attention model, that model under
``attnfuse.optimize`` (eager), the model's own SDPA path (transformers' ``sdpa``, MEGABYTE's
``flash_attn=True``, x-transformers' ``attn_flash=True``; column ``hf_sdpa``), and with
``--compile`` ``torch.compile`` of the eager model, ``torch.compile(backend="attnfuse")`` of the
eager model and ``torch.compile`` of the ``sdpa`` model. Inference is a no-grad forward; a train
step is forward + backward of the LM loss. Prints a table of ms and peak GB, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

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
    "mpt": ("mpt-8L-1024-16h-alibi", "MptConfig", "MptForCausalLM",
            dict(d_model=1024, n_layers=8, n_heads=16, max_seq_len=8192)),
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


def variants(name: str, compile_variants: bool, autotune: bool = False):
    yield "eager", lambda seq: build(name, "eager", seq)
    yield "attnfuse", lambda seq: attnfuse.optimize(build(name, "eager", seq))
    if autotune:
        yield "attnfuse(autotune)", lambda seq: attnfuse.optimize(build(name, "eager", seq), autotune=True)
    yield "hf_sdpa", lambda seq: build(name, "sdpa", seq)
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/bench_models.json")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--autotune", action="store_true", help="also attnfuse.optimize(autotune=True)")
    parser.add_argument("--shapes", default="2048x8,8192x2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    print(environment())
    print("| model | seq x batch | pass | variant | ms | peak GB | vs eager |\n|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        seq, batch = map(int, shape.split("x"))
        tokens = torch.randint(0, VOCAB.get(args.model, 32000), (batch, seq), device="cuda")
        for train in (False, True):
            eager_ms = None
            for name, make in variants(args.model, args.compile, args.autotune):
                if args.only and name not in args.only.split(","):
                    continue
                torch._dynamo.reset()
                try:
                    model = make(seq)
                except Exception as error:  # e.g. a model without an sdpa implementation
                    print(f"| {args.model} | {seq}x{batch} | - | {name} | unavailable: {type(error).__name__} | - | - |")
                    continue
                model.train(train)
                ms, gb = measure(run(args.model, model, tokens, train), warmup_ms=50, rep_ms=300)
                if name == "eager":
                    eager_ms = ms
                report = None
                if name.startswith("attnfuse"):
                    report = attnfuse.report(model).to_dict()
                rows.append({"model": MODELS[args.model], "seq": seq, "batch": batch,
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

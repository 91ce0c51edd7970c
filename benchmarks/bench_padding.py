"""Padded batches: transformers models with a left-padded attention mask, eager vs attnfuse vs ``sdpa``.

    python benchmarks/bench_padding.py --model llama --shape 2048x8 --pad 512 --rounds 3

Half the batch is left-padded by ``--pad`` tokens (generation-style), so the mask is transformers'
4-d additive ``(B, 1, L, S)`` mask with rows that keep no key. attnfuse keeps a causal mask as
that bias on sites SDPA runs (Llama), and reads it as the causal triangle plus a key-padding mask on sites that go
to FlexAttention (Gemma 2's softcapped full layers, MPT's ALiBi layers); a sliding-window mask (``--model mistral``
or ``gemma2``) is read as the window plus a key-padding mask. A model without an ``sdpa`` or ``flex_attention``
path in transformers (MPT) is timed without it.

    python benchmarks/bench_padding.py --model gemma2 --shape 2048x8 --pad 1024 --flex --rounds 2 Variants are timed in turn for ``--rounds`` rounds with the same
weights and inputs; each keeps its fastest round (host time varies on a shared machine). Inference is
a no-grad forward, a train step forward + backward of the LM loss over the unpadded tokens. Prints a
table with ratios against the eager model and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from bench_models import TRANSFORMERS_MODELS, build  # noqa: E402
from common import environment, measure, save  # noqa: E402


def padded_inputs(seq: int, batch: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, the attention mask (second half of the batch left-padded by ``pad``) and LM labels."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda", generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    mask[batch // 2:, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def step(model, ids, mask, labels, train: bool):
    if train:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    else:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", choices=sorted(TRANSFORMERS_MODELS))
    parser.add_argument("--shape", default="2048x8", help="seq x batch")
    parser.add_argument("--pad", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flex", action="store_true", help="also time transformers' own flex_attention path")
    parser.add_argument("--out", default="docs/bench_padding.json")
    args = parser.parse_args()
    seq, batch = map(int, args.shape.split("x"))
    ids, mask, labels = padded_inputs(seq, batch, args.pad)
    models = {"eager": build(args.model, "eager", seq)}
    for implementation in ("sdpa", "flex_attention") if args.flex else ("sdpa",):
        try:
            models[implementation] = build(args.model, implementation, seq)
        except Exception as error:  # MPT has neither path in transformers
            print(f"{implementation}: unavailable for {args.model} ({type(error).__name__}: {error})")
    models["attnfuse"] = attnfuse.optimize(build(args.model, "eager", seq))
    rows = []
    print(environment())
    print(f"| model | seq x batch, pad | pass | variant | ms (best of {args.rounds}) | peak GB | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for train in (False, True):
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, model in models.items():
                ms, gb = measure(lambda: step(model, ids, mask, labels, train))
                if ms is not None and (name not in best or ms < best[name][0]):
                    best[name] = (ms, gb)
        for name, (ms, gb) in best.items():
            ratio = best["eager"][0] / ms
            print(f"| {args.model} | {seq}x{batch}, {args.pad} | {'train' if train else 'infer'} | {name} | {ms:.1f} | "
                  f"{gb:.1f} | {ratio:.2f}x |")
            rows.append({"model": args.model, "seq": seq, "batch": batch, "pad": args.pad, "train": train,
                         "variant": name, "ms": ms, "peak_gb": gb})
    print(attnfuse.report(models["attnfuse"]))
    save(args.out, {"environment": environment(), "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()

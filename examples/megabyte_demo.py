"""Fuse the attention of a real model (MEGABYTE-pytorch, naive attention) and print the audit.

    python examples/megabyte_demo.py            # CPU or GPU, whichever is here

MEGABYTE's ``Attend`` with ``flash_attn=False`` computes attention by hand (einsum, triu causal
mask, ``-finfo.max`` fill, softmax, einsum). attnfuse rewrites every layer into one SDPA call
without touching the model's code; the demo checks the outputs and gradients are the same.
"""
from __future__ import annotations

import copy

import torch
from MEGABYTE_pytorch import MEGABYTE

import attnfuse


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MEGABYTE(num_tokens=256, dim=(128, 64), depth=(2, 2), max_seq_len=(64, 8), heads=4, dim_head=32,
                     flash_attn=False).to(device).eval()
    tokens = torch.randint(0, 256, (2, 512), device=device)
    original = copy.deepcopy(model)

    print(attnfuse.audit(model, tokens))

    attnfuse.optimize(model)
    with torch.no_grad():
        difference = (model(tokens) - original(tokens)).abs().max().item()
    loss = model(tokens, return_loss=True)
    loss.backward()
    reference_loss = original(tokens, return_loss=True)
    reference_loss.backward()
    grad_difference = max((p.grad - r.grad).abs().max().item()
                          for p, r in zip(model.parameters(), original.parameters()) if p.grad is not None)
    print(f"\nmax |optimized - original| logits: {difference:.2e}, parameter gradients: {grad_difference:.2e}")
    print("timings: see benchmarks/ (this demo checks equality, not speed)")


if __name__ == "__main__":
    main()

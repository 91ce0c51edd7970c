"""Shared checks: run a module before and after ``optimize`` and compare outputs and gradients."""
from __future__ import annotations

import copy
from typing import Optional

import torch

import attnfuse


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    weight = torch.where(out.isnan(), torch.zeros_like(weight), weight)
    loss = (torch.nan_to_num(out) * weight).sum()
    found = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(found, inputs)]


def leaf_copies(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def run_both(module: torch.nn.Module, args: tuple, **options) -> tuple:
    """``(expected, actual, report, ref_args, opt_args)``: an unrewritten copy of ``module`` and ``module``
    under ``attnfuse.optimize`` run on separate leaf copies of ``args``."""
    reference = copy.deepcopy(module)
    optimized = attnfuse.optimize(module, **options)
    ref_args, opt_args = leaf_copies(args), leaf_copies(args)
    expected, actual = reference(*ref_args), optimized(*opt_args)
    return expected, actual, attnfuse.report(optimized), ref_args, opt_args


def assert_fused_equal(module: torch.nn.Module, args: tuple, *, fused: int = 1, atol: float = 2e-5,
                       rtol: float = 1e-4, **options) -> attnfuse.FusionReport:
    """Optimize a copy of ``module``; outputs and input gradients must match the original's."""
    torch._dynamo.reset()  # hypothesis runs many examples per test; each must compile afresh
    expected, actual, report, ref_args, opt_args = run_both(module, args, **options)
    assert report.fused == fused, str(report)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    # Rows the original fills with NaN (a -inf fill, every key masked) poison its gradients; attnfuse
    # reproduces those rows in the forward only (documented), so gradients are compared without them.
    if differentiable and not expected.isnan().any():
        g_expected = grads(expected, [ref_args[i] for i in differentiable])
        g_actual = grads(actual, [opt_args[i] for i in differentiable])
        for i, e, a in zip(differentiable, g_expected, g_actual):
            torch.testing.assert_close(a, e, atol=atol * 10, rtol=rtol * 10, equal_nan=True,
                                       msg=lambda m, i=i: f"gradient of input {i}: {m}")
    return report


def assert_same_step(reference: torch.nn.Module, optimized: torch.nn.Module, ids: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None) -> None:
    """A transformers causal LM and its optimized copy: logits and every parameter's gradient equal after one
    forward and backward on ``ids``."""
    results = []
    for model in (reference, optimized):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for e, a in zip(expected_grads, actual_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3)


def assert_same_training_steps(reference: torch.nn.Module, optimized: torch.nn.Module, lengths: tuple,
                               vocab: int = 100) -> None:
    """``assert_same_step`` at each of ``lengths`` (two sequences of random ids), one after the other in one
    process."""
    for length in lengths:
        ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(length))
        assert_same_step(reference, optimized, ids)


def count_host_reads(monkeypatch, of: tuple[str, ...] = ("dominance", "guards", "lower", "rows", "sdpa", "unpadded")) -> list:
    """Every read of a tensor's value on the host that attnfuse makes (``attnfuse.memo``'s functions, as the guards,
    the rows, the SDPA kernel and the padding reading call them; ``of``: only those modules'): one entry a read, the
    number of values it read."""
    import attnfuse.dominance as dominance
    import attnfuse.guards as guards
    import attnfuse.kernels.rows as rows
    import attnfuse.kernels.sdpa as sdpa
    import attnfuse.lower as lower
    import attnfuse.memo as memo
    import attnfuse.unpadded as unpadded

    reads = []

    def counting(read):
        def counted(*values):
            reads.append(len(values))
            return read(*values)
        return counted

    modules = {"dominance": dominance, "guards": guards, "lower": lower, "rows": rows, "sdpa": sdpa,
               "unpadded": unpadded}
    for module in (modules[name] for name in of):
        for name in ("host_bool", "host_bools", "host_values"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counting(getattr(memo, name)))
    return reads


def spy_on_sdpa(monkeypatch) -> list:
    """The ``(attn_mask given, is_causal)`` of every SDPA call attnfuse's kernel makes."""
    import attnfuse.kernels.sdpa as sdpa

    calls, run = [], sdpa.run_sdpa

    def spied(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs):
        calls.append((attn_mask is not None, is_causal))
        return run(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs)

    monkeypatch.setattr(sdpa, "run_sdpa", spied)
    return calls

"""The kernel registry: a new kernel is one class and one ``register`` line; the default order and the
reasons each kernel refuses a call are what the dispatch chose before the registry (CPU)."""
from __future__ import annotations

import copy
import sys
from typing import Optional

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnfuse
from attnfuse.kernels import AttentionCall, Kernel, KernelFailed, kernels, register, unregister
from seed_modules import PaddingStyle


class EinsumKernel(Kernel):
    """An example kernel: unmasked fp64 calls only, computed with two einsums."""

    name = "einsum"
    choices = ("einsum",)

    def refuses(self, call: AttentionCall) -> Optional[str]:
        if call.q.dtype != torch.float64:
            return "fp64 only"
        if any(x is not None for x in (call.keep, call.bias, call.causal, call.softcap, call.bias_fn)) or \
                call.dropout_p or call.k.shape[1] != call.q.shape[1]:
            return "takes only unmasked calls without score modifications"
        return None

    def run(self, call: AttentionCall) -> torch.Tensor:
        call.announce(self.name)
        scores = torch.einsum("bhid,bhjd->bhij", call.q, call.k) * call.scale_value
        return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), call.v)


class FailingKernel(Kernel):
    """Takes every call, then finds on running that it cannot (as a Flex compile failure does)."""

    name = "failing"

    def run(self, call: AttentionCall) -> torch.Tensor:
        raise KernelFailed("found on running that it cannot")


class Audit:
    """An ``on_kernel`` callback that also receives the refusals, like ``lower.KernelRecord``."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.refusals: tuple = ()

    def __call__(self, name: str) -> None:
        self.names.append(name)

    def refused(self, refusals: tuple) -> None:
        self.refusals = refusals


def _registered(kernel: Kernel, before: str):
    register(kernel, before=before)
    return kernel


@pytest.fixture
def einsum_kernel():
    kernel = _registered(EinsumKernel(), before="flex")
    yield kernel
    unregister(kernel.name)


def _reference(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v


def test_the_default_order_is_flex_then_sdpa_then_unfused():
    assert [kernel.name for kernel in kernels()] == ["flex", "sdpa", "unfused"]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), l=st.integers(1, 9), s=st.integers(1, 9), e=st.integers(1, 8),
       scale=st.sampled_from([None, 0.5, -0.3]))
def test_a_registered_kernel_runs_the_calls_it_does_not_refuse(b, h, l, s, e, scale):
    kernel = _registered(EinsumKernel(), before="flex")
    try:
        q, k, v = (torch.randn(b, h, n, e, dtype=torch.float64) for n in (l, s, s))
        audit = Audit()
        out = attnfuse.attend(q, k, v, scale=scale, on_kernel=audit)
        assert audit.names == ["einsum"] and audit.refusals == ()
        torch.testing.assert_close(out, _reference(q, k, v, scale))
        assert attnfuse.attend(q, k, v, scale=scale, kernels=["einsum"]).dtype == torch.float64
    finally:
        unregister(kernel.name)
    assert [kernel.name for kernel in kernels()] == ["flex", "sdpa", "unfused"]


def test_a_registered_kernel_refuses_with_its_reason(einsum_kernel):
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    audit = Audit()
    attnfuse.attend(q, k, v, causal="top_left", on_kernel=audit)
    assert audit.names == ["cpu-flash"]
    assert audit.refusals[0] == ("einsum", "takes only unmasked calls without score modifications")
    audit = Audit()
    attnfuse.attend(q.float(), k.float(), v.float(), on_kernel=audit)
    assert audit.names == ["cpu-flash"] and audit.refusals[0] == ("einsum", "fp64 only")


def test_a_kernel_that_fails_on_running_hands_the_call_to_the_next():
    kernel = _registered(FailingKernel(), before="flex")
    try:
        q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
        audit = Audit()
        out = attnfuse.attend(q, k, v, on_kernel=audit)
    finally:
        unregister(kernel.name)
    assert audit.names == ["cpu-flash"] and audit.refusals[0] == ("failing", "found on running that it cannot")
    torch.testing.assert_close(out, _reference(q, k, v))


def test_registering_twice_or_before_an_unknown_kernel_raises():
    with pytest.raises(ValueError, match="already registered"):
        register(kernels()[0])
    with pytest.raises(ValueError, match="no kernel named 'nope'"):
        register(EinsumKernel(), before="nope")
    with pytest.raises(ValueError, match="no kernel named 'nope'"):
        unregister("nope")


def _bias_row_masked():
    bias = torch.randn(2, 2, 5, 6)
    bias[0, 1, 2] = torch.finfo(torch.float32).min
    return bias


_NOT_ON_CPU = ("flex", "chosen on CUDA only, where it was measured faster than SDPA")
_FLEX_WANTS_NOTHING = ("flex", "SDPA runs this call (no softcap, score function, window, per-head or wider bias)")
_CASES = {  # name: (attend options, gradients, the kernels announced, the refusals of the last)
    "no mask": ({}, False, ["cpu-flash"], [_FLEX_WANTS_NOTHING]),
    "causal top-left": (dict(causal="top_left"), False, ["cpu-flash"], [_FLEX_WANTS_NOTHING]),
    "causal bottom-right": (dict(causal="bottom_right"), False, ["cpu-math (lower-right causal)"],
                            [_FLEX_WANTS_NOTHING]),
    "keep-mask": (dict(mask=torch.rand(2, 1, 1, 6) > 0.3), False, ["cpu-flash"], [_FLEX_WANTS_NOTHING]),
    "bias": (dict(bias=torch.randn(2, 2, 5, 6)), False, ["cpu-flash"], [_NOT_ON_CPU]),
    "fp32 bias on bf16 q": (dict(bias=torch.randn(1, 1, 5, 6), dtype=torch.bfloat16), False, ["cpu-flash"],
                            [_NOT_ON_CPU]),
    "softcap": (dict(softcap=5.0), False, ["unfused math"], [_NOT_ON_CPU, ("sdpa", "SDPA has no softcap")]),
    "window": (dict(causal="bottom_right", window=2), False, ["cpu-flash"], [_NOT_ON_CPU]),
    "score function": (dict(bias_fn=lambda idx: (idx[3] - idx[2]).float()), False, ["cpu-flash"], [_NOT_ON_CPU]),
    "dropout": (dict(dropout_p=0.2), False, ["cpu-math"], [("flex", "FlexAttention has no dropout")]),
    "gradients": ({}, True, ["cpu-flash"], [("flex", "FlexAttention has no backward on the CPU")]),
    "fully masked rows": (dict(mask=torch.zeros(2, 1, 1, 6, dtype=torch.bool), fully_masked_rows="nan"), False,
                          ["cpu-flash"], [_FLEX_WANTS_NOTHING]),
    "bias masking a row, gradients": (dict(bias=_bias_row_masked()), True, ["unfused math"], [
        ("flex", "FlexAttention has no backward on the CPU"),
        ("sdpa", "a bias masks every key of a row: a fused backward gives that row's gradients S times too large")]),
    "no key": (dict(keys=0), False, ["unfused math"],
               [_FLEX_WANTS_NOTHING, ("sdpa", "no key: the original sums over none and gives 0")]),
    "scale 0": (dict(scale=0.0), False, ["unfused math"],
                [_FLEX_WANTS_NOTHING, ("sdpa", "scale 0: every score is 0, nothing to fuse")]),
    "NaN in a masked key": (dict(mask=torch.arange(6).view(1, 1, 1, 6) < 5, nan_key=True), True,
                            ["cpu-flash", "unfused math (NaN/inf in masked keys)"],
                            [("flex", "FlexAttention has no backward on the CPU"), ("sdpa", "NaN/inf in masked keys")]),
    "forced math": (dict(kernels=["math"]), False, ["cpu-math"], [("flex", "not among the forced kernels")]),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_cpu_kernels_and_refusals_are_those_dispatch_chose(case):
    options, grad, announced, refusals = _CASES[case]
    options = dict(options)
    dtype, keys, nan_key = options.pop("dtype", torch.float32), options.pop("keys", 6), options.pop("nan_key", False)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=dtype) for n in (5, keys, keys))
    if nan_key:
        k[:, :, -1] = float("nan")
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    audit = Audit()
    out = attnfuse.attend(q, k, v, on_kernel=audit, **options)
    assert audit.names == announced
    assert list(audit.refusals) == refusals
    if case == "NaN in a masked key":
        assert torch.isfinite(out).all()  # the unfused rerun never read the masked key, as the original


def test_the_audit_record_keeps_the_refusals_and_the_report_text():
    module = PaddingStyle().eval()
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    mask = torch.rand(2, 4) > 0.3
    optimized = attnfuse.optimize(copy.deepcopy(module))
    optimized(q, k, v, mask)
    site = attnfuse.report(optimized).sites[0]
    assert site.record.kernel == "cpu-flash" and site.record.refusals == (_FLEX_WANTS_NOTHING,)
    assert "cpu-flash" in str(attnfuse.report(optimized)) and "SDPA runs this call" not in str(attnfuse.report(optimized))


# ----------------------------------------------------------------------------- repeated launches

class ValueKernel(Kernel):
    """Takes a call only where q's first value is positive: a refusal that depends on the values."""

    name = "by-value"

    def __init__(self) -> None:
        self.asked = 0

    def refuses(self, call: AttentionCall) -> Optional[str]:
        self.asked += 1
        return None if call.q.flatten()[0] > 0 else "q's first value is not positive"

    def run(self, call: AttentionCall) -> torch.Tensor:
        return _reference(call.q, call.k, call.v, call.scale)


def _count_full_dispatches(monkeypatch) -> list:
    """Each call that went through the kernels in order (a launch not repeated from an earlier call)."""
    attend_module = sys.modules["attnfuse.attend"]  # the module: ``attnfuse.attend`` is the function
    dispatched, real = [], attend_module._run_first_kernel

    def recording(call):
        dispatched.append(call)
        return real(call)

    monkeypatch.setattr(attend_module, "_run_first_kernel", recording)
    return dispatched


def test_a_launch_is_repeated_for_calls_of_the_same_signature(monkeypatch):
    dispatched = _count_full_dispatches(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    for L, causal in ((5, None), (5, None), (5, "top_left"), (5, "top_left"), (7, None), (5, None)):
        q, k, v = (torch.randn(2, 3, L, 8, generator=generator) for _ in range(3))
        mask = None if causal is None else torch.ones(L, L, dtype=torch.bool).tril()
        reference = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).masked_fill(
            torch.zeros((), dtype=torch.bool) if mask is None else ~mask, float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(attnfuse.attend(q, k, v, causal=causal), reference)
    # one dispatch per signature: (5, not causal), (5, causal), (7, not causal)
    assert len(dispatched) == 3


def test_rows_without_keys_are_never_repeated_unchecked(monkeypatch):
    dispatched = _count_full_dispatches(monkeypatch)
    for _ in range(3):  # bottom-right causal with more queries than keys: the first rows keep no key
        q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        out = attnfuse.attend(q, k, v, causal="bottom_right")
        assert out[:, :, :3].eq(0).all() and out[:, :, 3:].ne(0).all()
    assert len(dispatched) == 3


def test_a_kernel_registered_later_is_asked_again():
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    attnfuse.attend(q, k, v)  # a launch on SDPA is remembered for this signature
    kernel = _registered(EinsumKernel(), before="flex")
    try:
        audit = Audit()
        attnfuse.attend(q, k, v, on_kernel=audit)
        calls = []
        kernel.run = lambda call: calls.append(call) or EinsumKernel.run(kernel, call)
        out = attnfuse.attend(q, k, v)
    finally:
        unregister(kernel.name)
    assert audit.names == ["einsum"] and len(calls) == 1
    torch.testing.assert_close(out, _reference(q, k, v))


def test_a_kernel_refusing_by_values_is_asked_on_every_call():
    kernel = _registered(ValueKernel(), before="flex")
    try:
        q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
        for sign in (-1, -1, 1, -1):
            q[0, 0, 0, 0] = sign * q[0, 0, 0, 0].abs()
            attnfuse.attend(q, k, v)
    finally:
        unregister(kernel.name)
    assert kernel.asked == 4


CALL = st.fixed_dictionaries({
    "L": st.integers(1, 6), "S": st.integers(1, 6), "heads": st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    "causal": st.sampled_from([None, "top_left", "bottom_right"]), "dtype": st.sampled_from([torch.float32,
                                                                                             torch.float64]),
    "grad": st.booleans(), "transposed": st.booleans(), "scale": st.sampled_from([None, 0.5, -0.7]),
    "nan_key": st.booleans()})


def _call_reference(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    L, S = scores.shape[-2:]
    if causal is not None:
        offset = 0 if causal == "top_left" else S - L
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(offset + 1), float("-inf"))
    return torch.nan_to_num(scores.softmax(-1), nan=0.0) @ v  # a row without keys: 0, as attend's default


@settings(deadline=None)
@given(calls=st.lists(CALL, min_size=2, max_size=8))
def test_a_sweep_of_calls_in_one_process_matches_the_reference(calls):
    """Calls of many signatures in turn, signatures repeating, as a sweep makes them: every call is the reference's,
    whether its launch was dispatched or repeated (``attend._LAUNCHES``), forward and backward; a NaN in a key that
    every row masks stays out of every output."""
    generator = torch.Generator().manual_seed(len(calls))
    for spec in calls:
        (H, Hk), L, S, dtype = spec["heads"], spec["L"], spec["S"], spec["dtype"]
        q = torch.randn(2, H, L, 8, generator=generator, dtype=dtype)
        k, v = (torch.randn(2, Hk, S, 8, generator=generator, dtype=dtype) for _ in range(2))
        if spec["transposed"]:  # another stride pattern of the same shapes
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        masked_key = spec["causal"] == "top_left" and S > L
        if spec["nan_key"] and masked_key:
            k = k.clone()
            k[..., S - 1, :] = float("nan")  # masked for every row under a top-left triangle with S > L
        leaves = [t.detach().requires_grad_(spec["grad"]) for t in (q, k, v)]
        reference_leaves = [t.detach().requires_grad_(spec["grad"]) for t in (q, k, v)]
        out = attnfuse.attend(*leaves, causal=spec["causal"], scale=spec["scale"])
        expected = _call_reference(*reference_leaves, spec["causal"], spec["scale"])
        torch.testing.assert_close(out, expected)
        if spec["grad"] and not (spec["nan_key"] and masked_key):
            out.sum().backward(), expected.sum().backward()
            for a, e in zip(leaves, reference_leaves):
                torch.testing.assert_close(a.grad, e.grad)

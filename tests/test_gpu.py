"""GPU: every kernel the dispatcher can pick, fp16/bf16 against an fp32 reference; the kernels' traps.

Run on a CUDA machine with ``python -m pytest -m gpu``; everything here skips cleanly without CUDA.
Set ``ATTNFUSE_GPU_LOG=path.json`` to record which kernel ran each case.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import attnfuse
from seed_modules import BiasThenCausalStyle, GenomicsStyle, MegabyteStyle, PaddingStyle
from test_attend import reference

pytestmark = pytest.mark.gpu

KERNEL_LOG: list[dict] = []
CASES = {
    "plain": dict(L=256, S=256),
    "causal": dict(L=256, S=256, causal="top_left"),
    "causal_kv_cache": dict(L=64, S=320, causal="bottom_right"),
    "causal_more_queries": dict(L=320, S=64, causal="bottom_right", fully_masked_rows="mean"),
    "padding": dict(L=200, S=200, mask="padding", fully_masked_rows="mean"),
    "padding_len_192": dict(L=192, S=192, mask="padding", fully_masked_rows="mean"),
    "padding_causal": dict(L=128, S=128, mask="padding", causal="top_left", fully_masked_rows="mean"),
    "full_mask": dict(L=96, S=160, mask="full", fully_masked_rows="nan"),
    "bias": dict(L=128, S=192, bias=True),
    "bias_padding": dict(L=128, S=128, bias=True, mask="padding", fully_masked_rows="mean"),
    "gqa": dict(L=256, S=256, kv_heads=2, causal="top_left"),
    "gqa_padding": dict(L=128, S=128, kv_heads=2, mask="padding", fully_masked_rows="mean"),
    "single_head_kv": dict(L=128, S=128, kv_heads=0),
    "head_dim_40": dict(L=128, S=128, E=40),
    "short_keys": dict(L=17, S=17),
    "short_keys_causal": dict(L=33, S=33, causal="top_left"),
    "short_keys_padding": dict(L=64, S=64, mask="padding", fully_masked_rows="mean"),
}


def make_case(case: dict, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, h, E = 2, 8, case.get("E", 64)
    L, S = case["L"], case["S"]
    kv_heads = case.get("kv_heads", h)
    kv_shape = (b, S, E) if kv_heads == 0 else (b, kv_heads, S, E)
    q = torch.randn(b, h, L, E, device="cuda", generator=g)
    k, v = torch.randn(kv_shape, device="cuda", generator=g), torch.randn(kv_shape, device="cuda", generator=g)
    mask = None
    if case.get("mask") == "padding":
        mask = torch.rand(b, 1, 1, S, device="cuda", generator=g) > 0.3
        mask[1] = False  # every key of batch row 1 masked
    elif case.get("mask") == "full":
        mask = torch.rand(b, h, L, S, device="cuda", generator=g) > 0.5
        mask[0, :, :3] = False
    bias = torch.randn(1, h, L, S, device="cuda", generator=g) if case.get("bias") else None
    options = dict(mask=mask, bias=bias, causal=case.get("causal"), fully_masked_rows=case.get("fully_masked_rows", "zero"))
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    high = [t.clone().requires_grad_() for t in (q, k, v)]
    return low, high, options


@pytest.mark.parametrize("kernel", [None, "cudnn", "flash", "efficient", "math"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_attend_on_each_kernel_matches_fp32(name, dtype, kernel):
    low, high, options = make_case(CASES[name], dtype)
    chosen: list[str] = []
    low_options = dict(options, bias=None if options["bias"] is None else options["bias"].to(dtype))
    try:
        out = attnfuse.attend(*low, **low_options, kernels=None if kernel is None else [kernel], on_kernel=chosen.append)
    except RuntimeError as error:
        assert kernel is not None, f"dispatch failed: {error}"
        assert "forced kernels" in str(error)
        KERNEL_LOG.append({"case": name, "dtype": str(dtype), "forced": kernel, "ran": "refused"})
        pytest.skip(f"{kernel} refuses {name}")
    KERNEL_LOG.append({"case": name, "dtype": str(dtype), "forced": kernel, "ran": chosen[0] if chosen else None})
    expected = reference(*high, **options)
    tol = 2e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol, equal_nan=True)
    if options["fully_masked_rows"] == "nan":
        return  # the original's NaN rows have NaN gradients; attnfuse reproduces the forward only
    weight = torch.randn_like(expected)
    (torch.nan_to_num(out.float()) * weight).sum().backward()
    (torch.nan_to_num(expected) * weight).sum().backward()
    for a, b in zip(low, high):
        assert torch.isfinite(a.grad).all(), "NaN/inf gradient"
        torch.testing.assert_close(a.grad.float(), b.grad, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("S, E, expected", [(17, 64, "efficient"), (64, 64, "efficient"), (64, 128, "cudnn"),
                                             (80, 64, "cudnn"), (1024, 64, "cudnn")])
def test_default_kernel_on_hopper_follows_the_measured_order(S, E, expected):
    """Short keys at small head dims go to memory-efficient attention, the rest to cuDNN (bench_kernels)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the measured order is for Hopper")
    q, k, v = (torch.randn(64, 16, S, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    chosen: list[str] = []
    out = attnfuse.attend(q, k, v, causal="top_left", on_kernel=chosen.append)
    assert chosen == [expected]
    expected_out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected_out, atol=2e-2, rtol=2e-2)


def test_write_kernel_log():
    path = os.environ.get("ATTNFUSE_GPU_LOG")
    if path:
        with open(path, "w") as f:
            json.dump(KERNEL_LOG, f, indent=1)


SEED_CASES = [
    (GenomicsStyle, dict(causal=True), "bias"),
    (MegabyteStyle, dict(causal=True), None),
    (PaddingStyle, dict(), "mask"),
    (PaddingStyle, dict(scale=0.3), "mask"),
    (BiasThenCausalStyle, dict(causal=True), "bias"),
]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed_index", range(len(SEED_CASES)))
def test_seed_modules_fused_on_gpu_match_fp32(seed_index, dtype, compiler):
    torch._dynamo.reset()
    cls, kwargs, extra = SEED_CASES[seed_index]
    b, h, L, S, E = 2, 4, 96, 160, 64
    g = torch.Generator(device="cuda").manual_seed(seed_index)
    q, k, v = (torch.randn(b, h, n, E, device="cuda", generator=g) for n in (L, S, S))
    args = [q, k, v]
    if extra == "mask":
        mask = torch.rand(b, S, device="cuda", generator=g) > 0.3
        mask[0] = False
        args.append(mask)
    elif extra == "bias":
        args += [None, torch.randn(h, L, S, device="cuda", generator=g)] if cls is GenomicsStyle else \
            [torch.randn(h, L, S, device="cuda", generator=g)]
    reference_model = cls(**kwargs).eval()
    expected = reference_model(*args)
    model = attnfuse.optimize(copy.deepcopy(reference_model), compiler=compiler)
    out = model(*[a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert attnfuse.report(model).fused == 1
    tol = 2e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_string_backend_compiles_with_inductor_on_gpu():
    torch._dynamo.reset()
    model = MegabyteStyle(causal=True).eval()
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = model(q.float(), k.float(), v.float())
    out = torch.compile(model, backend="attnfuse")(q, k, v)
    torch.testing.assert_close(out.float(), expected, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("L", [1, 77])
@pytest.mark.parametrize("grad", [False, True])
def test_grouped_heads_with_a_padding_mask_share_kv_heads_on_cuda(L, grad):
    """A grouped-query call with a key-padding mask runs without repeating k and v where cuDNN takes shared
    heads with a mask; output and gradients match the fp32 original (the repeat was a copy per query group)."""
    g = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(2, 8, L, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", generator=g) for _ in range(2))
    keep = torch.ones(2, 1, 1, 300, dtype=torch.bool, device="cuda")
    keep[1, ..., :120] = False

    def original(q, k, v):
        scores = q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 8
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1) @ v.repeat_interleave(4, 1)

    half = [t.bfloat16().requires_grad_(grad) for t in (q, k, v)]
    full = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    kernels = []
    with torch.set_grad_enabled(grad):
        out = attnfuse.attend(*half, mask=keep, fully_masked_rows="mean", on_kernel=kernels.append)
        expected = original(*full)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    if grad:
        out.float().pow(2).sum().backward()
        expected.pow(2).sum().backward()
        for a, b in zip(half, full):
            torch.testing.assert_close(a.grad.float(), b.grad, atol=6e-2, rtol=6e-2)


def test_flex_with_a_dense_bias_and_grouped_heads_compiles_on_cuda():
    """Gemma 2's sliding-window layer when its mask is a dense (B, 1, L, S) bias (transformers 5.17 at 2048
    tokens): Flex's default configurations ran out of shared memory on an H100 (245760 > 232448 bytes) and the
    site ran unfused; it must run on Flex (with one pipeline stage) and match the fp32 original."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 16, 2048, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    i = torch.arange(2048, device="cuda")
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 1024)
    bias = torch.where(keep, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16).expand(2, 1, 2048, 2048)
    kernels = []
    with torch.no_grad():
        out = attnfuse.attend(q, k, v, bias=bias, softcap=50.0, on_kernel=kernels.append)
    scores = q.float() @ k.float().repeat_interleave(4, 1).transpose(-1, -2) / 8
    expected = (50 * torch.tanh(scores / 50) + bias.float()).softmax(-1) @ v.float().repeat_interleave(4, 1)
    assert kernels == ["flex"], kernels
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("pad", [0, 5])
def test_static_cache_generate_compiled_through_attnfuse_with_cuda_graphs(pad):
    """The compiled route of generation: transformers compiles a static-cache forward with
    ``CompileConfig(backend="attnfuse")`` (its default mode, reduce-overhead: CUDA graphs); greedy tokens equal
    the eager model's (fp32), and the report lists the fused sites."""
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager", pad_token_id=0)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(3, 256, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    common = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, disable_compile=True, **common)
        tokens = model.generate(ids, compile_config=CompileConfig(backend="attnfuse"), **common)
    assert torch.equal(tokens, expected)
    report = attnfuse.last_report()
    assert report is not None and report.fused >= 2, str(report)


def _raw_cudnn_grad_is_finite(L: int, S: int, mask: torch.Tensor) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    return bool(torch.isfinite(q.grad).all())


def test_trap_cudnn_nan_grad_at_64_mod_128_is_avoided(capsys):
    """pytorch#196678: cuDNN + mask at lengths 64 mod 128 gives NaN grad_q; dispatch must not pick it."""
    L = S = 192
    mask = torch.rand(1, 1, 1, S, device="cuda") > 0.2
    try:
        raw_finite = _raw_cudnn_grad_is_finite(L, S, mask)
    except RuntimeError:
        raw_finite = None
    print(f"raw cuDNN grad finite at L=S=192 with a mask: {raw_finite}")
    q = torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    chosen = []
    attnfuse.attend(q, k, v, mask=mask, on_kernel=chosen.append).sum().backward()
    assert chosen[0] != "cudnn" and torch.isfinite(q.grad).all()


def test_trap_cudnn_fully_masked_boolean_row_is_restored():
    """pytorch#177842: cuDNN treats a boolean row that masks every key as unmasked; attend restores it."""
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 128, dtype=torch.bool, device="cuda")
    mask[1] = False
    out = attnfuse.attend(q, k, v, mask=mask, kernels=["cudnn"], fully_masked_rows="mean")
    torch.testing.assert_close(out[1].float(), v[1].float().mean(-2, keepdim=True).expand_as(out[1]), atol=2e-2, rtol=2e-2)
    assert (attnfuse.attend(q, k, v, mask=mask, kernels=["cudnn"])[1] == 0).all()


def test_trap_fp32_bias_with_bf16_inputs_is_cast():
    """PR #191612: an fp32 additive mask with bf16 q/k/v gives NaN on cuDNN; attend casts it first."""
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 4, 128, 128, device="cuda")
    out = attnfuse.attend(q, k, v, bias=bias)
    assert torch.isfinite(out).all()
    expected = reference(q.float(), k.float(), v.float(), bias=bias)
    torch.testing.assert_close(out.float(), expected, atol=4e-2, rtol=4e-2)


SCORE_MODULES = ["alibi_causal", "alibi_symmetric", "bucket_bias", "softcap_window"]


def _score_module(name: str):
    from score_modules import AlibiCausal, AlibiSymmetric, BucketBias, SoftcapWindow

    return {"alibi_causal": lambda: AlibiCausal(4), "alibi_symmetric": lambda: AlibiSymmetric(4),
            "bucket_bias": lambda: BucketBias(4), "softcap_window": lambda: SoftcapWindow(cap=20.0, window=48)}[name]()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SCORE_MODULES)
def test_score_modifications_on_flex_match_fp32(name, dtype):
    """On the GPU these sites run on FlexAttention, forward and backward, against an fp32 reference."""
    torch._dynamo.reset()
    reference = _score_module(name).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", generator=g) for n in (160, 256, 256))
    high = [t.clone().requires_grad_() for t in (q, k, v)]
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    expected = reference(*high)
    unrewritten = copy.deepcopy(reference).to(dtype)
    with torch.no_grad():
        naive_error = (unrewritten(*low).float() - expected).abs().max().item()
    model = attnfuse.optimize(copy.deepcopy(reference).to(dtype))
    out = model(*low)
    site = attnfuse.report(model).sites[0]
    assert site.status == "fused" and site.backend == "flex", str(attnfuse.report(model))
    # Unscaled scores (the bucket bias) are far from the fp32 answer in bf16 even unrewritten: attnfuse
    # must be within the dtype's tolerance or at least as close as the unrewritten model in that dtype.
    tol = max(2e-2 if dtype == torch.float16 else 4e-2, 1.5 * naive_error)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    weight = torch.randn_like(expected)
    (out.float() * weight).sum().backward()
    (expected * weight).sum().backward()
    for a, b in zip(low, high):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_gpu_matches_unrewritten_under_autocast(dtype):
    """Under torch.autocast the optimized model matches the unrewritten one under the same autocast."""
    torch._dynamo.reset()
    from test_api import TinyBlock

    reference = TinyBlock(dim=64, heads=4).cuda()
    model = attnfuse.optimize(copy.deepcopy(reference))
    x = torch.randn(2, 96, 64, device="cuda")
    x_ref, x_opt = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        expected, actual = reference(x_ref), model(x_opt)
    assert attnfuse.report(model).fused == 1
    tol = 2e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)
    actual.float().sum().backward()
    expected.float().sum().backward()
    torch.testing.assert_close(x_opt.grad, x_ref.grad, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("case", ["plain", "padding", "gqa"])
def test_autotune_on_gpu_picks_a_valid_kernel_and_stays_exact(case):
    from attnfuse.kernels.autotune import winners

    low, high, options = make_case(CASES[case], torch.bfloat16)
    chosen: list[str] = []
    out = attnfuse.attend(*low, **options, autotune=True, on_kernel=chosen.append)
    print(f"autotune {case}: {chosen[0]}; cached winners: {len(winners())}")
    torch.testing.assert_close(out.float(), reference(*high, **options), atol=4e-2, rtol=4e-2, equal_nan=True)
    assert chosen[0] in ("cudnn", "flash", "efficient", "math")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reused_padding_mask_changed_in_place_is_rechecked_on_gpu(dtype):
    """The row check is memoized per unchanged mask (one sync); an in-place change must be seen."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 8, 384, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(4, 384, dtype=torch.bool, device="cuda")
    mask[2, 100:] = False
    module = PaddingStyle().eval()
    optimized = attnfuse.optimize(copy.deepcopy(module))
    for change in (None, 1, 3, None):
        if change is not None:
            mask[change] = False  # every key of this batch row masked: output must be the mean of v
        expected = module(q.float(), k.float(), v.float(), mask)
        actual = optimized(q, k, v, mask)
        torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_run_time_causal_bias_runs_is_causal_on_cuda(dtype, monkeypatch):
    """transformers' eager mask handed to a layer's graph (as across FSDP2's graph breaks): the calls where it is
    the causal triangle run SDPA's ``is_causal`` without it (flash or cuDNN in bf16), a padded one runs as a bias;
    forward and backward equal the unrewritten module's."""
    from torch.nn.attention.bias import CausalBias

    import attnfuse.kernels.sdpa as sdpa
    from test_run_time_causal import BiasArgument, additive, call_and_compare, site_counts, triangle

    seen, run = [], sdpa.run_sdpa

    def spied(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs):  # lower-right causal is a CausalBias
        seen.append("causal" if is_causal or isinstance(attn_mask, CausalBias) else
                    "tensor" if attn_mask is not None else "none")
        return run(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs)

    monkeypatch.setattr(sdpa, "run_sdpa", spied)
    model = attnfuse.optimize(BiasArgument())
    atol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    for L, S, padded in ((256, 256, False), (256, 256, True), (64, 320, False)):
        q = torch.randn(2, 8, L, 64, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, 8, S, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        mask = additive(triangle(L, S), dtype, None).expand(2, 1, L, S).contiguous().cuda()
        if padded:
            mask[1, :, :, 1:5] = torch.finfo(dtype).min  # padding; every row keeps key 0
        seen.clear()
        call_and_compare(model, BiasArgument(), q, k, v, mask, atol)
        assert seen and seen[0] == ("tensor" if padded else "causal"), seen
    assert site_counts(model)["causal"] >= 1


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_long_cache_key_padding_on_cuda_reads_once_and_matches(bad):
    """A decode step over a padded cache past the zeroing limit (k not copied): the rows without keys and the output's
    leak check are one host read; a NaN in a padded key reruns unfused; a fully padded sequence gets the mean of v;
    a second call (the shared-heads answer remembered) gives the same output."""
    g = torch.Generator(device="cuda").manual_seed(3)
    S = 40000  # k of 2 x 2 x 40000 x 64 bf16 is past ``kernels.sdpa.ZEROING_LIMIT_BYTES``
    q = torch.randn(3, 8, 1, 64, device="cuda", generator=g)
    k, v = (torch.randn(3, 2, S, 64, device="cuda", generator=g) for _ in range(2))
    keep = torch.ones(3, 1, 1, S, dtype=torch.bool, device="cuda")
    keep[1, ..., :S // 4] = False
    keep[2] = False
    if bad is not None:
        k[1, :, 7] = bad

    def original(q, k, v):
        scores = q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 8
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1) @ v.repeat_interleave(4, 1)

    half = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad():
        expected = original(q, k, v)
        first = attnfuse.attend(*half, mask=keep, fully_masked_rows="mean")
        second = attnfuse.attend(*half, mask=keep, fully_masked_rows="mean")
    torch.testing.assert_close(first.float(), expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(second, first)

"""The five seed spellings, fused, equal to the original in outputs and gradients (fp32, CPU)."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from helpers import assert_fused_equal
from seed_modules import BiasThenCausalStyle, GenomicsStyle, MegabyteStyle, PaddingStyle

sizes = st.fixed_dictionaries({
    "b": st.integers(1, 3), "h": st.integers(1, 4), "i": st.integers(1, 9), "j": st.integers(1, 9),
    "d": st.integers(1, 12),
})


def qkv(s: dict, single_head: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    kv_shape = (s["b"], s["j"], s["d"]) if single_head else (s["b"], s["h"], s["j"], s["d"])
    return (torch.randn(s["b"], s["h"], s["i"], s["d"], generator=g).requires_grad_(),
            torch.randn(kv_shape, generator=g).requires_grad_(),
            torch.randn(kv_shape, generator=g).requires_grad_())


def padding_mask(s: dict, data: st.DataObject) -> torch.Tensor:
    """A ``(b, j)`` keep-mask; some draws mask every key of a batch row."""
    keep = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=s["j"], max_size=s["j"]),
                                           min_size=s["b"], max_size=s["b"])))
    return keep


def bias_tensor(s: dict, data: st.DataObject) -> torch.Tensor:
    shape = data.draw(st.sampled_from([(s["b"], s["h"], s["i"], s["j"]), (s["h"], s["i"], s["j"]),
                                       (1, 1, s["i"], s["j"]), (s["i"], s["j"]), (s["b"], 1, 1, s["j"])]))
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()


@given(s=sizes, causal=st.booleans(), single_head=st.booleans(), with_bias=st.booleans())
def test_genomics_style(s, causal, single_head, with_bias):
    q, k, v = qkv(s, single_head)
    bias = torch.randn(s["h"], s["i"], s["j"]).requires_grad_() if with_bias else None
    assert_fused_equal(GenomicsStyle(causal=causal).eval(), (q, k, v, None, bias))


@given(s=sizes, causal=st.booleans(), single_head=st.booleans())
def test_megabyte_style(s, causal, single_head):
    assert_fused_equal(MegabyteStyle(causal=causal).eval(), qkv(s, single_head))


@given(s=sizes, data=st.data(), with_mask=st.booleans())
def test_padding_style(s, data, with_mask):
    mask = padding_mask(s, data) if with_mask else None
    assert_fused_equal(PaddingStyle().eval(), (*qkv(s), mask))


@given(s=sizes, data=st.data(), scale=st.floats(0.01, 4.0))
def test_padding_style_custom_scale(s, data, scale):
    report = assert_fused_equal(PaddingStyle(scale=scale).eval(), (*qkv(s), padding_mask(s, data)))
    assert abs(report.sites[0].features["scale"] - scale) < 1e-5


@given(s=sizes, data=st.data(), causal=st.booleans(), with_bias=st.booleans())
def test_bias_then_causal_style(s, data, causal, with_bias):
    bias = bias_tensor(s, data) if with_bias else None
    assert_fused_equal(BiasThenCausalStyle(causal=causal).eval(), (*qkv(s), bias))


def test_every_key_masked_gives_mean_of_v():
    """The seeds' finite fill makes a fully masked row uniform: the output is the mean of v, not 0 or NaN."""
    s = {"b": 2, "h": 2, "i": 3, "j": 5, "d": 4}
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    q, k, v = qkv(s)
    assert_fused_equal(PaddingStyle().eval(), (q, k, v, mask))
    out = PaddingStyle().eval()(q, k, v, mask)
    torch.testing.assert_close(out[1], v[1].mean(dim=-2, keepdim=True).expand_as(out[1]))


def test_causal_with_more_queries_than_keys_fills_leading_rows_with_mean():
    s = {"b": 1, "h": 2, "i": 7, "j": 3, "d": 4}
    report = assert_fused_equal(MegabyteStyle(causal=True).eval(), qkv(s))
    assert report.sites[0].features["causal"] == "bottom_right"


def test_dropout_is_applied_in_training_with_the_same_expectation():
    """Train mode: dropout p=0.5 runs inside the fused kernel; the mean over many draws is the eval output."""
    torch.manual_seed(0)
    s = {"b": 1, "h": 1, "i": 4, "j": 6, "d": 8}
    q, k, v = (t.detach() for t in qkv(s))
    reference = MegabyteStyle(causal=True, dropout=0.5).eval()
    expected = reference(q, k, v)
    import attnfuse

    model = attnfuse.optimize(MegabyteStyle(causal=True, dropout=0.5).train())
    draws = torch.stack([model(q, k, v) for _ in range(400)])
    report = attnfuse.report(model)
    assert report.fused == 1 and report.sites[0].features["dropout"] == 0.5
    assert not torch.allclose(draws[0], expected, atol=1e-3)
    torch.testing.assert_close(draws.mean(0), expected, atol=0.15, rtol=0.1)
    # About half the probabilities are zeroed: the spread across draws is far above rounding.
    assert draws.std(0).mean() > 0.1

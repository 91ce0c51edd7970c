"""Real models with hand-written attention, built from tiny configs (no weights, no downloads).

Each model runs in eval mode, fp32, on the CPU. An unoptimized deep copy is the reference: every
attention layer must be fused (``report.fused`` equals the number of attention layers, nothing is
skipped), the outputs must match at fp32 tolerance, and for GPT-2, Llama and BERT (and a few more)
the parameter gradients of a scalar loss must match too.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

import attnfuse

pytestmark = pytest.mark.models

ATOL, RTOL = 1e-5, 1e-4
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-3


# ----------------------------------------------------------------------------- helpers

def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(shape: tuple[int, ...], vocab: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    return torch.randint(low, vocab, shape, generator=_generator(seed))


def _main_output(out: Any) -> torch.Tensor:
    """``last_hidden_state`` or ``logits`` of a transformers output, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"no last_hidden_state / logits in {type(out).__name__}")


def _extra_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """Other tensors worth comparing (an encoder-decoder's encoder output)."""
    value = getattr(out, "encoder_last_hidden_state", None)
    return [("encoder_last_hidden_state", value)] if isinstance(value, torch.Tensor) else []


def _scalar_loss(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    weight = torch.randn(out.shape, generator=_generator(seed), dtype=out.dtype)
    return (out * weight).sum()


def check_model(model: torch.nn.Module, call: Callable[[torch.nn.Module], Any], *, layers: int,
                check_param_grads: bool = False, atol: float = ATOL, rtol: float = RTOL) -> attnfuse.FusionReport:
    """Optimize ``model``; compare with an unoptimized deep copy. ``call(m)`` runs one forward."""
    model = model.eval()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    optimized = attnfuse.optimize(model)

    expected_out = call(reference)
    actual_out = call(optimized)
    report = attnfuse.report(optimized)
    assert report.fused == layers and report.skipped == 0, str(report)

    expected, actual = _main_output(expected_out), _main_output(actual_out)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    for (name, e), (_, a) in zip(_extra_outputs(expected_out), _extra_outputs(actual_out)):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")

    if check_param_grads:
        _scalar_loss(expected).backward()
        _scalar_loss(actual).backward()
        ref_params = dict(reference.named_parameters())
        opt_params = dict(optimized.named_parameters())
        assert ref_params.keys() == opt_params.keys()
        compared = 0
        for name, p_ref in ref_params.items():
            p_opt = opt_params[name]
            if p_ref.grad is None:
                assert p_opt.grad is None or not p_opt.grad.any(), f"{name}: gradient only after optimize"
                continue
            assert p_opt.grad is not None, f"{name}: no gradient after optimize"
            torch.testing.assert_close(p_opt.grad, p_ref.grad, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                       msg=lambda m, name=name: f"gradient of {name}: {m}")
            compared += 1
        assert compared > 0
    return report


# ----------------------------------------------------------------------------- transformers

def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build()


def build_gpt2(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=layers, n_head=4, n_embd=64, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return _seeded(lambda: transformers.GPT2Model(config))


def build_bert(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                                     intermediate_size=128, vocab_size=100, max_position_embeddings=32,
                                     pad_token_id=0, attn_implementation="eager")
    return _seeded(lambda: transformers.BertModel(config, add_pooling_layer=False))


def build_llama(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=64, intermediate_size=128, vocab_size=100,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, attn_implementation="eager")
    return _seeded(lambda: transformers.LlamaModel(config))


def build_t5(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(num_layers=layers, num_decoder_layers=layers, num_heads=4, d_model=64,
                                   d_kv=16, d_ff=128, vocab_size=100, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, attn_implementation="eager")
    return _seeded(lambda: transformers.T5Model(config))


def build_vit(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                                    intermediate_size=128, image_size=16, patch_size=4, num_channels=3,
                                    attn_implementation="eager")
    return _seeded(lambda: transformers.ViTModel(config, add_pooling_layer=False))


def build_whisper(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                                        decoder_attention_heads=4, d_model=64, encoder_ffn_dim=128,
                                        decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None,
                                        begin_suppress_tokens=None, attn_implementation="eager")
    return _seeded(lambda: transformers.WhisperModel(config))


def test_gpt2():
    model = build_gpt2(layers=2)
    ids = _tokens((2, 12), 100)
    check_model(model, lambda m: m(input_ids=ids, use_cache=False), layers=2, check_param_grads=True)


def test_bert_with_padding_mask():
    model = build_bert(layers=2)
    ids = _tokens((2, 10), 100, low=1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # second row: last four tokens are padding
    ids[1, 6:] = 0
    check_model(model, lambda m: m(input_ids=ids, attention_mask=mask), layers=2, check_param_grads=True)


def test_llama_grouped_query():
    model = build_llama(layers=2)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = _tokens((2, 12), 100)
    check_model(model, lambda m: m(input_ids=ids, use_cache=False), layers=2, check_param_grads=True)


def test_llama_grouped_query_is_recognized():
    """``repeat_kv`` (expand + reshape) is seen as 2 shared k/v heads, not 4 materialized copies."""
    model = build_llama(layers=1)
    ids = _tokens((1, 8), 100)
    report = check_model(model, lambda m: m(input_ids=ids, use_cache=False), layers=1)
    features = report.sites[0].features
    assert (features["q_heads"], features["kv_heads"]) == (4, 2), features


def test_t5_encoder_decoder():
    model = build_t5(layers=2)
    ids = _tokens((2, 10), 100, low=2)
    decoder_ids = _tokens((2, 7), 100, seed=1, low=2)
    # 2 encoder self-attention + 2 decoder self-attention + 2 cross-attention layers.
    check_model(model, lambda m: m(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False), layers=6,
                check_param_grads=True)


def test_vit():
    model = build_vit(layers=2)
    pixels = torch.randn(2, 3, 16, 16, generator=_generator(0))
    check_model(model, lambda m: m(pixel_values=pixels), layers=2, check_param_grads=True)


def test_whisper_encoder_decoder():
    model = build_whisper(layers=2)
    # Whisper's encoder takes 2 * max_source_positions mel frames (two convolutions, the second with stride 2).
    features = torch.randn(2, 8, 32, generator=_generator(0))
    decoder_ids = _tokens((2, 5), 100, seed=1, low=4)
    # 2 encoder self-attention + 2 decoder self-attention + 2 cross-attention layers.
    check_model(model, lambda m: m(input_features=features, decoder_input_ids=decoder_ids, use_cache=False),
                layers=6, check_param_grads=True)


# ----------------------------------------------------------------------------- x-transformers

def build_x_decoder() -> torch.nn.Module:
    xt = pytest.importorskip("x_transformers")
    return _seeded(lambda: xt.TransformerWrapper(num_tokens=100, max_seq_len=32,
                                                 attn_layers=xt.Decoder(dim=64, depth=2, heads=4)))


def build_x_encoder() -> torch.nn.Module:
    xt = pytest.importorskip("x_transformers")
    return _seeded(lambda: xt.TransformerWrapper(num_tokens=100, max_seq_len=32,
                                                 attn_layers=xt.Encoder(dim=64, depth=2, heads=4)))


def test_x_transformers_decoder():
    model = build_x_decoder()
    ids = _tokens((2, 12), 100)
    check_model(model, lambda m: m(ids), layers=2, check_param_grads=True)


def test_x_transformers_encoder_with_padding_mask():
    model = build_x_encoder()
    ids = _tokens((2, 10), 100)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    check_model(model, lambda m: m(ids, mask=mask), layers=2, check_param_grads=True)


# ----------------------------------------------------------------------------- MEGABYTE-pytorch

def build_megabyte() -> torch.nn.Module:
    mb = pytest.importorskip("MEGABYTE_pytorch")
    return _seeded(lambda: mb.MEGABYTE(num_tokens=256, dim=(64, 32), depth=(2, 2), max_seq_len=(16, 4),
                                       flash_attn=False))


def test_megabyte():
    model = build_megabyte()
    ids = _tokens((2, 64), 256)
    # depth (2, 2): two global and two local attention layers.
    check_model(model, lambda m: m(ids), layers=4, check_param_grads=True)

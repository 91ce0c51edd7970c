"""Coverage table: which hand-written attention spellings and real models attnfuse fuses, and what
torch.compile's own attention fusion (Inductor's ``fuse_attention`` pattern matcher) does with them.

    python benchmarks/coverage.py --write            # every entry; writes docs/coverage.md
    python benchmarks/coverage.py --no-inductor      # attnfuse only (Inductor on the CPU is slow)
    python benchmarks/coverage.py --only gpt2,bloom  # some entries (keys: --list)

Every entry is built small (eval mode, fp32, CPU) from the test-owned modules under ``tests/``
(spelling families, score-modification modules) or from tiny configs of real models. For each:
``attnfuse.audit`` (verified, changes nothing) gives the sites found, fused and skipped, their
features and kernel; ``torch.compile(module, backend="inductor")`` runs once (with gradients enabled,
as the audit does, then once more under ``torch.no_grad()``) and reports how many sites Inductor's
``fuse_attention`` patterns fused. An entry that raises is reported in its row, never stops the run.

Inductor's sites are counted as the SDPA ops in the graph Inductor lowers (after its post-grad
passes) minus those already in the Dynamo graph, not read from ``counters["inductor"]["fuse_attention"]``:
that counter is bumped each time a replacement is traced, which is twice per fused site when
gradients are enabled (Whisper: 4 sites, counter 8). The counter's totals are printed as well. The
FX-graph and AOTAutograd caches are turned off for these compiles, so a cache hit cannot skip the passes.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)  # this checkout, not an installed copy

import attnfuse  # noqa: E402
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402

SEQ = 9  # sequence length of the real models


# ----------------------------------------------------------------------------- inputs

def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def bhnd(b: int = 2, h: int = 4, i: int = 9, j: int = 9, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return randn(b, h, i, d, seed=seed), randn(b, h, j, d, seed=seed + 1), randn(b, h, j, d, seed=seed + 2)


def tokens(shape: tuple[int, ...], vocab: int = 100, seed: int = 0, low: int = 0) -> torch.Tensor:
    return torch.randint(low, vocab, shape, generator=_gen(seed))


def keep_mask(b: int = 2, j: int = 9, pad_from: int = 6) -> torch.Tensor:
    """Key-padding keep mask (True = attend): the second row's last keys are padding."""
    mask = torch.ones(b, j, dtype=torch.bool)
    mask[1, pad_from:] = False
    return mask


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build()


Built = tuple[torch.nn.Module, tuple, dict]


@dataclass
class Entry:
    key: str
    label: str
    build: Callable[[], Built]
    note: str = ""  # expectation shown in the row (e.g. a documented skip)


# ----------------------------------------------------------------------------- entries: spelling families

def _seed_entries() -> list[Entry]:
    from seed_modules import BiasThenCausalStyle, GenomicsStyle, MegabyteStyle, PaddingStyle

    def genomics():
        q = randn(2, 4, 9, 16)
        k, v = randn(2, 9, 16, seed=1), randn(2, 9, 16, seed=2)  # one k/v head shared by all q heads
        return GenomicsStyle(causal=True).eval(), (q, k, v), {"attn_bias": randn(4, 9, 9, seed=3)}

    def megabyte():
        return MegabyteStyle(causal=True).eval(), bhnd(), {}

    def padding(scale=None):
        return lambda: (PaddingStyle(scale=scale).eval(), bhnd(), {"mask": keep_mask()})

    def bias_then_causal():
        return BiasThenCausalStyle(causal=True).eval(), bhnd(i=5, j=9), {"bias": randn(1, 4, 5, 9, seed=3)}

    return [
        Entry("seed_genomics", "seed: GenomicsStyle (causal + bias, single-head k/v)", genomics),
        Entry("seed_megabyte", "seed: MegabyteStyle (causal)", megabyte),
        Entry("seed_padding", "seed: PaddingStyle (key padding)", padding()),
        Entry("seed_padding_scale", "seed: PaddingStyle(scale=0.3)", padding(0.3)),
        Entry("seed_bias_causal", "seed: BiasThenCausalStyle (q_len 5, k_len 9)", bias_then_causal),
    ]


def _family_entries() -> list[Entry]:
    import test_families as tf

    def nanogpt():
        return seeded(tf.NanoGPTSelfAttention).eval(), (randn(2, 9, 32),), {}

    def timm():
        return seeded(tf.TimmAttention).eval(), (randn(2, 9, 32),), {}

    def diffusers_self():
        return seeded(tf.DiffusersAttention).eval(), (randn(2, 9, 32),), {}

    def diffusers_cross_mask():
        module = seeded(lambda: tf.DiffusersAttention(cross_dim=24)).eval()
        return module, (randn(2, 6, 32), randn(2, 9, 24, seed=1), keep_mask()), {}

    def where_cross():
        mask = keep_mask(3, 9)
        mask[2] = False  # a row with every key masked
        return seeded(tf.WhereMaskCrossAttention).eval(), (randn(3, 5, 32), randn(3, 9, 24, seed=1), mask), {}

    def alibi():
        return tf.AlibiCausalAttention(heads=4).eval(), bhnd(i=5, j=9), {}

    def kv_cache():
        args = (randn(2, 3, 32), randn(2, 4, 9, 8, seed=1), randn(2, 4, 9, 8, seed=2))
        return seeded(tf.KVCacheAttention).eval(), args, {}

    def softmax(spelling):
        return lambda: (tf.SoftmaxSpelling(spelling).eval(), bhnd(i=6, j=9), {})

    def bshd():
        return tf.BSHDEinsumAttention().eval(), (randn(2, 6, 4, 16), randn(2, 9, 4, 16, seed=1),
                                                 randn(2, 9, 4, 16, seed=2)), {}

    return [
        Entry("nanogpt", "family: nanoGPT (tril buffer, -inf fill)", nanogpt),
        Entry("timm", "family: timm vision Attention", timm),
        Entry("diffusers", "family: diffusers baddbmm (self)", diffusers_self),
        Entry("diffusers_cross_mask", "family: diffusers baddbmm (cross, additive mask)", diffusers_cross_mask),
        Entry("where_cross", "family: cross-attention, torch.where padding", where_cross),
        Entry("alibi_family", "family: ALiBi causal (arange bias)", alibi),
        Entry("kv_cache", "family: KV-cache decoding (3 new, 9 cached)", kv_cache),
        Entry("softmax_float_to", "family: fp32 softmax `.float().softmax().to()`", softmax("float_then_to")),
        Entry("softmax_dtype_type_as", "family: fp32 softmax `F.softmax(dtype=fp32).type_as()`",
              softmax("F_dtype_float32_type_as")),
        Entry("bshd_einsum", "family: BSHD einsum (b s h d layout)", bshd),
    ]


def _round_two_entries() -> list[Entry]:
    """The spelling families of the second coverage round (the modules their tests use)."""
    import test_bias_families as bf
    import test_mask_families as mf
    import test_reshaped_scores as rs

    def swin():
        mask = torch.where(randn(3, 9, 9, seed=5) > 1.0, -100.0, 0.0)
        return rs.SwinWindows().eval(), (*[randn(2 * 3, 4, 9, 16, seed=i) for i in range(3)], randn(4, 9, 9, seed=4),
                                         mask), {}

    def bloom():
        return rs.BloomAlibi(4).eval(), (*bhnd(), randn(2 * 4, 1, 9, seed=3), ~keep_mask()), {}

    def sam():
        return seeded(lambda: rs.SamRelPos((3, 3), 16)).eval(), tuple(randn(8, 9, 16, seed=i) for i in range(3)), {}

    def area():
        return rs.AreaAttention().eval(), tuple(randn(2, 4, 16, 9, seed=i) for i in range(3)), {}

    def gpt_neo():
        keep = keep_mask()
        mask = torch.where(keep[:, None, None, :] & torch.ones(9, 9, dtype=torch.bool).tril(), 0.0,
                           torch.finfo(torch.float32).min)
        return mf.FillThenBias().eval(), (*bhnd(), mask), {}

    def region():
        keep = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        return mf.RegionWrites("add").eval(), (*bhnd(), randn(2, 4, 8, 8, seed=3), keep), {}

    def zeroed():
        mask = keep_mask()[:, None, None, :].expand(2, 1, 9, 9)
        return mf.ZeroedWeights().eval(), (*bhnd(), mask, torch.zeros(9, 9)), {}

    def gqa_scale():
        q, k, v = randn(2, 4, 9, 16), randn(2, 2, 9, 16, seed=1), randn(2, 2, 9, 16, seed=2)
        return bf.ScaledAfterRepeat(2, "einops", "mul").eval(), (q, k, v), {}

    def disentangled():
        return seeded(lambda: bf.Disentangled(4, 16)).eval(), (*bhnd(), keep_mask()), {}

    return [
        Entry("swin_windows", "family: Swin windows folded into the batch, (nw, N, N) mask via a 5-d view", swin),
        Entry("bloom_baddbmm", "family: Bloom baddbmm over batch*heads, ALiBi, 4-d view for the mask", bloom),
        Entry("sam_rel_pos", "family: SAM decomposed rel-pos (query/key axes split)", sam),
        Entry("area_transposed", "family: v @ attn.transpose(-2, -1) (YOLO area attention)", area),
        Entry("gpt1_product_mask", "family: scores * tril + -1e4 * (1 - tril) (OpenAI GPT)",
              lambda: (mf.GPTProductMask().eval(), bhnd(), {})),
        Entry("clamp_min", "family: torch.max(scores, finfo.min) after a mask",
              lambda: (mf.ClampedScores().eval(), (*bhnd(), torch.zeros(2, 1, 9, 9),
                                                   keep_mask()[:, None, None, :]), {})),
        Entry("fill_then_bias", "family: where(causal, s, min) + padding mask (GPT-Neo)", gpt_neo),
        Entry("region_add", "family: attn[:, :, 1:, 1:] += rel (in-place region bias)", region),
        Entry("zeroed_weights", "family: softmax then masked_fill(~mask, 0) (CPM-Ant)", zeroed),
        Entry("gqa_scale", "family: k repeated per group, then scaled", gqa_scale),
        Entry("disentangled", "family: DeBERTa-style c2p + p2c biases", disentangled),
    ]


def _score_entries() -> list[Entry]:
    import score_modules as sm

    return [
        Entry("score_alibi_causal", "score: AlibiCausal (Bloom/MPT style)",
              lambda: (sm.AlibiCausal(4).eval(), bhnd(), {})),
        Entry("score_alibi_symmetric", "score: AlibiSymmetric (encoder)",
              lambda: (sm.AlibiSymmetric(4).eval(), bhnd(), {})),
        Entry("score_bucket_bias", "score: BucketBias (T5 buckets)",
              lambda: (seeded(lambda: sm.BucketBias(4)).eval(), bhnd(), {})),
        Entry("score_softcap_window", "score: SoftcapWindow (Gemma 2 style)",
              lambda: (sm.SoftcapWindow(cap=20.0, window=3).eval(), bhnd(), {})),
    ]


# ----------------------------------------------------------------------------- entries: real models

def _model_entries() -> list[Entry]:
    def tm():
        import test_models
        return test_models

    def transformers():
        import transformers as t
        return t

    def gpt2():
        return tm().build_gpt2(2).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    def bert():
        ids = tokens((2, SEQ), low=1)
        mask = keep_mask(2, SEQ).long()
        ids[1, 6:] = 0
        return tm().build_bert(2).eval(), (), {"input_ids": ids, "attention_mask": mask}

    def llama():
        return tm().build_llama(2).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    def t5():
        kwargs = {"input_ids": tokens((2, SEQ), low=2), "decoder_input_ids": tokens((2, 7), seed=1, low=2),
                  "use_cache": False}
        return tm().build_t5(2).eval(), (), kwargs

    def vit():
        return tm().build_vit(2).eval(), (), {"pixel_values": randn(2, 3, 16, 16)}

    def whisper():
        kwargs = {"input_features": randn(2, 8, 32), "decoder_input_ids": tokens((2, 5), seed=1, low=4),
                  "use_cache": False}
        return tm().build_whisper(2).eval(), (), kwargs

    def x_decoder():
        return tm().build_x_decoder().eval(), (tokens((2, SEQ)),), {}

    def x_encoder():
        return tm().build_x_encoder().eval(), (tokens((2, SEQ)),), {"mask": keep_mask(2, SEQ, pad_from=7)}

    def megabyte():
        # max_seq_len (16, 4): 4 patches of 4 bytes; 9 bytes are padded up to whole patches by the model.
        return tm().build_megabyte().eval(), (tokens((2, SEQ), vocab=256),), {}

    def mistral():
        t = transformers()
        config = t.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                 intermediate_size=128, vocab_size=100, max_position_embeddings=64, sliding_window=4,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
        return seeded(lambda: t.MistralModel(config)).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    def gemma2():
        t = transformers()
        config = t.Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                head_dim=16, intermediate_size=128, vocab_size=100, max_position_embeddings=64,
                                sliding_window=4, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                attn_implementation="eager")
        return seeded(lambda: t.Gemma2Model(config)).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    def mpt():
        t = transformers()
        config = t.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=100,
                             attn_implementation="eager")
        return seeded(lambda: t.MptModel(config)).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    def bloom():
        t = transformers()
        config = t.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=100, attn_implementation="eager")
        return seeded(lambda: t.BloomModel(config)).eval(), (), {"input_ids": tokens((2, SEQ)), "use_cache": False}

    return [
        Entry("gpt2", "transformers GPT-2", gpt2),
        Entry("bert", "transformers BERT (padding mask)", bert),
        Entry("llama", "transformers Llama (GQA 4/2)", llama),
        Entry("t5", "transformers T5 (enc-dec)", t5),
        Entry("vit", "transformers ViT", vit),
        Entry("whisper", "transformers Whisper (enc-dec)", whisper),
        Entry("mistral", "transformers Mistral (sliding_window 4)", mistral),
        Entry("gemma2", "transformers Gemma 2 (softcap, window 4)", gemma2),
        Entry("mpt", "transformers MPT (ALiBi)", mpt),
        Entry("bloom", "transformers Bloom (ALiBi, baddbmm)", bloom),
        Entry("x_decoder", "x-transformers Decoder", x_decoder),
        Entry("x_encoder", "x-transformers Encoder (padding mask)", x_encoder),
        Entry("megabyte", "MEGABYTE-pytorch", megabyte),
    ]


def _tiny_transformers(model_type: str, **overrides: Any) -> Callable[[], Built]:
    """A transformers architecture at the sweep's tiny sizes (``coverage_transformers``), left-padded batch."""
    def build() -> Built:
        import coverage_transformers as ct
        model = ct.build(model_type, **overrides)
        return model, (), ct.inputs(model)
    return build


def _package_entries() -> list[Entry]:
    def multihead(need_weights):
        class Multihead(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

            def forward(self, x):
                return self.mha(x, x, x, need_weights=need_weights)[0]
        return lambda: (seeded(Multihead).eval(), (randn(2, 9, 32),), {})

    def fair_esm():
        import esm
        return seeded(lambda: esm.ESM2(num_layers=2, embed_dim=32, attention_heads=4)).eval(), \
            (tokens((2, SEQ), vocab=20, low=4),), {}

    def monai_vit():
        from monai.networks.nets import ViT
        model = seeded(lambda: ViT(in_channels=1, img_size=(16, 16), patch_size=(8, 8), hidden_size=32, mlp_dim=64,
                                   num_layers=2, num_heads=4, spatial_dims=2))
        return model.eval(), (randn(2, 1, 16, 16),), {}

    def monai_swin():
        from monai.networks.nets import SwinUNETR
        model = seeded(lambda: SwinUNETR(in_channels=1, out_channels=2, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2),
                                         feature_size=12, window_size=2, spatial_dims=2))
        return model.eval(), (randn(1, 1, 64, 64),), {}

    def timm_model(name, **kwargs):
        def build():
            import timm  # needs torchvision: on the GPU machine, not in the CPU test environment
            from timm.layers import set_fused_attn
            set_fused_attn(False)  # timm's own SDPA path off: the hand-written attention is what is measured
            model = seeded(lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
            size = kwargs.get("img_size", 32)
            return model.eval(), (randn(2, 3, size, size),), {}
        return build

    return [
        Entry("timm_swin", "timm Swin (shifted windows, relative-position bias)",
              timm_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                         window_size=7)),
        Entry("timm_swinv2", "timm Swin V2 (cosine attention, log-CPB)",
              timm_model("swinv2_tiny_window8_256", img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                         window_size=8)),
        Entry("timm_vit", "timm ViT (fused_attn off)", timm_model("vit_tiny_patch16_224", img_size=32, depth=2)),
        Entry("timm_eva", "timm EVA (rotary)", timm_model("eva02_tiny_patch14_224", img_size=28, depth=2)),
        Entry("mha_default", "torch nn.MultiheadAttention (need_weights default, weights dropped)", multihead(True)),
        Entry("mha_sdpa", "torch nn.MultiheadAttention(need_weights=False)", multihead(False),
              note="already on SDPA: reported native"),
        Entry("gpt_neo", "transformers GPT-Neo (local + global, finite fill then mask)", _tiny_transformers("gpt_neo")),
        Entry("xglm", "transformers XGLM (bmm, 4-d view for the mask, clamp)", _tiny_transformers("xglm")),
        Entry("opt", "transformers OPT", _tiny_transformers("opt")),
        Entry("falcon", "transformers Falcon (rotary)", _tiny_transformers("falcon")),
        Entry("falcon_alibi", "transformers Falcon (ALiBi, baddbmm)", _tiny_transformers("falcon", alibi=True)),
        Entry("openai_gpt", "transformers OpenAI GPT (w * b + -1e4 * (1 - b))", _tiny_transformers("openai-gpt")),
        Entry("deberta", "transformers DeBERTa (c2p / p2c biases)", _tiny_transformers("deberta")),
        Entry("deberta_v2", "transformers DeBERTa-v2", _tiny_transformers("deberta-v2")),
        Entry("esm", "transformers ESM", _tiny_transformers("esm")),
        Entry("fair_esm", "fair-esm ESM2", fair_esm),
        Entry("monai_vit", "MONAI ViT (SABlock)", monai_vit),
        Entry("monai_swin", "MONAI SwinUNETR 2-d (shifted windows)", monai_swin),
    ]


def all_entries() -> list[Entry]:
    return (_seed_entries() + _family_entries() + _round_two_entries() + _score_entries() + _model_entries()
            + _package_entries())


# ----------------------------------------------------------------------------- one entry

@dataclass
class Row:
    entry: Entry
    sites: Optional[int] = None
    fused: Optional[int] = None
    features: str = ""
    kernel: str = ""
    skipped: list[str] = field(default_factory=list)
    audit_error: Optional[str] = None
    inductor: Optional[int] = None  # sites Inductor fused, gradients enabled
    inductor_no_grad: Optional[int] = None  # the same under torch.no_grad()
    counter: Optional[int] = None  # counters["inductor"]["fuse_attention"], gradients enabled
    counter_no_grad: Optional[int] = None
    inductor_error: Optional[str] = None
    seconds: float = 0.0


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _compact_shapes(text: str) -> str:
    """``key padding (2, 1, 1, 9)`` -> ``key padding (2,1,1,9)``: no spaces inside shapes."""
    return re.sub(r"\(([^()]*)\)", lambda m: "(" + m.group(1).replace(" ", "") + ")", text)


def site_summary(features: dict) -> str:
    """A few words on one fused site: causal + alignment, window, softcap, score functions, mask, bias, GQA, scale."""
    parts = []
    causal = features.get("causal")
    if causal:
        parts.append(f"causal {str(causal).replace('_', '-')}" if isinstance(causal, str) else "causal")
    if features.get("window") is not None:
        parts.append(f"window {features['window']}")
    if features.get("softcap") is not None:
        parts.append(f"softcap {_num(features['softcap'])}")
    if features.get("score_functions"):
        n = features["score_functions"]
        parts.append(f"{n} score fn{'s' if n != 1 else ''}")
    if features.get("mask"):
        parts.append(f"mask {_compact_shapes(str(features['mask']))}")
    if features.get("bias"):
        parts.append(f"bias {_compact_shapes(str(features['bias']))}")
    q, kv = features.get("q_heads"), features.get("kv_heads")
    if q and kv and q != kv:
        parts.append(f"GQA {q}/{kv} kv" if kv > 1 else f"{q} heads / 1 kv")
    if features.get("dropout"):
        parts.append(f"dropout {_num(features['dropout'])}")
    if "scale" in features:
        parts.append(f"scale {_num(features['scale'])}")
    if features.get("q_len") is not None and features.get("q_len") != features.get("k_len"):
        parts.append(f"q {features['q_len']} / k {features['k_len']}")
    return ", ".join(parts) or "plain"


def _grouped(items: list[str]) -> str:
    """Distinct items in first-seen order, ``n x item`` where an item repeats and several differ."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{n}x {item}" if n > 1 else item for item, n in counts.items())


class _CountSDPA(CustomGraphPass):
    """An Inductor custom pass that only counts SDPA ops (forward ones) in the graphs it is given."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.count += sum(node.op == "call_function" and "scaled_dot_product" in str(node.target)
                          and "backward" not in str(node.target) for node in graph.nodes)

    def uuid(self) -> Optional[Any]:
        return f"coverage-count-sdpa-{id(self)}-{time.time_ns()}"  # never equal twice: no cache can skip it


def inductor_sites(module: torch.nn.Module, args: tuple, kwargs: dict, grad: bool) -> tuple[int, int]:
    """(sites Inductor's attention patterns fused, its fuse_attention counter) for one compiled call."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    before, after = _CountSDPA(), _CountSDPA()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with inductor_config.patch(fx_graph_cache=False, pre_grad_custom_pass=before, post_grad_custom_post_pass=after), \
            functorch_config.patch(enable_autograd_cache=False), torch.set_grad_enabled(grad):
        torch.compile(module, backend="inductor")(*args, **kwargs)
    counter = int(torch._dynamo.utils.counters["inductor"].get("fuse_attention", 0))
    return after.count - before.count, counter


def run_entry(entry: Entry, inductor: bool, no_grad: bool = True) -> Row:
    row = Row(entry)
    start = time.perf_counter()
    try:
        module, args, kwargs = entry.build()
    except BaseException as exc:  # noqa: BLE001 (pytest's Skipped is a BaseException)
        if isinstance(exc, KeyboardInterrupt):
            raise
        row.audit_error = f"build failed: {_error(exc)}"
        row.seconds = time.perf_counter() - start
        return row

    try:
        torch._dynamo.reset()
        report = attnfuse.audit(module, *args, **kwargs)
        present = [s for s in report.sites if s.status in ("fused", "skipped")]
        fused = [s for s in present if s.status == "fused"]
        row.sites, row.fused = len(present), len(fused)
        row.features = _grouped([site_summary(s.features) for s in fused]) if fused else ""
        row.kernel = _grouped([str(s.backend) for s in fused]) if fused else "-"
        row.skipped = [f"{s.name}: {s.reason}" for s in present
                       if s.status == "skipped"]
        row.report = report  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        row.audit_error = _error(exc)
        row.audit_traceback = traceback.format_exc()  # type: ignore[attr-defined]

    if inductor:
        try:
            row.inductor, row.counter = inductor_sites(module, args, kwargs, grad=True)
            if no_grad:
                row.inductor_no_grad, row.counter_no_grad = inductor_sites(module, args, kwargs, grad=False)
        except Exception as exc:  # noqa: BLE001
            row.inductor_error = _error(exc)
        finally:
            torch._dynamo.reset()
    row.seconds = time.perf_counter() - start
    return row


# ----------------------------------------------------------------------------- table

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _skip_reasons(row: Row) -> str:
    reasons: dict[str, int] = {}
    for item in row.skipped:
        reason = item.split(": ", 1)[1] if ": " in item else item
        reasons[reason] = reasons.get(reason, 0) + 1
    return "; ".join(f"{n}x {r}" if n > 1 else r for r, n in reasons.items())


def render(rows: list[Row], inductor: bool, elapsed: float) -> str:
    env = (f"Device: CPU ({platform.machine()}), fp32, eval mode; torch {torch.__version__}; "
           f"{date.today().isoformat()}; generated by `python benchmarks/coverage.py` in {elapsed:.0f} s.")
    lines = [env, "",
             "| family / model | features (fused sites) | attnfuse fused / sites | kernel | torch.compile fuse_attention |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row.audit_error is not None:
            features, counts, kernel = f"**error**: {row.audit_error}", "error", "-"
        else:
            features = row.features or ("no site found" if not row.sites else "")
            if row.skipped:
                skipped = f"skipped: {_skip_reasons(row)}"
                features = f"{features}; {skipped}" if features else skipped
            if row.entry.note:
                features = f"{features} ({row.entry.note})"
            counts, kernel = f"{row.fused} / {row.sites}", row.kernel
        if not inductor:
            ind = "not run"
        elif row.inductor_error is not None:
            ind = f"error: {row.inductor_error}"
        else:
            ind = str(row.inductor)
            if row.inductor_no_grad is not None and row.inductor_no_grad != row.inductor:
                ind += f" (no_grad: {row.inductor_no_grad})"
        lines.append(f"| {_cell(row.entry.label)} | {_cell(features)} | {counts} | {_cell(kernel)} | {_cell(ind)} |")

    ok = [r for r in rows if r.audit_error is None]
    fused, sites = sum(r.fused for r in ok), sum(r.sites for r in ok)
    lines += ["", f"Totals: attnfuse fused {fused} of {sites} sites present in {len(ok)} entries"
              + (f" ({len(rows) - len(ok)} entries failed)" if len(ok) < len(rows) else "") + "; "]
    if inductor:
        ind_ok = [r for r in rows if r.inductor_error is None and r.inductor is not None]
        total = sum(r.inductor for r in ind_ok)
        counter = sum(r.counter for r in ind_ok)
        lines[-1] += (f"torch.compile (Inductor) fuse_attention fused {total} of those sites with gradients enabled")
        if all(r.inductor_no_grad is not None for r in ind_ok):
            lines[-1] += (f", {sum(r.inductor_no_grad for r in ind_ok)} under torch.no_grad() "
                          f"(its fuse_attention counter: {counter} / {sum(r.counter_no_grad for r in ind_ok)})")
        else:
            lines[-1] += f" (its fuse_attention counter: {counter})"
        if len(ind_ok) < len(rows):
            lines[-1] += f"; Inductor failed on {len(rows) - len(ind_ok)} entries"
        lines[-1] += "."
        lines += ["", "Inductor's column: sites fused by torch.compile's own attention patterns (`fuse_attention`), "
                  "counted as SDPA ops in the graph Inductor lowers, with gradients enabled (as the audit runs); "
                  "`(no_grad: n)` where an inference compile fuses a different number."]
    else:
        lines[-1] += "torch.compile (Inductor) not run (--no-inductor)."
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated entry keys (see --list)")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile's own fusion (slow on CPU)")
    parser.add_argument("--grad-only", action="store_true",
                        help="compile with Inductor only with gradients enabled (not also under torch.no_grad())")
    parser.add_argument("--write", action="store_true", help="also write docs/coverage.md")
    parser.add_argument("--list", action="store_true", help="list entry keys and exit")
    parser.add_argument("--verbose", action="store_true", help="print each audit report and error traceback")
    opts = parser.parse_args()

    entries = all_entries()
    if opts.list:
        for e in entries:
            print(f"{e.key:24s} {e.label}")
        return
    if opts.only:
        wanted = [k.strip().lower() for k in opts.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in {e.key for e in entries}]
        if unknown:
            parser.error(f"unknown entries {unknown}; known: {', '.join(e.key for e in entries)}")
        entries = [e for e in entries if e.key in wanted]

    torch.set_num_threads(max(1, torch.get_num_threads()))
    inductor = not opts.no_inductor
    rows = []
    start = time.perf_counter()
    for n, entry in enumerate(entries, 1):
        row = run_entry(entry, inductor, no_grad=not opts.grad_only)
        rows.append(row)
        status = (f"error ({row.audit_error})" if row.audit_error else f"{row.fused}/{row.sites} fused")
        ind = "" if not inductor else (
            f", inductor {row.inductor} (counter {row.counter}; no_grad {row.inductor_no_grad}, counter "
            f"{row.counter_no_grad})" if row.inductor_error is None else f", inductor error ({row.inductor_error})")
        print(f"[{n}/{len(entries)}] {entry.key}: {status}{ind} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        if opts.verbose:
            if getattr(row, "report", None) is not None:
                print(str(row.report), file=sys.stderr)
            if getattr(row, "audit_traceback", None):
                print(row.audit_traceback, file=sys.stderr)
    elapsed = time.perf_counter() - start

    table = render(rows, inductor, elapsed)
    print(table)
    if opts.write:
        docs = os.path.join(REPO, "docs")
        os.makedirs(docs, exist_ok=True)
        path = os.path.join(docs, "coverage.md")
        with open(path, "w") as f:
            f.write("# Coverage\n\nHand-written attention found and fused by attnfuse (`attnfuse.audit`, verified "
                    "against the unrewritten code), next to the sites that torch.compile's own attention fusion "
                    "(Inductor's `fuse_attention` patterns) rewrites in the same modules. Regenerate with "
                    "`python benchmarks/coverage.py --write`.\n\n" + table + "\n")
        print(f"\nwrote {os.path.relpath(path, os.getcwd())}", file=sys.stderr)


if __name__ == "__main__":
    main()

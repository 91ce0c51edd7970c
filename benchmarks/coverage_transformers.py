"""Sweep: tiny configs of every transformers text architecture (causal, seq2seq and masked LMs) with eager attention, through attnfuse.

    python benchmarks/coverage_transformers.py                   # every causal-LM architecture
    python benchmarks/coverage_transformers.py --only llama,bloom
    python benchmarks/coverage_transformers.py --json out.json   # rows as JSON as well

Each architecture is built from its config class with small sizes (2 layers, width 64, 4 heads, GQA 4/2
where the config has ``num_key_value_heads``), ``attn_implementation="eager"``, fp32, CPU, and run on a
batch of two sequences whose second row is left-padded, so padding masks are exercised. For each model:
``attnfuse.optimize(model, verify=False)`` (no rollback: a wrong rewrite shows as a wrong output here)
is compared with the unoptimized model on the same inputs, forward (logits) and backward (gradients of
every parameter), then once more with an all-ones ``attention_mask`` (as data collators pass one); the row says
how many attention sites were fused or skipped and why, and how many ran without their mask on the all-ones
call (``attnfuse.unpadded``). Each model runs
in a fresh Dynamo state. An architecture that cannot be built from its defaults is listed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout, not an installed copy

import attnfuse  # noqa: E402

SEQ, BATCH, PAD = 9, 2, 3
MAX_PARAMETERS = 20_000_000

# Config attributes set (where the config has them) to make every architecture tiny.
TINY = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "head_dim": 16, "kv_channels": 16, "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64,
    "max_seq_len": 64, "seq_length": 64, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "sliding_window": 4, "attention_window": 4, "rotary_dim": 8,
}


@dataclass
class Row:
    arch: str
    status: str  # fused / partial / skipped / none / wrong / error / unbuildable
    fused: int = 0
    skipped: int = 0
    error_out: float = 0.0
    error_grad: float = 0.0
    reasons: list[str] = field(default_factory=list)
    unpadded: int = 0  # fused sites that ran without their mask on the all-ones ``attention_mask`` call
    detail: str = ""
    seconds: float = 0.0


def tiny_config(model_type: str) -> Any:
    """The architecture's default config with every size attribute it has made small."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type)
    for name, value in TINY.items():
        current = getattr(config, name, "absent")
        if (isinstance(current, int) and not isinstance(current, bool)) or (name == "vocab_size" and current is None):
            try:
                setattr(config, name, value)
            except AttributeError:  # a derived property (Falcon's head_dim)
                pass
    for sub in ("text_config",):
        if getattr(config, sub, None) is not None:
            return None  # multimodal wrapper: the text model is swept under its own model_type
    if hasattr(config, "pad_token_id") and config.pad_token_id is None and model_type == "esm":
        config.pad_token_id = 1  # ESM's embeddings compare the ids with it
    for token in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(config, token, None) is not None and isinstance(getattr(config, token), int):
            setattr(config, token, min(getattr(config, token), TINY["vocab_size"] - 1))
    config._attn_implementation = "eager"
    return config


def model_class(model_type: str) -> Any:
    """The auto class the sweep builds ``model_type`` with: causal LM, else seq2seq LM, else masked LM."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
    from transformers.models.auto import modeling_auto as auto
    for names, cls in ((auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM),
                       (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, AutoModelForSeq2SeqLM),
                       (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, AutoModelForMaskedLM)):
        if model_type in names:
            return cls
    raise ValueError(f"{model_type} is not a causal, seq2seq or masked LM")


def build(model_type: str, **overrides: Any) -> Optional[torch.nn.Module]:
    """``model_type`` at tiny sizes (``overrides`` set on its config), eager attention, fp32, eval mode."""
    config = tiny_config(model_type)
    if config is None:
        return None
    for name, value in overrides.items():
        setattr(config, name, value)
    with torch.device("meta"):  # sizes the defaults left large (byte-level hash embeddings) would not fit
        parameters = sum(p.numel() for p in model_class(model_type).from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{parameters / 1e6:.0f}M parameters even with the tiny sizes")
    torch.manual_seed(0)
    model = model_class(model_type).from_config(config, attn_implementation="eager")
    return model.float().eval()


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, TINY["vocab_size"], (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :PAD] = 0  # left padding, as generation uses
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    elif getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    expected, actual = expected.detach().double(), actual.detach().double()
    keep = torch.isfinite(expected)
    if not torch.equal(keep, torch.isfinite(actual)):
        return float("inf")
    scale = expected[keep].abs().max().clamp_min(1e-6) if keep.any() else 1.0
    return float(((expected - actual)[keep].abs().max() / scale)) if keep.any() else 0.0


def _forward_backward(model: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = _logits(model(**kwargs))
    valid = kwargs["attention_mask"].bool()[..., None]
    (logits * valid).float().pow(2).mean().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return logits.detach(), grads


def run_arch(model_type: str) -> Row:
    """Build, run eager and optimized, compare, and read the report."""
    started = time.perf_counter()
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(model_type)
        if model is None:
            return Row(model_type, "unbuildable", detail="multimodal wrapper")
        kwargs = inputs(model)
        expected, expected_grads = _forward_backward(model, kwargs)
    except Exception as error:  # noqa: BLE001 - an architecture that needs more than its defaults
        return Row(model_type, "unbuildable", detail=f"{type(error).__name__}: {str(error)[:120]}")
    row = Row(model_type, "none")
    try:
        optimized = attnfuse.optimize(build(model_type), verify=False)  # the same weights: built from one seed
        actual, grads = _forward_backward(optimized, kwargs)
        unpadded_kwargs = {**kwargs, "attention_mask": torch.ones_like(kwargs["attention_mask"])}
        unpadded_expected, unpadded_expected_grads = _forward_backward(model, unpadded_kwargs)
        before = _calls_without_mask(optimized)
        unpadded_actual, unpadded_grads = _forward_backward(optimized, unpadded_kwargs)
        row.unpadded = sum(after > was for was, after in zip(before, _calls_without_mask(optimized)))
    except Exception as error:  # noqa: BLE001
        row.status, row.detail = "error", f"{type(error).__name__}: {str(error)[:200]}"
        row.detail += " | " + traceback.format_exc(limit=-2).replace("\n", " ")[:300]
        return row
    row.error_out = max(_relative_error(expected, actual), _relative_error(unpadded_expected, unpadded_actual))
    row.error_grad = max((_relative_error(e, a) for e, a in zip(expected_grads + unpadded_expected_grads,
                                                                 grads + unpadded_grads)), default=0.0)
    report = attnfuse.report(optimized)
    row.fused, row.skipped = report.fused, report.skipped
    row.reasons = sorted({s.reason for s in report.sites if s.status == "skipped"})
    if row.error_out > 1e-4 or row.error_grad > 1e-3:
        row.status = "wrong"
    elif row.skipped:
        row.status = "partial" if row.fused else "skipped"
    elif row.fused:
        row.status = "fused"
    row.seconds = time.perf_counter() - started
    return row


def _calls_without_mask(model: torch.nn.Module) -> list[int]:
    """Per fused site of ``model``'s report, the calls that ran without its mask (its padding kept every key)."""
    features = [site.to_dict()["features"] for site in attnfuse.report(model).sites]
    return [found.get("calls_read_as_causal", 0) if found.get("without_padding") else 0 for found in features]


def architectures() -> list[str]:
    from transformers.models.auto import modeling_auto as auto
    return sorted(set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
                  | set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES))


def summary(rows: list[Row]) -> str:
    runnable = [r for r in rows if r.status != "unbuildable"]
    with_sites = [r for r in runnable if r.fused + r.skipped]
    counts = {s: sum(r.status == s for r in rows) for s in ("fused", "partial", "skipped", "none", "wrong", "error",
                                                            "unbuildable")}
    sites = sum(r.fused + r.skipped for r in runnable)
    unpadded = [r for r in with_sites if r.fused and r.unpadded == r.fused]
    return (f"{len(rows)} architectures, {len(with_sites)} with attention sites: {counts['fused']} fully fused, "
            f"{counts['partial']} partly, {counts['skipped']} not at all; {sum(r.fused for r in runnable)} of {sites} "
            f"sites fused; {counts['wrong']} wrong, {counts['error']} errors, {counts['none']} without sites, "
            f"{counts['unbuildable']} not buildable from defaults; with an all-ones attention_mask "
            f"{sum(r.unpadded for r in runnable)} fused sites ran without their mask ({len(unpadded)} architectures, "
            f"every fused site)")


def markdown(rows: list[Row], version: str) -> str:
    """The sweep as a markdown table (architectures with attention sites), with its summary and provenance."""
    lines = ["# transformers architectures with eager attention, through attnfuse\n",
             f"`python benchmarks/coverage_transformers.py --markdown docs/coverage_transformers.md`: transformers {version}, torch "
             f"{torch.__version__}, CPU, fp32, {time.strftime('%Y-%m-%d')}. Tiny configs (2 layers, width 64), a batch "
             "of two with the second row left-padded; outputs and parameter gradients compared with the unoptimized "
             "model (`verify=False`, so a wrong rewrite would show); then the same with an all-ones `attention_mask` "
             "(`without mask`: fused sites that ran without their mask on that call, `attnfuse.unpadded`).\n",
             summary(rows) + ".\n",
             "| architecture | status | fused / sites | without mask | max error (out / grad) | why a site was left alone |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.fused + row.skipped or row.status in ("wrong", "error"):
            why = "; ".join(row.reasons) or row.detail
            lines.append(f"| {row.arch} | {row.status} | {row.fused} / {row.fused + row.skipped} | {row.unpadded} | "
                         f"{row.error_out:.1e} / {row.error_grad:.1e} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--json", default="", help="write the rows to this file")
    parser.add_argument("--markdown", default="", help="write the table as markdown to this file")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th architecture from the i-th (parallel runs)")
    args = parser.parse_args()
    import transformers
    index, count = (int(x) for x in args.shard.split("/"))
    names = ([n for n in args.only.split(",") if n] or architectures())[index::count]
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = []
    for name in names:
        row = run_arch(name)
        rows.append(row)
        reasons = "; ".join(row.reasons) or row.detail
        print(f"{row.arch:24s} {row.status:11s} {row.fused:2d}/{row.fused + row.skipped:<2d} unpadded {row.unpadded} "
              f"err {row.error_out:.1e}/{row.error_grad:.1e}  {reasons}", flush=True)
    print(summary(rows))
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(rows, transformers.__version__))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=1)


if __name__ == "__main__":
    main()

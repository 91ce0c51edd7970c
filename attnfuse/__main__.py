"""``python -m attnfuse audit <package.module>:<name> [--seq N]``: the audit of an architecture, before any code.

``<name>`` is a transformers model class (``transformers:LlamaForCausalLM``), built from its config class
with small sizes, eager attention and random weights (nothing is downloaded), or any function or class
that builds a model with no arguments (it may return ``(model, args)`` to give the inputs; otherwise
``--input`` gives their shapes).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional, Sequence

import torch

import attnfuse

# Config attributes set, where a transformers config has them as integers, to make a model tiny.
TINY = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128, "moe_intermediate_size": 32, "head_dim": 16, "vocab_size": 128,
    "max_position_embeddings": 128, "n_positions": 128, "num_experts": 4, "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
BATCH = 2


def resolve(spec: str) -> Any:
    """The object ``package.module:name`` (``name`` may be dotted) names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise SystemExit(f"attnfuse audit: expected <package.module>:<name>, e.g. transformers:LlamaForCausalLM; "
                         f"got {spec!r}")
    found: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def is_transformers_model(target: Any) -> bool:
    return isinstance(target, type) and hasattr(target, "config_class") and hasattr(target, "_from_config")


def tiny_transformers_model(cls: type, seq: int) -> torch.nn.Module:
    """``cls`` built from its config class's defaults with every size in ``TINY`` made small, eager
    attention, random weights, eval mode."""
    config = cls.config_class()
    for name, value in TINY.items():
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            try:
                setattr(config, name, max(value, seq) if "position" in name else value)
            except AttributeError:  # a derived property
                pass
    for token in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, token, None), int):
            setattr(config, token, min(getattr(config, token), TINY["vocab_size"] - 1))
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="eager").float().eval()


def transformers_inputs(model: torch.nn.Module, seq: int) -> dict[str, torch.Tensor]:
    """Random inputs of the model's main kind: token ids (with a mask), or images at the config's size."""
    config, generator = model.config, torch.Generator().manual_seed(0)
    if model.main_input_name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(BATCH, getattr(config, "num_channels", 3), size, size, generator=generator)}
    if model.main_input_name != "input_ids":
        raise SystemExit(f"attnfuse audit: no random input for {type(model).__name__}'s {model.main_input_name!r}; "
                         "write a factory returning (model, args) instead")
    ids = torch.randint(4, config.vocab_size, (BATCH, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(BATCH, seq, dtype=torch.long)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    elif getattr(config, "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def build(target: Any, seq: int, shapes: Sequence[Sequence[int]]) -> tuple[torch.nn.Module, tuple, dict]:
    """``(model, args, kwargs)`` for ``target``: a transformers class at tiny sizes, or a factory's result."""
    if is_transformers_model(target):
        model = tiny_transformers_model(target, seq)
        return model, (), transformers_inputs(model, seq)
    built = target()
    model, args = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"attnfuse audit: {target!r} built a {type(model).__name__}, not a torch.nn.Module")
    if args is None:
        if not shapes:
            raise SystemExit("attnfuse audit: give the shape of each input (--input 2,16,64), or a factory "
                             "returning (model, args)")
        generator = torch.Generator().manual_seed(0)
        args = tuple(torch.randn(*shape, generator=generator) for shape in shapes)
    return model.eval(), tuple(args), {}


def describe(target: Any, model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    inputs = [f"{name} {tuple(v.shape)}" for name, v in kwargs.items() if isinstance(v, torch.Tensor)]
    inputs += [str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
    made = "tiny config, random weights" if is_transformers_model(target) else "built by the factory"
    return (f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)} ({made}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters), inputs: {', '.join(inputs)}")


def shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is integers separated by commas (2,16,64), got {text!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnfuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"attnfuse {attnfuse.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="print what attnfuse fuses in a model built with random weights")
    audit.add_argument("target", help="<package.module>:<model class or factory>, e.g. transformers:LlamaForCausalLM")
    audit.add_argument("--seq", type=int, default=16, help="sequence length of the random tokens (default 16)")
    audit.add_argument("--input", type=shape, action="append", default=[], metavar="SHAPE",
                       help="shape of one float input of a factory's model, e.g. 2,16,64 (repeat for more)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    options = parser.parse_args(argv)
    target = resolve(options.target)
    model, args, kwargs = build(target, options.seq, options.input)
    report = attnfuse.audit(model, *args, **kwargs)
    if options.json:
        print(report.to_json(indent=2))
    else:
        print(f"attnfuse audit of {describe(target, model, args, kwargs)}\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

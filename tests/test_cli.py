"""``python -m attnfuse audit``: an architecture's audit from its name, random weights, nothing downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from attnfuse.__main__ import main
from test_api import TinyBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_block_with_inputs():
    """A factory returning ``(model, args)``, as the CLI accepts."""
    return TinyBlock(), (torch.randn(1, 6, 16),)


def _strict(name):
    raise ValueError(name)


@pytest.mark.models
def test_audit_of_a_transformers_class_built_from_its_config(capsys):
    pytest.importorskip("transformers")
    assert main(["audit", "transformers:LlamaForCausalLM", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM (tiny config, random weights" in out and "input_ids (2, 8)" in out
    assert "attnfuse: 2 fused, 0 skipped" in out, out
    assert "LlamaForCausalLM.model.layers.0.self_attn" in out and "llama/modeling_llama.py:" in out


@pytest.mark.models
def test_audit_of_an_encoder_decoder_transformers_class_as_json(capsys):
    pytest.importorskip("transformers")
    assert main(["audit", "transformers:BartForConditionalGeneration", "--seq", "6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=_strict)
    names = {site["name"] for site in data["sites"]}
    assert data["fused"] == len(data["sites"]) == 6, data  # encoder self, decoder self and cross, 2 layers
    assert "BartForConditionalGeneration.model.decoder.layers.1.encoder_attn" in names


def test_audit_of_a_factory_with_its_own_inputs_and_of_a_class_with_input_shapes(capsys):
    assert main(["audit", "test_cli:tiny_block_with_inputs", "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=_strict)
    assert [(s["name"], s["status"]) for s in data["sites"]] == [("TinyBlock.attend", "fused")]
    assert main(["audit", "test_api:TinyBlock", "--input", "2,5,16"]) == 0
    out = capsys.readouterr().out
    assert "inputs: (2, 5, 16)" in out and "TinyBlock.attend" in out and "fused" in out


def test_audit_says_what_is_missing():
    with pytest.raises(SystemExit, match="expected <package.module>:<name>"):
        main(["audit", "transformers.LlamaForCausalLM"])
    with pytest.raises(SystemExit, match="give the shape of each input"):
        main(["audit", "test_api:TinyBlock"])
    with pytest.raises(SystemExit):
        main(["audit", "test_api:TinyBlock", "--input", "2,x"])


def test_python_dash_m_attnfuse_runs_the_audit():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "attnfuse", "audit", "test_api:TinyBlock", "--input", "1,4,16"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attnfuse: 1 fused, 0 skipped" in result.stdout

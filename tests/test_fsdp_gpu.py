"""FSDP2 on 2 GPUs (NCCL, bf16 parameters): the three orders of ``optimize`` and ``fully_shard`` give the
losses of transformers' own SDPA model, sharded the same way, and a report of every layer.

Run on a machine with 2 or more GPUs: ``python -m pytest -q -m multigpu tests/test_fsdp_gpu.py`` (the test
spawns its 2 processes; NCCL's NVLink multicast stays off: ``fsdp_runs.DIST_ENV``).
"""
from __future__ import annotations

import pytest
import torch

from fsdp_runs import ORDERS, spawn

pytest.importorskip("transformers")
pytestmark = pytest.mark.multigpu

CONFIG = dict(layers=4, hidden=256, heads=8, kv_heads=2, steps=4, batch=2, tokens=256, lr=1e-3, dtype="bfloat16",
              orders=["sdpa", *ORDERS])
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn(WORLD, str(tmp_path_factory.mktemp("fsdp_gpu")), "nccl", CONFIG)


@pytest.mark.parametrize("order", ORDERS)
def test_losses_equal_the_sdpa_model(runs, order):
    for rank in range(WORLD):
        want, got = runs[rank]["sdpa"]["losses"], runs[rank][order]["losses"]
        assert got == pytest.approx(want, rel=1e-2), (order, rank, got, want)


@pytest.mark.parametrize("order", ORDERS)
def test_report_lists_every_layer(runs, order):
    expected = [f"LlamaForCausalLM.model.layers.{i}.self_attn" for i in range(CONFIG["layers"])]
    for rank in range(WORLD):
        entry = runs[rank][order]
        assert entry["names"] == expected and entry["fused"] == CONFIG["layers"], entry["text"]


@pytest.mark.parametrize("order", ORDERS)
def test_every_layer_runs_causal(runs, order):
    """The mask each layer's graph receives is read as the causal triangle on every call (``guards.RunTimeCausal``)."""
    for rank in range(WORLD):
        entry = runs[rank][order]
        for features in entry["features"]:
            assert features["causal_checked_per_call"] == "bias", entry["text"]
            assert features["calls_read_as_causal"] > 0 and features["calls_run_with_it"] == 0, entry["text"]
            if order != "compile_blocks":  # the root's graph built the mask: at most one layer a forward reads it
                read = features["calls_read_as_causal"] - features["calls_causal_by_proof"]
                assert read * CONFIG["layers"] <= features["calls_read_as_causal"], entry["text"]

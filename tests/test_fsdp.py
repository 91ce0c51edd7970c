"""FSDP2 on 2 CPU processes (gloo): ``optimize`` before or after ``fully_shard``, and per-block compilation
(torchtitan's order), each give the unsharded model's losses and gradients, and a report of every layer."""
from __future__ import annotations

import pytest
import torch

import attnfuse
from fsdp_runs import ORDERS, batches, build_llama, spawn, train

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

CONFIG = dict(layers=2, hidden=64, heads=4, kv_heads=2, steps=3, batch=2, tokens=16, lr=1e-2, orders=list(ORDERS))
WORLD = 2


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return spawn(WORLD, str(tmp_path_factory.mktemp("fsdp")), "gloo", CONFIG)


@pytest.fixture(scope="module")
def references():
    """The unsharded model, unoptimized and optimized, trained on every rank's batches at once."""
    data = [batches(rank, CONFIG["steps"], CONFIG["batch"], CONFIG["tokens"], 128, "cpu") for rank in range(WORLD)]
    shape = {k: CONFIG[k] for k in ("layers", "hidden", "heads", "kv_heads")}
    torch._dynamo.reset()
    plain = train(build_llama(**shape), data, CONFIG["lr"])
    optimized_model = attnfuse.optimize(build_llama(**shape))
    optimized = train(optimized_model, data, CONFIG["lr"])
    assert attnfuse.report(optimized_model).fused == CONFIG["layers"]
    return {"unoptimized": plain, "optimized": optimized}


@pytest.mark.parametrize("order", ORDERS)
def test_losses_and_gradients_equal_the_unsharded_model(sharded, references, order):
    for reference, (losses, grads) in references.items():
        for rank in range(WORLD):
            got = sharded[rank][order]["losses"]
            want = [step[rank] for step in losses]
            assert got == pytest.approx(want, abs=1e-5), (order, reference, rank)
        got_grads = sharded[0][order]["grads"]
        assert set(got_grads) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"{order} {name} vs {reference}")


def test_the_sharded_runs_do_train(references):
    """The comparison can fail: the losses move from step to step."""
    losses = references["unoptimized"][0]
    assert abs(losses[-1][0] - losses[0][0]) > 1e-2


@pytest.mark.parametrize("order", ORDERS)
def test_report_lists_every_layer(sharded, order):
    expected = [f"LlamaForCausalLM.model.layers.{i}.self_attn" for i in range(CONFIG["layers"])]
    for rank in range(WORLD):
        entry = sharded[rank][order]
        assert entry["names"] == expected, entry["text"]
        assert entry["fused"] == CONFIG["layers"] and entry["skipped"] == 0, entry["text"]


@pytest.mark.parametrize("order", ORDERS)
def test_every_layer_runs_causal(sharded, order):
    """FSDP2's hooks break the graph per layer, so transformers' mask reaches each layer's graph as an input; each
    call finds it to be the causal triangle and runs the causal kernel without it (``guards.RunTimeCausal``)."""
    for rank in range(WORLD):
        entry = sharded[rank][order]
        for features in entry["features"]:
            assert features["causal_checked_per_call"] == "bias", entry["text"]
            assert features["calls_read_as_causal"] > 0 and features["calls_run_with_it"] == 0, entry["text"]
            if order != "compile_blocks":  # the root's graph built the mask: at most one layer a forward reads it
                read = features["calls_read_as_causal"] - features["calls_causal_by_proof"]
                assert read * CONFIG["layers"] <= features["calls_read_as_causal"], entry["text"]

"""The benchmark scripts run end to end at tiny sizes (no timing is checked: figures come from the scripts)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

TINY = ["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--batch", "2",
        "--prompt", "8", "--new-tokens", "2", "--rounds", "1"]


@pytest.mark.parametrize("extra", [["--pad", "3", "--per-call", "--lengths", "8", "--repeats", "1"], ["--static", "--floor", "--rounds", "3"]],
                         ids=["dynamic-padded-per-call", "static-floor"])
def test_bench_generate_runs(tmp_path, extra):
    import bench_generate

    out = tmp_path / "generate.json"
    bench_generate.main([*TINY, *extra, "--out", str(out)])
    payload = json.loads(out.read_text())
    generate = payload["generate"]
    floor = {"dynamo_eager_backend"} if "--floor" in extra else set()
    assert set(generate["tokens_per_s"]) == {"eager", "attnfuse", "sdpa"} | floor
    paired = generate["paired_vs_sdpa"]
    assert set(paired) == {"eager", "attnfuse"} | floor
    rounds = 3 if "--floor" in extra else 1
    assert all(len(p["ratios"]) == rounds and p["q1"] <= p["median"] <= p["q3"] for p in paired.values())
    assert generate["fused_sites"] == 1
    assert generate["same_tokens_as_eager"]["attnfuse"]
    if "--per-call" in extra:
        assert {row["mask"] for row in payload["per_call"]} == {"bias", "causal"}
        assert all(row["kernel"] for row in payload["per_call"])


def test_bench_call_path_runs(tmp_path):
    import bench_call_path

    out = tmp_path / "call_path.json"
    bench_call_path.main(["--device", "cpu", "--only", "per_call", "--rounds", "1", "--repeats", "1",
                          "--out", str(out)])
    per_call = json.loads(out.read_text())["per_call"]
    assert per_call["kernel"] == "cpu-flash" and len(per_call["us"]) == 6


def test_bench_fsdp_runs_in_one_cpu_process(tmp_path):
    pytest.importorskip("transformers")
    import bench_fsdp

    out = tmp_path / "fsdp.json"
    bench_fsdp.main(["--device", "cpu", "--out", str(out), "--variants",
                     "sdpa,shard_then_optimize,compile_blocks,direct_sdpa_sites",
                     "--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
                     "--vocab", "64", "--batch", "1", "--tokens", "8", "--dtype", "float32", "--warmup", "1",
                     "--steps", "1", "--rounds", "1", "--block-compiler", "eager"])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"sdpa", "shard_then_optimize", "compile_blocks", "direct_sdpa_sites"}
    # the diagnostic's bare causal SDPA calls compute this causal model's function
    assert results["direct_sdpa_sites"]["losses"] == pytest.approx(results["sdpa"]["losses"], abs=1e-5)
    for variant in ("shard_then_optimize", "compile_blocks"):
        assert results[variant]["fused"] == 2
        assert results[variant]["losses"] == pytest.approx(results["sdpa"]["losses"], abs=1e-5)
        causal, checked, unread = results[variant]["causal_calls"]  # each layer's graph reads its mask as causal
        assert causal == checked > 0
        if variant == "shard_then_optimize":  # the mask comes from the model's graph: one layer a forward reads it
            assert 0 < unread < causal


def test_bench_host_overhead_runs(tmp_path):
    pytest.importorskip("transformers")
    import bench_host_overhead

    out = tmp_path / "host.json"
    bench_host_overhead.main(["--rounds", "1", "--repeats", "1", "--batches", "2", "--lengths", "8", "--layers", "1",
                              "--prompt", "8", "--step-batch", "2", "--step-repeats", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert {row["mask"] for row in payload["per_call"]} == {"none", "zeros", "padded"}
    assert all(row["kernel"] for row in payload["per_call"])
    for row in payload["decode_step"]:
        assert row["fused_sites"] == 1
        assert row["same_logits"]["attnfuse"] and row["same_logits"]["sdpa"]


@pytest.mark.gpu
def test_bench_models_falcon_alibi_runs_on_cuda(tmp_path):
    """Falcon with ALiBi in ``bench_models``: its filled ALiBi is read as the causal triangle and a ``(B, H, 1, S)``
    bias (``attnfuse/patterns/bias_fills.py``), in inference and training."""
    pytest.importorskip("transformers")
    import bench_models

    out = tmp_path / "falcon.json"
    bench_models.main(["--model", "falcon", "--shapes", "256x2", "--only", "eager,attnfuse", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    fused = [row for row in rows if row["variant"] == "attnfuse"]
    assert {row["pass"] for row in fused} == {"inference", "train"}
    for row in fused:
        assert row["ms"] is not None and row["report"]["fused"] == 8
        for site in row["report"]["sites"]:
            assert site["features"]["causal"] == "top_left", site
            assert site["features"]["bias"] == "(2, 16, 1, 256), (2, 16, 1, 256)", site

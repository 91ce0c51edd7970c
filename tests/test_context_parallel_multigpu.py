"""Context parallel over 2 and 4 GPUs (NCCL, ``torchrun``): whole models with hand-written attention, optimized
by attnfuse and trained with the sequence sharded, give the one-GPU losses; sites CP cannot ring are refused.

``python -m pytest -q -p no:logging -m multigpu tests/test_context_parallel_multigpu.py`` on a machine with
2 or more GPUs (x-transformers must be installed). Each world size is one ``torchrun`` of ``tests/cp_worker.py``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.multigpu, pytest.mark.models]

ROOT = Path(__file__).resolve().parent.parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["2gpus", "4gpus"])
def run(request, tmp_path_factory):
    """The worker's JSON for ``world`` GPUs (skipped when the machine has fewer)."""
    world = request.param
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    pytest.importorskip("x_transformers")
    out = tmp_path_factory.mktemp(f"cp{world}") / "result.json"
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={_free_port()}", str(ROOT / "tests" / "cp_worker.py"), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0 and out.exists(), done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["xtransformers", "llama"])
def test_whole_model_losses_match_one_gpu(run, kind):
    """Three SGD steps with the sequence sharded (causal load balancing on, global positions fed to the
    rotary embedding) give the unrewritten model's one-GPU losses and first-step logits, within bf16's
    tolerance (measured as the one-GPU fused model's own distance from the reference); feeding the model
    its local positions instead shows that the check can fail."""
    result = run[kind]
    assert "error" not in result, result.get("error")
    assert result["fused"] == 2 and all("context parallel" in k for k in result["kernels"]), result
    for got, want in zip(result["context_parallel"], result["reference"]):
        assert abs(got - want) <= 0.02 + 0.005 * abs(want), (result["context_parallel"], result["reference"])
    diff = result["logits_diff"]
    tolerance = max(3 * diff["one_gpu_fused"], 0.02 * result["logits_max"])
    assert diff["context_parallel"] <= tolerance, diff
    assert diff["local_positions"] > 3 * max(diff["context_parallel"], diff["one_gpu_fused"]), diff


@pytest.mark.parametrize("case, site, why", [
    ("alibi", "attn_layers.layers.0.1.attend", "bias|fill"),  # ALiBi: read as a (h, n, n) bias beside a finite fill
    ("padding", "model.layers.0.self_attn", "bias|mask|fill"),
])
def test_sites_cp_cannot_ring_are_refused(run, case, site, why):
    """An ALiBi site (a bias computed from local positions) and a padded Llama (a mask tensor covering this
    rank's shard) raise ContextParallelError naming the site, rather than attending within the shard."""
    error = run[case]
    assert error.startswith("attnfuse: context parallel cannot run site"), error
    assert site in error and re.search(why, error), error

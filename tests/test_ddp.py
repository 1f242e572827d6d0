"""Two-process DDP on the CPU (gloo) of examples/accelerate_multi_gpu.py: patched == unpatched == one process.

Three launches of the tiny example run side by side (same seed, same global batch, same tokens):
- ``fastkern`` under ``torch.distributed.run --nproc_per_node 2`` (Accelerate picks MULTI_CPU / gloo), with
  ``TRITON_INTERPRET=1`` so the norm, SwiGLU and fused cross-entropy kernels execute (attention in fp32 takes
  its documented SDPA fallback);
- ``sdpa`` (unpatched) under the same 2-process launch: PyTorch's same-dtype baseline;
- ``sdpa`` in float64 in ONE process with gradient accumulation 2: the oracle, which also shows that the
  2-process run trains like one process on the same global batch.
The per-step global losses are compared with the one tolerance table (tests/tolerances.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tolerances import assert_close

pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "accelerate_multi_gpu.py"
STEPS = 3


def _launch(tmp_path: Path, name: str, nproc: int, extra: list[str]) -> subprocess.Popen:
    args = [str(EXAMPLE), "--tiny", "--cpu", "--steps", str(STEPS), "--json", str(tmp_path / f"{name}.json"), *extra]
    if nproc > 1:
        # --standalone picks a free rendezvous port, so parallel launches do not collide
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    # a CUDA machine running the CPU suite: keep the launch on the CPU as well
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("HF_FASTKERN_FORCE_REFERENCE", None)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


def test_ddp_gloo_two_processes_patched_matches_unpatched(tmp_path):
    runs = {"fastkern_ddp": (2, ["--impl", "fastkern"]),
            "sdpa_ddp": (2, ["--impl", "sdpa"]),
            "oracle_single_fp64": (1, ["--impl", "sdpa", "--dtype", "float64"])}
    procs = {name: _launch(tmp_path, name, n, extra) for name, (n, extra) in runs.items()}
    results = {}
    for name, proc in procs.items():
        rc = proc.wait(timeout=240)
        log = (tmp_path / f"{name}.log").read_text()
        assert rc == 0, f"{name} failed (rc={rc}):\n{log[-4000:]}"
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    patched, base, oracle = (results[k] for k in ("fastkern_ddp", "sdpa_ddp", "oracle_single_fp64"))
    assert patched["num_processes"] == 2 and patched["mode"] == "ddp" and patched["accum"] == 1
    assert "MULTI_CPU" in patched["env"]["distributed_type"]
    assert oracle["num_processes"] == 1 and oracle["accum"] == 2
    # the patch really applied (norms, MLPs and the fused loss on the model each process trained)
    assert "norm" in patched["patch_report"] and "unpatched" in base["patch_report"]
    curves = {k: torch.tensor(r["losses"], dtype=torch.float64) for k, r in results.items()}
    assert curves["fastkern_ddp"].shape == (STEPS,) and len(set(curves["fastkern_ddp"].tolist())) == STEPS
    assert_close(curves["sdpa_ddp"], curves["oracle_single_fp64"], None, torch.float32, "output",
                 "unpatched 2-process DDP vs 1 process (same global batch)")
    assert_close(curves["fastkern_ddp"], curves["oracle_single_fp64"], curves["sdpa_ddp"], torch.float32,
                 "output", "fastkern 2-process DDP losses")

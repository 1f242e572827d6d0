"""The examples run end to end on the CPU at toy size (smoke tests, a few steps each, subprocesses).

They run with ``HF_FASTKERN_FORCE_REFERENCE=1`` and without ``TRITON_INTERPRET``: the interpreter would take
minutes for a training run, and the kernels' numerics are covered by the op, patch and training tests. What is
checked here is that each script patches, trains and prints its summary line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# finetune_trainer's plain run is the patched child of test_compare_mode[finetune_trainer] (same arguments,
# --json included), whose checks there are this test's.
CASES = {
    "finetune_trainer_packing_ckpt": ["--steps", "3", "--packing", "--gradient-checkpointing", "--accum", "2"],
    "finetune_lora": ["--steps", "3"],
    "accelerate_loop": ["--steps", "3", "--gradient-checkpointing"],
    "long_context": ["--steps", "2", "--seq", "128,256"],
}
# examples/sft_trl.py --padding-free --peft (TRL SFTTrainer + FastKernels callback, LoRA through peft_config) runs
# in test_sft_trl_two_processes, two ranks of the same command, with this test's checks.


@pytest.mark.parametrize("name", list(CASES))
def test_example_runs(name, tmp_path):
    script = EXAMPLES / (name.split("_packing")[0] + ".py")
    env = {**os.environ, "HF_FASTKERN_FORCE_REFERENCE": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    env.pop("TRITON_INTERPRET", None)
    args = CASES[name]
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    assert summary, proc.stdout[-3000:]
    assert "[patched]" in summary[-1], summary[-1]
    # the patch report is printed and names what was swapped
    assert "patched norm" in proc.stdout and "patched mlp" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("script", ["finetune_trainer", "finetune_lora", "sft_trl"])
def test_compare_mode(script, tmp_path):
    """--compare runs unpatched and patched in two processes and writes both curves (the LoRA one: issue 12's
    loss-curve tooling, with gradient checkpointing as in the scenario)."""
    env = {**os.environ, "HF_FASTKERN_FORCE_REFERENCE": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "cmp.json"
    extra = ["--gradient-checkpointing"] if script == "finetune_lora" else []
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{script}.py"), "--steps", "3", "--compare", *extra,
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert len(res["patched"]["losses"]) == len(res["unpatched"]["losses"]) == 3
    # the reference path computes what the unpatched model computes: the curves agree to the logged digits
    assert res["within_1pct"] and res["max_rel_diff"] < 1e-3, res
    assert res["environment"]["torch"]
    if script == "finetune_trainer":
        # the plain patched run (the child's own output): its summary line and the patch report
        assert any(line.startswith("summary: [patched] 3 steps") for line in proc.stdout.splitlines()), \
            proc.stdout[-3000:]
        assert "patched norm" in proc.stdout and "patched mlp" in proc.stdout, proc.stdout[-3000:]
    if script == "finetune_lora":
        assert res["patched"]["base_frozen"] and res["patched"]["trainable_params"] > 0


def test_sft_trl_two_processes(tmp_path):
    """examples/sft_trl.py under a 2-process launcher (torchrun, gloo DDP on the CPU): FastKernels patches each
    rank's model, both ranks train, the report is printed once (main process)."""
    # Two ranks share one pipe: block-buffered, a rank's block can land inside the other's line; unbuffered, a
    # print is two writes (text, newline) and the other rank can still write between them. So the lines are
    # unbuffered (no split text) and counted by their text, not by where they start.
    env = {**os.environ, "HF_FASTKERN_FORCE_REFERENCE": "1", "PYTHONPATH": str(EXAMPLES.parent),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(EXAMPLES / "sft_trl.py"), "--steps", "3", "--padding-free", "--peft"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("summary: [patched] 3 steps") == 2, proc.stdout[-3000:]
    assert proc.stdout.count("FastKernels: patched") == 1 and "patched lora_linear      14" in proc.stdout
    assert "patched norm" in proc.stdout and "patched mlp" in proc.stdout, proc.stdout[-3000:]

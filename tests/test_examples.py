"""The examples run end to end on the CPU at toy size (smoke tests, a few steps each, subprocesses).

They run with ``HF_FASTKERN_FORCE_REFERENCE=1`` and without ``TRITON_INTERPRET``: the interpreter would take
minutes for a training run, and the kernels' numerics are covered by the op, patch and training tests. What is
checked here is that each script patches, trains and prints its summary line.

Every example process of this module starts at once (the ``launched`` fixture) and each test waits for its own:
the processes are single-threaded and the pytest process only waits, so on CI's two cores they share both
instead of running one after the other on one (issue 20). The commands and checks are the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
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


COMPARE = ["finetune_trainer", "finetune_lora", "sft_trl"]
TIMEOUT = 600  # seconds a test waits for its process (they run concurrently: slower each than alone)


def _env(unbuffered: bool = False) -> dict:
    env = {**os.environ, "HF_FASTKERN_FORCE_REFERENCE": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    env.pop("TRITON_INTERPRET", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Launched:
    proc: subprocess.Popen
    out: Path
    err: Path
    workdir: Path

    def result(self) -> tuple[int, str, str]:
        """(return code, stdout, stderr) once the process has finished."""
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """name -> Launched: every example command of this module, started together."""
    commands = {}
    for name, args in CASES.items():
        commands[f"run:{name}"] = ([sys.executable, str(EXAMPLES / (name.split("_packing")[0] + ".py")), *args],
                                   _env())
    for script in COMPARE:
        extra = ["--gradient-checkpointing"] if script == "finetune_lora" else []
        commands[f"compare:{script}"] = ([sys.executable, str(EXAMPLES / f"{script}.py"), "--steps", "3",
                                          "--compare", *extra, "--json", "cmp.json"], _env())
    # two ranks share one pipe: unbuffered, so a rank's line text is never split (see the test)
    commands["torchrun:sft_trl"] = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     str(EXAMPLES / "sft_trl.py"), "--steps", "3", "--padding-free", "--peft"],
                                    _env(unbuffered=True))
    procs = {}
    for name, (cmd, env) in commands.items():
        work = tmp_path_factory.mktemp(name.replace(":", "_"))
        out, err = work / "stdout.txt", work / "stderr.txt"
        with open(out, "w") as fo, open(err, "w") as fe:
            procs[name] = Launched(subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe, cwd=work), out, err, work)
    yield procs
    for p in procs.values():
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.mark.parametrize("name", list(CASES))
def test_example_runs(name, launched):
    rc, stdout, stderr = launched[f"run:{name}"].result()
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    summary = [line for line in stdout.splitlines() if line.startswith("summary:")]
    assert summary, stdout[-3000:]
    assert "[patched]" in summary[-1], summary[-1]
    # the patch report is printed and names what was swapped
    assert "patched norm" in stdout and "patched mlp" in stdout, stdout[-3000:]


@pytest.mark.parametrize("script", COMPARE)
def test_compare_mode(script, launched):
    """--compare runs unpatched and patched in two processes and writes both curves (the LoRA one: issue 12's
    loss-curve tooling, with gradient checkpointing as in the scenario)."""
    run = launched[f"compare:{script}"]
    rc, stdout, stderr = run.result()
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    res = json.loads((run.workdir / "cmp.json").read_text())
    assert len(res["patched"]["losses"]) == len(res["unpatched"]["losses"]) == 3
    # the reference path computes what the unpatched model computes: the curves agree to the logged digits
    assert res["within_1pct"] and res["max_rel_diff"] < 1e-3, res
    assert res["environment"]["torch"]
    if script == "finetune_trainer":
        # the plain patched run (the child's own output): its summary line and the patch report
        assert any(line.startswith("summary: [patched] 3 steps") for line in stdout.splitlines()), stdout[-3000:]
        assert "patched norm" in stdout and "patched mlp" in stdout, stdout[-3000:]
    if script == "finetune_lora":
        assert res["patched"]["base_frozen"] and res["patched"]["trainable_params"] > 0


def test_sft_trl_two_processes(launched):
    """examples/sft_trl.py under a 2-process launcher (torchrun, gloo DDP on the CPU): FastKernels patches each
    rank's model, both ranks train, the report is printed once (main process)."""
    rc, stdout, stderr = launched["torchrun:sft_trl"].result()
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    # Two ranks share one pipe: block-buffered, a rank's block can land inside the other's line; unbuffered, a
    # print is two writes (text, newline) and the other rank can still write between them. So the lines are
    # unbuffered (no split text) and counted by their text, not by where they start.
    assert stdout.count("summary: [patched] 3 steps") == 2, stdout[-3000:]
    assert stdout.count("FastKernels: patched") == 1 and "patched lora_linear      14" in stdout
    assert "patched norm" in stdout and "patched mlp" in stdout, stdout[-3000:]

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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import (
    cpu_launch_env,
    end_worker,
    interpreter_skips_repeated_lang_patching,
    torchrun_module,
)
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
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=cpu_launch_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


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


# ----------------------------------------------------------------------------------------------------------
# The fused loss with a sharded (DTensor) lm_head: a 2-process gloo group on the CPU, kernels interpreted.
# Run by the test below as `python -m torch.distributed.run --nproc_per_node 2 -m tests.test_ddp`.

def _dtensor_worker() -> None:
    """Each rank: the loss of its own rows; the head's gradient must be the average over ranks (one big batch).

    Cases: (1) ``lm_head.weight`` replaced by a Shard(0) DTensor before ``apply_fast_kernels``;
    (2) FSDP2 ``fully_shard`` on ``lm_head`` (its own group, so the weight is resharded before the loss reads
    it) and on the whole model; (3) FSDP2 in the layout Accelerate 1.15 builds (every decoder layer, the input
    embedding, [final norm, lm_head] not resharded after forward, the root). Oracle: the unpatched model in fp64
    on the global batch; baseline: the same in fp32.
    """
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fastkern import apply_fast_kernels

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=250, tie_word_embeddings=False, attn_implementation="sdpa")
    base = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2 * world, 24), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank:2 * rank + 2]

    def grads(model, x):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    # global batch = mean over ranks of per-rank means (equal label counts): the gradient FSDP2/DDP apply
    oracle_loss, oracle = grads(copy.deepcopy(base).double(), ids)
    base_loss, baseline = grads(copy.deepcopy(base), ids)
    local_oracle_loss, _ = grads(copy.deepcopy(base).double(), mine)
    local_base_loss, _ = grads(copy.deepcopy(base), mine)
    rows = slice(rank * cfg.vocab_size // world, (rank + 1) * cfg.vocab_size // world)
    assert cfg.vocab_size % world == 0

    def check_head(model, loss, tag):
        assert_close(loss, local_oracle_loss, local_base_loss, torch.float32, "output", f"{tag}: local loss")
        g = model.lm_head.weight.grad
        assert isinstance(g, DTensor), f"{tag}: lm_head grad is {type(g).__name__}, not a DTensor"
        assert_close(g.to_local(), oracle["lm_head.weight"][rows], baseline["lm_head.weight"][rows],
                     torch.float32, "grad", f"{tag}: lm_head.weight grad shard (average over ranks)")

    # (1) a DTensor head weight, patched after sharding (enable_fused_loss used to refuse it)
    m1 = copy.deepcopy(base)
    m1.lm_head.weight = torch.nn.Parameter(distribute_tensor(m1.lm_head.weight.detach(), mesh, [Shard(0)]))
    report = apply_fast_kernels(m1)
    assert report.patched["cross_entropy"] == 1, str(report)
    from hf_fastkern.patches.loss import fused_loss_enabled
    assert fused_loss_enabled(m1)
    loss1, _ = grads(m1, mine)
    check_head(m1, loss1, "DTensor lm_head")
    # the rest of the model is local (no data parallel wrapper here): its gradient is this rank's own
    _, local_oracle = grads(copy.deepcopy(base).double(), mine)
    _, local_base = grads(copy.deepcopy(base), mine)
    for n in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert_close(dict(m1.named_parameters())[n].grad, local_oracle[n], local_base[n], torch.float32,
                     "grad", f"DTensor lm_head: {n} grad")

    # (2) FSDP2 on the CPU, lm_head in its own group
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is not None:
        m2 = copy.deepcopy(base)
        apply_fast_kernels(m2)
        fully_shard(m2.lm_head, mesh=mesh)
        fully_shard(m2, mesh=mesh)
        loss2, g2 = grads(m2, mine)
        for n, g in g2.items():
            full = g.full_tensor() if isinstance(g, DTensor) else g
            assert_close(full, oracle[n], baseline[n], torch.float32, "grad", f"FSDP2: {n} grad")
        assert_close(loss2, local_oracle_loss, local_base_loss, torch.float32, "output", "FSDP2: local loss")
        # (3) Accelerate 1.15's FSDP2 layout (utils/fsdp_utils.py fsdp2_prepare_model): decoder layers, the
        # input embedding, then [final norm, lm_head] as one group kept unsharded after forward, then the root
        m3 = copy.deepcopy(base)
        apply_fast_kernels(m3)
        for layer in m3.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m3.model.embed_tokens, mesh=mesh)
        fully_shard([m3.model.norm, m3.lm_head], mesh=mesh, reshard_after_forward=False)
        fully_shard(m3, mesh=mesh)
        loss3, g3 = grads(m3, mine)
        for n, g in g3.items():
            full = g.full_tensor() if isinstance(g, DTensor) else g
            assert_close(full, oracle[n], baseline[n], torch.float32, "grad", f"FSDP2 accelerate layout: {n} grad")
        assert_close(loss3, local_oracle_loss, local_base_loss, torch.float32, "output",
                     "FSDP2 accelerate layout: local loss")
    dist.barrier()
    print(f"rank {rank}: dtensor ok, fsdp2 {'ok' if fully_shard is not None else 'skipped'}", flush=True)
    dist.destroy_process_group()


def test_fused_loss_dtensor_head_two_processes(tmp_path):
    rc, out = torchrun_module("tests.test_ddp")
    assert rc == 0, out[-6000:]
    assert "rank 0: dtensor ok" in out and "rank 1: dtensor ok" in out, out[-3000:]


if __name__ == "__main__":
    interpreter_skips_repeated_lang_patching()
    _dtensor_worker()
    end_worker()

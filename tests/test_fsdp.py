"""FSDP2 with Accelerate's layout, bf16 mixed precision and activation checkpointing (issue 11), on the CPU.

Issue 11: ``accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml`` with ``--impl fastkern``
exited with rc=1 at the first step on 2 H100s (sdpa and sdpa+liger ran). Reproduced here: the backward raised
``torch.utils.checkpoint.CheckpointError: Recomputed values ... have different metadata`` (keys/values of 2x
the sequence length in the recompute). Cause: ``config.use_cache=True`` makes the decoder build a
``DynamicCache`` in every training forward; Accelerate's ``fsdp_activation_checkpointing`` wraps each decoder
layer in torch's ``checkpoint_wrapper`` (transformers' own checkpointing, which turns the cache off, is not
used), so the recompute appends the layer's keys/values to that cache a second time. SDPA's top-left
``is_causal`` hides it; the fastkern attention aligns a longer key axis bottom-right (decoding) and its
recompute differs. Fix: ``apply_fast_kernels`` turns the implicit cache off in training forwards with grad
(``patches/training_cache.py``, ``_decoder_forward``). The older code and the lean MLP both crashed.

- single process: torch's ``checkpoint_wrapper`` around each decoder layer (what Accelerate applies), bf16
  so the Triton attention runs (interpreted), loss and every gradient against the fp64 oracle; the hook's scope.
- two processes (gloo): Accelerate's own ``fsdp2_apply_ac`` and ``fsdp2_prepare_model`` (Accelerate does not
  run FSDP on the CPU, so they are called with a stand-in accelerator carrying the real plugin), full shard,
  bf16 mixed precision (Accelerate's policy, and reduce in fp32), a few AdamW steps: per-step global loss and
  the first step's gradients of patched FSDP2 vs unpatched FSDP2 (baseline) vs one fp64 process (oracle).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.harness import end_worker, interpreter_skips_repeated_lang_patching, torchrun_module
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
LR = 1e-2
_WRAP = "_checkpoint_wrapped_module."


def _config(attn: str):
    from transformers import LlamaConfig

    # use_cache stays at its default (True): that is the branch of issue 11
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                       max_position_embeddings=64, attn_implementation=attn)


def _model(attn: str = "sdpa"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config(attn)).train()


def _wrap_layers(model) -> None:
    """What Accelerate's fsdp2_apply_ac does to each decoder layer (non-reentrant, no RNG state)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[n.replace(_WRAP, "")] = g
    return out


def _ids(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (rows, 32), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# single process


def test_checkpoint_wrapper_training_cache_issue11():
    """Patched bf16 model, each layer in torch's checkpoint_wrapper, default use_cache: loss and gradients."""
    import hf_fastkern  # noqa: F401
    from hf_fastkern import apply_fast_kernels

    base = _model()
    assert base.config.use_cache is True
    ids = _ids(2)
    oracle = copy.deepcopy(base).double()
    o_loss = oracle(input_ids=ids, labels=ids).loss
    o_loss.backward()
    ref = copy.deepcopy(base).to(torch.bfloat16)
    _wrap_layers(ref)
    r_loss = ref(input_ids=ids, labels=ids).loss
    r_loss.backward()
    fast = copy.deepcopy(base).to(torch.bfloat16)
    fast.set_attn_implementation("fastkern")
    report = apply_fast_kernels(fast)
    assert report.count("attention") == 1 and report.count("mlp_recompute") == 2, str(report)
    _wrap_layers(fast)
    f_loss = fast(input_ids=ids, labels=ids).loss
    f_loss.backward()  # issue 11: CheckpointError here (keys/values of 64 rows recomputed, 32 saved)
    assert_close(f_loss.float(), o_loss, r_loss.float(), torch.bfloat16, "output", "checkpointed loss")
    og, rg, fg = _grads(oracle), _grads(ref), _grads(fast)
    assert fg.keys() == og.keys()
    for n in og:
        assert_close(fg[n].float(), og[n], rg[n].float(), torch.bfloat16, "grad", f"checkpointed {n}")


def test_training_cache_off_scope():
    """Only a training forward with grad that asked for nothing loses its cache; revert restores the decoder."""
    import hf_fastkern  # noqa: F401
    from hf_fastkern import apply_fast_kernels, revert_fast_kernels

    model = _model("fastkern")
    ids = _ids(1)
    assert model(input_ids=ids).past_key_values is not None  # before patching: a cache in training
    apply_fast_kernels(model)
    assert model(input_ids=ids).past_key_values is None
    assert model(input_ids=ids, use_cache=True).past_key_values is not None  # asked for: kept
    with torch.no_grad():
        assert model(input_ids=ids).past_key_values is not None  # rollouts / generation: kept
    model.eval()
    assert model(input_ids=ids).past_key_values is not None
    model.train()
    # another attention implementation afterwards: the model behaves as it does unpatched
    model.set_attn_implementation("sdpa")
    assert model(input_ids=ids).past_key_values is not None
    model.set_attn_implementation("fastkern")
    revert_fast_kernels(model)
    assert "forward" not in model.model.__dict__
    assert model(input_ids=ids).past_key_values is not None
    # the bound decoder forward shows the original signature (callers inspect it) and survives a deepcopy
    apply_fast_kernels(model)
    import inspect
    assert inspect.signature(model.model.forward) == inspect.signature(type(model.model).forward.__get__(model.model))
    clone = copy.deepcopy(model)
    assert clone(input_ids=ids).past_key_values is None


# ----------------------------------------------------------------------------------------------------------
# two processes: Accelerate's FSDP2 path. Run by the test below as
# `python -m torch.distributed.run --nproc_per_node 2 -m tests.test_fsdp`.


def _accelerate_fsdp2(model, rank: int, reduce_dtype: torch.dtype | None):
    """Accelerate 1.15's Accelerator._prepare_fsdp2 on ``model``: AC wrappers, then its fully_shard layout."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # examples/accelerate_configs/fsdp2.yaml
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], activation_checkpointing=True,
        state_dict_type="SHARDED_STATE_DICT")
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does for mixed_precision: bf16
    if reduce_dtype is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    shim = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16",
                                 is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None)
    plugin.set_auto_wrap_policy(model)
    model = fsdp2_apply_ac(shim, model)
    return fsdp2_prepare_model(shim, model)


def _fsdp_worker() -> None:
    import torch.distributed as dist

    import hf_fastkern  # noqa: F401
    from hf_fastkern import apply_fast_kernels

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = _model()
    # the same global batch every step: the loss must fall, so the steps test the updates, not only the data
    batches = [_ids(2 * world, seed=10)] * STEPS

    def train(model, local: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        losses, first = [], None
        for ids in batches:
            x = ids if local else ids[2 * rank:2 * rank + 2]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if first is None:
                first = _grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.detach().double()
            if not local:
                # equal label counts per rank: the mean of the rank means is the global-batch mean
                dist.all_reduce(loss)
                loss = loss / world
            losses.append(loss)
        return torch.stack(losses), first

    # the oracle: one process, the global batch, fp64, no checkpointing
    o_loss, o_grad = train(copy.deepcopy(base).double(), local=True)
    for policy, reduce_dtype in (("accelerate bf16", None), ("reduce fp32", torch.float32)):
        ref = _accelerate_fsdp2(copy.deepcopy(base), rank, reduce_dtype)
        r_loss, r_grad = train(ref, local=False)
        fast = copy.deepcopy(base)
        fast.set_attn_implementation("fastkern")
        report = apply_fast_kernels(fast)  # before prepare, as the example does
        assert report.count("mlp_recompute") == 2, str(report)
        fast = _accelerate_fsdp2(fast, rank, reduce_dtype)
        assert any(_WRAP in n for n, _ in fast.named_parameters()), "activation checkpointing not applied"
        f_loss, f_grad = train(fast, local=False)
        assert f_loss[-1] < f_loss[0] and o_loss[-1] < o_loss[0], f"{policy}: the loss did not fall"
        assert_close(r_loss, o_loss, None, torch.bfloat16, "output", f"{policy}: unpatched FSDP2 vs 1 process")
        assert_close(f_loss, o_loss, r_loss, torch.bfloat16, "output", f"{policy}: fastkern FSDP2 losses")
        assert f_grad.keys() == o_grad.keys()
        for n in o_grad:
            assert_close(f_grad[n].double(), o_grad[n], r_grad[n].double(), torch.bfloat16, "grad",
                         f"{policy}: fastkern FSDP2 first-step {n}")
        print(f"rank {rank}: {policy}: losses fastkern {f_loss.tolist()} sdpa {r_loss.tolist()} "
              f"oracle {o_loss.tolist()}", flush=True)
    dist.barrier()
    print(f"rank {rank}: fsdp2 ok", flush=True)
    dist.destroy_process_group()


def test_fsdp2_accelerate_layout_two_processes():
    pytest.importorskip("accelerate.utils.fsdp_utils")
    from accelerate.utils import fsdp_utils

    if not hasattr(fsdp_utils, "fsdp2_apply_ac"):
        pytest.skip("this accelerate has no fsdp2_apply_ac (FSDP2 activation checkpointing)")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 fully_shard")
    rc, out = torchrun_module("tests.test_fsdp")
    assert rc == 0, out[-8000:]
    assert "rank 0: fsdp2 ok" in out and "rank 1: fsdp2 ok" in out, out[-3000:]


# ----------------------------------------------------------------------------------------------------------
# GPU: the launch that failed in issue 11, at a small size (2 GPUs)


@pytest.mark.gpu
def test_gpu_fsdp2_accelerate_launch_two_gpus(tmp_path):
    """``accelerate launch --config_file fsdp2.yaml --num_processes 2`` of the example (small model, head_dim 64
    so the Triton attention runs): fastkern and sdpa both finish; fastkern's per-step global loss against one
    fp64 CPU process on the same global batch (oracle), sdpa's FSDP2 error as the baseline."""
    import json

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    example = ROOT / "examples" / "accelerate_multi_gpu.py"
    common = ["--size", "small", "--seq", "256", "--steps", "4", "--warmup", "1", "--global-batch", "4",
              "--micro-batch", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("HF_FASTKERN_FORCE_REFERENCE", None)
    runs = {
        "fastkern": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2",
                     "--main_process_port", "29531", str(example), "--impl", "fastkern", *common],
        "sdpa": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2",
                 "--main_process_port", "29532", str(example), "--impl", "sdpa", *common],
        "oracle": [sys.executable, str(example), "--impl", "sdpa", "--cpu", "--dtype", "float64", *common],
    }
    curves = {}
    for name, cmd in runs.items():
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert proc.returncode == 0, f"{name} (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
        r = json.loads(out.read_text())
        if name != "oracle":
            assert r["mode"] == "fsdp2" and r["grad_ckpt"], r["mode"]
        curves[name] = torch.tensor(r["losses"], dtype=torch.float64)
    # No bound on sdpa alone: its bf16 FSDP2 losses (bf16 parameters and logits, losses reported in bf16: one
    # ulp is 0.016 at 7) differ from the fp64 oracle by ~1-2% (0.13 at loss 7 on the H100), more than the
    # output bound of one kernel (device call 2026-11-25f). The rule is the one of every kernel test: fastkern's
    # error against the oracle, bounded by PyTorch's (sdpa's) error in the same setting.
    assert_close(curves["fastkern"], curves["oracle"], curves["sdpa"], torch.bfloat16, "output",
                 "fastkern FSDP2 losses")


if __name__ == "__main__":
    interpreter_skips_repeated_lang_patching()
    _fsdp_worker()
    end_worker()

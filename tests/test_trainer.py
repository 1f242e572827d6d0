"""A patched model trains with transformers' Trainer exactly like the unpatched one.

Every case runs 10 optimizer steps (batch 2; gradient accumulation 2 in the fp32 cases) three times from one
init and one data order: the unpatched model in fp64 (the oracle), the unpatched model in the test precision (PyTorch's baseline) and the patched model. The
per-micro-batch loss curves are judged with the tolerance table (kind "output"), so gradient accumulation
(``num_items_in_batch``), gradient checkpointing, bf16 autocast and packing are each held to the same rule.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

from hf_fastkern import apply_fast_kernels
from tests.test_patch_archs import ARCHS, VOCAB, build
from tests.tolerances import assert_close

LLAMA = ARCHS[0]
# Optimizer steps per run (x accum micro-batches). Five steps with accumulation 2 already run every code path
# (accumulation, num_items_in_batch, optimizer updates, checkpointing); more steps only repeat them under the
# interpreter, which dominated CI's time (issue 20). The bound is the same per step.
STEPS = 5


class RecordingTrainer(Trainer):
    """Records every micro-batch loss at full precision (the logged loss is rounded to 4 digits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        self.losses.append(loss.detach().double().item())
        return out


def synthetic(n: int = 48, seq: int = 16, ragged: bool = False, seed: int = 0) -> list[dict]:
    """Learnable toy data: each row repeats a short random motif, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g)) if ragged else seq
        motif = torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        ids = motif.repeat(length // len(motif) + 1)[:length].tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def train(model, tmp_path, *, gc=False, bf16=False, fp16=False, packing=False, steps=STEPS, lr=1e-3,
          accum=1) -> torch.Tensor:
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=accum,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, data_seed=0, save_strategy="no",
        gradient_checkpointing=gc, bf16=bf16, fp16=fp16, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    collator = DataCollatorWithFlattening() if packing else default_data_collator
    trainer = RecordingTrainer(model=model, args=args, train_dataset=synthetic(ragged=packing),
                               data_collator=collator)
    trainer.train()
    assert len(trainer.losses) == steps * accum
    return torch.tensor(trainer.losses, dtype=torch.float64)


def three_runs(tmp_path, make_model, dtype, **kw):
    """(oracle fp64, baseline, patched) loss curves from one init."""
    ref = make_model()
    oracle = train(copy.deepcopy(ref).double(), tmp_path / "oracle", **{**kw, "bf16": False, "fp16": False})
    base = train(copy.deepcopy(ref), tmp_path / "base", **kw)
    patched_model = copy.deepcopy(ref)
    report = apply_fast_kernels(patched_model)
    assert report.patched.get("norm", 0) > 0, str(report)
    patched = train(patched_model, tmp_path / "patched", **kw)
    assert len(set(patched.tolist())) > 1, "the loss never changed: nothing trained"
    return oracle, base, patched


@pytest.mark.parametrize("gc", [False, True], ids=["no_gc", "grad_ckpt"])
def test_trainer_fp32(tmp_path, gc):
    # Gradient accumulation 2: the loss must honour num_items_in_batch to match the unpatched run.
    oracle, base, patched = three_runs(tmp_path, lambda: build(LLAMA), torch.float32, gc=gc, accum=2)
    assert_close(patched, oracle, base, torch.float32, "output", f"trainer losses gc={gc}")


def test_trainer_bf16_autocast(tmp_path):
    oracle, base, patched = three_runs(tmp_path, lambda: build(LLAMA), torch.bfloat16, bf16=True)
    assert_close(patched, oracle, base, torch.bfloat16, "output", "trainer losses bf16")


def test_trainer_packing_with_flattening_collator(tmp_path):
    oracle, base, patched = three_runs(tmp_path, lambda: build(LLAMA), torch.float32, packing=True)
    assert_close(patched, oracle, base, torch.float32, "output", "trainer losses packed")


def test_trainer_gpt2_conv1d_layernorm(tmp_path):
    # GPT-2: LayerNorm, Conv1D projections, tied head; with gradient checkpointing.
    name = "gpt2"
    arch = next(a for a in ARCHS if a.name == name)
    oracle, base, patched = three_runs(tmp_path, lambda: build(arch), torch.float32, gc=True)
    assert_close(patched, oracle, base, torch.float32, "output", f"trainer losses {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision_gpu(tmp_path, precision):
    # fp16 goes through the Trainer's GradScaler path; the oracle is the unpatched fp64 run.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    oracle, base, patched = three_runs(tmp_path, lambda: build(LLAMA).cuda(), dtype, **{precision: True})
    assert_close(patched, oracle, base, dtype, "output", f"trainer losses {precision}")

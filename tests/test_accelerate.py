"""A patched model in a plain Accelerate loop (``accelerator.prepare``) trains like the unpatched one."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_fastkern import apply_fast_kernels
from tests.test_patch_archs import ARCHS, build
from tests.test_trainer import STEPS, synthetic
from tests.tolerances import assert_close

accelerate = pytest.importorskip("accelerate")

LLAMA = ARCHS[0]


def accelerate_losses(model, *, gc: bool, accum: int = 2) -> torch.Tensor:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accum)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = synthetic(n=STEPS * accum * 2)
    data = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach().double().item())
    accelerator.free_memory()
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("gc", [False, True], ids=["no_gc", "grad_ckpt"])
def test_accelerate_loop_matches_unpatched(gc):
    ref = build(LLAMA)
    oracle = accelerate_losses(copy.deepcopy(ref).double(), gc=gc)
    base = accelerate_losses(copy.deepcopy(ref), gc=gc)
    patched_model = copy.deepcopy(ref)
    report = apply_fast_kernels(patched_model)
    assert report.patched["norm"] == 5 and report.patched["mlp"] == 2, str(report)
    patched = accelerate_losses(patched_model, gc=gc)
    assert len(patched) == STEPS * 2 and len(set(patched.tolist())) > 1
    assert_close(patched, oracle, base, torch.float32, "output", f"accelerate losses gc={gc}")

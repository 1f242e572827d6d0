"""The one tolerance table (STYLE.md rule 6). No test picks its own.

Rule: the error of a kernel against the fp64 oracle must be at most
    FACTOR[kind] * (error of PyTorch's same-dtype computation against that oracle) + floor(dtype),
where floor is one rounding of the output dtype relative to the largest oracle value, plus a tiny atol
for all-zero results. Error is the max absolute difference. FACTOR is 2 for outputs and 3 for gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Floor:
    rtol: float  # one rounding of this dtype, relative to max |oracle|
    atol: float


FLOORS = {
    # fp32 keeps a few ulps: kernels and torch sum in different orders.
    torch.float32: Floor(rtol=2.0**-20, atol=1e-7),
    # one bf16/fp16 rounding (spacing 2**-7 / 2**-10 relative to a value in [1, 2)).
    torch.bfloat16: Floor(rtol=2.0**-7, atol=1e-5),
    torch.float16: Floor(rtol=2.0**-10, atol=1e-6),
}

FACTOR = {"output": 2.0, "grad": 3.0}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def bound(oracle: torch.Tensor, baseline_err: float, dtype: torch.dtype, kind: str) -> float:
    f = FLOORS[dtype]
    scale = oracle.double().abs().max().item() if oracle.numel() else 0.0
    return FACTOR[kind] * baseline_err + f.rtol * scale + f.atol


def assert_close(actual: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor | None,
                 dtype: torch.dtype, kind: str = "output", name: str = "") -> None:
    """actual: kernel result; oracle: fp64 reference; baseline: PyTorch's same-dtype result (or None)."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(actual).any() or torch.isnan(oracle).any(), f"{name}: NaN in kernel result"
    base = max_err(baseline, oracle) if baseline is not None else 0.0
    err = max_err(actual, oracle)
    lim = bound(oracle, base, dtype, kind)
    assert err <= lim, (f"{name} ({kind}, {dtype}): max error {err:.3e} > bound {lim:.3e} "
                        f"(PyTorch same-dtype error {base:.3e})")

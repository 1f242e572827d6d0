"""transformers' own kernel switch (``use_kernels=True`` + ``KernelConfig``) pointed at hf_fastkern's RMSNorm.

TRL now steers users from ``use_liger_kernel`` to ``model_init_kwargs={"use_kernels": True}``; with a
``KernelConfig`` transformers accepts a *local* kernel repository ("/abs/path:LayerName",
``use_local_kernel=True``) instead of a Hub one. ``kernel_config()`` writes such a repository for hf_fastkern
and returns the config:

    from hf_fastkern.integrations.hub_kernels import kernel_config
    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=kernel_config())
    SFTConfig(model_init_kwargs={"use_kernels": True, "kernel_config": kernel_config()})

What it can and cannot cover (read in transformers 5.25 / kernels 0.19; details in docs/trl.md):
- Only modules decorated with ``@use_kernel_forward_from_hub(name)`` can be mapped. In Llama/Mistral/Qwen
  that is ``"RMSNorm"`` (and ``"rotary_pos_emb"``); the MLP is not decorated, so our fused SwiGLU MLP, the
  attention and the fused loss are out of this switch's reach (``FastKernels`` / ``apply_fast_kernels`` do them).
- A kernels "layer" must be stateless (no ``__init__``, no members besides ``has_backward`` /
  ``can_torch_compile``) with the replaced forward's signature; kernels binds its ``forward`` per instance.
  ``RMSNorm`` below reads the module's own ``weight`` and ``variance_epsilon`` (Llama's names).
- transformers' ``KernelConfig.create_compatible_mapping`` refuses every device but cuda/rocm/xpu/npu/neuron/
  tpu/mps (``add_to_mapping_local``), so the switch works on a GPU only; on the CPU the layer is still testable
  through ``kernels.get_local_kernel`` (which resolves the repository on any device).
"""
from __future__ import annotations

import json
import os
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn
from transformers import KernelConfig

from hf_fastkern.kernels.rms_norm import rms_norm

# the build variant kernels resolves on any backend (a pure-Python "universal" kernel)
VARIANT = "torch-universal"
METADATA = {"id": "hf_fastkern_layers", "name": "hf-fastkern", "version": 1, "license": "Apache-2.0",
            "python-depends": [], "backend": {"type": "universal"}}
# the repository's __init__.py: the layers live here, the repository only re-exports them
INIT_PY = "from hf_fastkern.integrations.hub_kernels import layers  # noqa: F401\n"


class RMSNorm(nn.Module):
    """Stateless kernels layer for transformers' ``"RMSNorm"`` (``LlamaRMSNorm`` and its copies).

    forward(hidden_states [..., hidden] fp32/bf16/fp16) -> same shape, Llama order (normalise in fp32, cast to
    the input dtype, then multiply by ``weight``), through ``hf_fastkern.kernels.rms_norm``.
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, cast_before_weight=True)


layers = types.SimpleNamespace(RMSNorm=RMSNorm)
# transformers' layer names (use_kernel_forward_from_hub) -> the layer above
LAYER_NAMES = {"RMSNorm": "RMSNorm"}


def write_kernel_repo(path: str | os.PathLike | None = None) -> Path:
    """Write the local kernel repository (``<path>/build/torch-universal/{metadata.json,__init__.py}``).

    path: a directory (created); default a fresh temporary one. Returns it as an absolute Path.
    """
    root = Path(path if path is not None else tempfile.mkdtemp(prefix="hf_fastkern_kernel_repo_")).resolve()
    variant = root / "build" / VARIANT
    variant.mkdir(parents=True, exist_ok=True)
    (variant / "metadata.json").write_text(json.dumps(METADATA))
    (variant / "__init__.py").write_text(INIT_PY)
    return root


def kernel_config(path: str | os.PathLike | None = None, device: str = "cuda") -> KernelConfig:
    """A ``transformers.KernelConfig`` mapping ``"RMSNorm"`` to hf_fastkern (a local repository at ``path``).

    device: the device type the mapping is for (transformers refuses "cpu").
    """
    root = write_kernel_repo(path)
    mapping = {name: {device: f"{root}:{layer}"} for name, layer in LAYER_NAMES.items()}
    return KernelConfig(kernel_mapping=mapping, use_local_kernel=True)

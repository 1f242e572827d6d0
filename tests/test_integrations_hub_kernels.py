"""transformers/kernels' switch pointed at hf_fastkern (``hf_fastkern/integrations/hub_kernels.py``).

CPU: the written local repository resolves through the ``kernels`` library and ``kernelize`` binds our RMSNorm
layer to every ``LlamaRMSNorm`` (outputs and gradients against the unpatched model, fp64 oracle);
``KernelConfig`` accepts the mapping. GPU: the user's route, ``from_pretrained(use_kernels=True,
kernel_config=kernel_config())`` (transformers refuses a CPU device for a KernelConfig mapping).
"""
from __future__ import annotations

import copy

import pytest
import torch

kernels = pytest.importorskip("kernels")

from transformers import LlamaForCausalLM  # noqa: E402

from hf_fastkern.integrations.hub_kernels import RMSNorm, kernel_config, write_kernel_repo  # noqa: E402
from tests.test_patch_archs import ARCHS, build  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

LLAMA = ARCHS[0]


def _norms(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().double(), [p.grad.double() for p in model.parameters()]


def test_local_repo_resolves_and_kernelize_binds(tmp_path):
    root = write_kernel_repo(tmp_path / "repo")
    module = kernels.get_local_kernel(root)
    assert module.layers.RMSNorm is RMSNorm
    ref = build(LLAMA)
    model = copy.deepcopy(ref)
    repo = kernels.LocalLayerRepository(repo_path=root, layer_name="RMSNorm")
    with kernels.use_kernel_mapping({"RMSNorm": {"cpu": repo}}, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu")
    bound = [m for m in _norms(model) if getattr(m.forward, "__func__", None) is RMSNorm.forward]
    assert len(bound) == len(_norms(model)) == 2 * LLAMA.kwargs["num_hidden_layers"] + 1
    ids = torch.randint(3, LLAMA.kwargs["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    oracle, oracle_g = _loss_and_grads(copy.deepcopy(ref).double(), ids)
    base, base_g = _loss_and_grads(ref, ids)
    got, got_g = _loss_and_grads(model, ids)
    assert_close(got, oracle, base, torch.float32, "output", "kernelized logits")
    for (name, _), a, o, b in zip(ref.named_parameters(), got_g, oracle_g, base_g):
        assert_close(a, o, b, torch.float32, "grad", f"kernelized grad {name}")


def test_kernel_config_mapping_is_valid(tmp_path):
    cfg = kernel_config(tmp_path / "repo")
    assert cfg.use_local_kernel
    # the same validation from_pretrained(use_kernels=True, kernel_config=...) runs first
    cfg.sanitize_kernel_mapping(build(LLAMA))
    (path_layer,) = cfg.kernel_mapping["RMSNorm"].values()
    assert path_layer == f"{(tmp_path / 'repo').resolve()}:RMSNorm"


@pytest.mark.gpu
def test_from_pretrained_use_kernels_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = build(LLAMA)
    ref.save_pretrained(tmp_path / "model")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32, device_map="cuda",
                                             use_kernels=True, kernel_config=kernel_config(tmp_path / "repo"))
    model.train()
    assert all(getattr(m.forward, "__func__", None) is RMSNorm.forward for m in _norms(model))
    ids = torch.randint(3, LLAMA.kwargs["vocab_size"], (2, 64), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    oracle, oracle_g = _loss_and_grads(copy.deepcopy(ref).double().cuda(), ids)
    base, base_g = _loss_and_grads(ref.cuda(), ids)
    got, got_g = _loss_and_grads(model, ids)
    assert_close(got, oracle, base, torch.float32, "output", "use_kernels logits")
    for (name, _), a, o, b in zip(ref.named_parameters(), got_g, oracle_g, base_g):
        assert_close(a, o, b, torch.float32, "grad", f"use_kernels grad {name}")

"""PLACEHOLDER (being replaced by the kernel): LayerNorm entry point with its final signature."""
from hf_fastkern.kernels import reference


def layer_norm(x, weight, bias, eps=1e-5):
    return reference.layer_norm(x, weight, bias, eps)

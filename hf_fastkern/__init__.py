"""hf_fastkern: fused Triton kernels for HuggingFace Transformers training and inference.

Public API:
    apply_fast_kernels(model, attention=True, norm=True, mlp=True, cross_entropy=True) -> report
    revert_fast_kernels(model)
Importing the package registers "fastkern" as an ``attn_implementation`` with transformers.
"""
from hf_fastkern.patches.attention import register_fastkern_attention
from hf_fastkern.patches.registry import apply_fast_kernels, revert_fast_kernels

__version__ = "0.1.0"
__all__ = ["apply_fast_kernels", "revert_fast_kernels", "register_fastkern_attention", "__version__"]

register_fastkern_attention()

"""hf_fastkern: fused Triton kernels for HuggingFace Transformers training and inference.

Public API:
    apply_fast_kernels(model, ...) -> PatchReport     patch this model instance (any order with PEFT)
    revert_fast_kernels(model) -> int                 walk its ledger back
    report(model) -> PatchReport                      what runs now, what falls back, what was left and why
    FastKernMetricsCallback                           tokens/s, MFU and memory in Trainer logs
    FastKernels(**options)                            Trainer/TRL callback: patches the trained model at train begin
Importing the package registers "fastkern" as an ``attn_implementation`` with transformers.
"""
from hf_fastkern.integrations.callbacks import FastKernMetricsCallback
from hf_fastkern.integrations.trainer import FastKernels
from hf_fastkern.kernels.cross_entropy import resolve_label_checks
from hf_fastkern.patches.apply import apply_fast_kernels, report, revert_fast_kernels
from hf_fastkern.patches.attention import register_fastkern_attention
from hf_fastkern.patches.ledger import PatchReport

__version__ = "0.1.0"
__all__ = ["apply_fast_kernels", "revert_fast_kernels", "report", "PatchReport", "FastKernMetricsCallback",
           "FastKernels", "register_fastkern_attention", "resolve_label_checks", "__version__"]

register_fastkern_attention()

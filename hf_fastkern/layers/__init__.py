"""Module-level fused autograd built on the kernels: fused MLP, fused LoRA linear, shared autocast cast, fused
RoPE attention forward, and the nn.Module drop-ins (modules.py). Imports kernels/ only; never transformers."""

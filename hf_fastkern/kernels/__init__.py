"""Triton kernels and their autograd wrappers. Never imports transformers (DESIGN.md)."""

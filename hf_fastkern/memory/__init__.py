"""Activation memory: offload of checkpointed hidden states (offload.py) and chunked recompute (recompute.py)."""

"""PLACEHOLDER (being replaced): fused linear cross-entropy for *ForCausalLM models."""


def enable_fused_loss(model):
    """Route the training loss of this model instance through the fused path. Returns (ok, reason)."""
    return False, "fused loss not implemented yet"


def disable_fused_loss(model) -> None:
    """Undo enable_fused_loss on this instance (no-op if it was not enabled)."""

"""Everything that touches transformers: attention registration, per-architecture recipes, the fused loss."""

"""Phi-3 recipe: fused qkv stays in the attention; the fused ``gate_up_proj`` is split into two views for SwiGLU."""
from hf_fastkern.patches.registry import Recipe, fused_gated_mlp_factory, register_recipe, rms_norm_factory

PHI3 = register_recipe(Recipe(
    name="phi3",
    model_types=("phi3",),
    norms={"Phi3RMSNorm": rms_norm_factory()},
    mlps={"Phi3MLP": fused_gated_mlp_factory("gate_up_proj", "down_proj", act_keys=("hidden_act",))},
    notes="gate_up_proj output [..., 2 * intermediate] chunked into gate | up",
))

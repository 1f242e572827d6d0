"""Phi-3 recipe: fused qkv stays in the attention; the fused ``gate_up_proj`` is split into two views for SwiGLU."""
from hf_fastkern.patches.factories import fused_gated_mlp_factory, rms_norm_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

PHI3 = register_recipe(Recipe(
    name="phi3",
    model_types=("phi3",),
    norms={"Phi3RMSNorm": rms_norm_factory()},
    mlps={"Phi3MLP": fused_gated_mlp_factory("gate_up_proj", "down_proj", act_keys=("hidden_act",))},
    notes="gate_up_proj output [..., 2 * intermediate] chunked into gate | up",
))

"""Llama (2, 3.x) recipe: RMSNorm (Llama order), SwiGLU MLP, attention interface, fused linear-CE head."""
from hf_fastkern.patches.factories import gated_mlp_factory, rms_norm_factory, rope_attention_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

LLAMA = register_recipe(Recipe(
    name="llama",
    model_types=("llama",),
    norms={"LlamaRMSNorm": rms_norm_factory()},
    mlps={"LlamaMLP": gated_mlp_factory(act_keys=("hidden_act",))},
    rope_attention={"LlamaAttention": rope_attention_factory()},
))

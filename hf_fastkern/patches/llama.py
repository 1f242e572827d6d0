"""Llama (2, 3.x) recipe: RMSNorm (Llama order), SwiGLU MLP, attention interface, fused linear-CE head."""
from hf_fastkern.patches.registry import Recipe, gated_mlp_factory, register_recipe, rms_norm_factory
from hf_fastkern.patches.rope_attention import rope_attention_factory

LLAMA = register_recipe(Recipe(
    name="llama",
    model_types=("llama",),
    norms={"LlamaRMSNorm": rms_norm_factory()},
    mlps={"LlamaMLP": gated_mlp_factory(act_keys=("hidden_act",))},
    rope_attention={"LlamaAttention": rope_attention_factory()},
))

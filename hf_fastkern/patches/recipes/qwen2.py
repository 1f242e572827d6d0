"""Qwen2 recipe: Llama-style RMSNorm and SwiGLU MLP; q/k/v biases live in the projections, untouched."""
from hf_fastkern.patches.factories import gated_mlp_factory, rms_norm_factory, rope_attention_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

QWEN2 = register_recipe(Recipe(
    name="qwen2",
    model_types=("qwen2",),
    norms={"Qwen2RMSNorm": rms_norm_factory()},
    mlps={"Qwen2MLP": gated_mlp_factory(act_keys=("hidden_act",))},
    rope_attention={"Qwen2Attention": rope_attention_factory("module")},
    notes="per-layer sliding window (use_sliding_window) is passed to the attention implementation",
))

"""Qwen3 recipe: the per-head q_norm / k_norm are Qwen3RMSNorm instances too, so they are swapped as norms."""
from hf_fastkern.patches.factories import gated_mlp_factory, rms_norm_factory, rope_attention_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

QWEN3 = register_recipe(Recipe(
    name="qwen3",
    model_types=("qwen3",),
    norms={"Qwen3RMSNorm": rms_norm_factory()},
    mlps={"Qwen3MLP": gated_mlp_factory(act_keys=("hidden_act",))},
    rope_attention={"Qwen3Attention": rope_attention_factory("module")},
    notes="q_norm/k_norm normalise [batch, seq, heads, head_dim] over head_dim",
))

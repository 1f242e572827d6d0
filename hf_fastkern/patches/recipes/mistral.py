"""Mistral recipe: as Llama; the sliding window reaches the attention kernel through the attention interface."""
from hf_fastkern.patches.factories import gated_mlp_factory, rms_norm_factory, rope_attention_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

MISTRAL = register_recipe(Recipe(
    name="mistral",
    model_types=("mistral",),
    norms={"MistralRMSNorm": rms_norm_factory()},
    mlps={"MistralMLP": gated_mlp_factory(act_keys=("hidden_act",))},
    rope_attention={"MistralAttention": rope_attention_factory("config")},
    notes="sliding_window is passed to the attention implementation by the model",
))

"""Gemma 1/2/3 recipes: ``(1 + weight)`` RMSNorm computed in fp32 then cast (Gemma order), GeGLU (tanh) MLP.

Gemma 2/3 attention logit soft-capping and sliding windows reach the attention implementation as keyword
arguments; the final-logit soft-cap belongs to the loss path (patches/loss.py decides whether it can fuse it).
Gemma 3's q_norm / k_norm are Gemma3RMSNorm too.
"""
from hf_fastkern.patches.factories import gated_mlp_factory, rms_norm_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

_GEMMA_NORM = rms_norm_factory(offset=1.0, cast_before_weight=False)

GEMMA = register_recipe(Recipe(
    name="gemma",
    model_types=("gemma",),
    norms={"GemmaRMSNorm": _GEMMA_NORM},
    mlps={"GemmaMLP": gated_mlp_factory(act_keys=("hidden_act",))},
    notes="1 + weight RMSNorm",
))

GEMMA2 = register_recipe(Recipe(
    name="gemma2",
    model_types=("gemma2",),
    norms={"Gemma2RMSNorm": _GEMMA_NORM},
    mlps={"Gemma2MLP": gated_mlp_factory(act_keys=("hidden_activation", "hidden_act"))},
    notes="attention softcap and sliding window via the attention interface; final logit softcap in the loss",
))

GEMMA3 = register_recipe(Recipe(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    norms={"Gemma3RMSNorm": _GEMMA_NORM},
    mlps={"Gemma3MLP": gated_mlp_factory(act_keys=("hidden_activation", "hidden_act"))},
    notes="q_norm/k_norm swapped as norms; the vision tower (gemma3) keeps its own modules",
))

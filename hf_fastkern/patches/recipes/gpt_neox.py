"""GPT-NeoX / Pythia recipe: nn.LayerNorm and a GELU MLP.

Only modules are swapped: the parallel residual and the partial rotary live in the layer / attention forwards,
which stay the model's own.
"""
from hf_fastkern.patches.factories import layer_norm_factory, plain_mlp_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

GPT_NEOX = register_recipe(Recipe(
    name="gpt_neox",
    model_types=("gpt_neox",),
    norms={"LayerNorm": layer_norm_factory()},
    mlps={"GPTNeoXMLP": plain_mlp_factory("dense_h_to_4h", "dense_4h_to_h", act_keys=("hidden_act",))},
    notes="parallel residual and partial rotary untouched",
))

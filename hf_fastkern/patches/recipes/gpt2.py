"""GPT-2 recipe: nn.LayerNorm (ln_1, ln_2, ln_f), MLP ``c_proj(gelu_new(c_fc(x)))`` then dropout.

The projections are Conv1D modules: they are called, not read, so LoRA on c_fc/c_proj keeps working. The tied
LM head goes through the fused loss like any other.
"""
from hf_fastkern.patches.factories import layer_norm_factory, plain_mlp_factory
from hf_fastkern.patches.recipe import Recipe, register_recipe

GPT2 = register_recipe(Recipe(
    name="gpt2",
    model_types=("gpt2",),
    norms={"LayerNorm": layer_norm_factory()},
    mlps={"GPT2MLP": plain_mlp_factory("c_fc", "c_proj", act_keys=("activation_function",),
                                        dropout="dropout")},
    notes="attention dropout and scale_attn_by_inverse_layer_idx are handled by the attention implementation",
))

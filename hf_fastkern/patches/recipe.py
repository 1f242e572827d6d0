"""The recipe type and the table of recipes by ``config.model_type``.

A :class:`Recipe` is data: which norm, MLP and attention classes of an architecture get which replacement forward
(a factory from :mod:`hf_fastkern.patches.factories`), and whether the attention implementation and the LM head
(fused loss) are switched. The files under ``patches/recipes/`` each declare a few of them; the ledger in
:mod:`hf_fastkern.patches.apply` binds them per instance.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

Forward = Callable[..., torch.Tensor]
# factory(module, config) -> replacement forward ``fn(self, x)``; raises layers.common.Unsupported(reason) to refuse.
ForwardFactory = Callable[[nn.Module, Any], Forward]


@dataclass(frozen=True)
class Recipe:
    """What to patch in one architecture.

    norms / mlps / rope_attention: class name -> replacement forward factory. Class *names* (not classes) keep
    recipes free of transformers imports and valid across versions; a class a model lacks is reported
    ("recipe llama: no module of class LlamaMLP"), so a rename in a new transformers release shows.
    attention: switch the model to the "fastkern" attention implementation.
    lm_head: route the causal-LM loss through the fused linear cross-entropy.
    """

    name: str
    model_types: tuple[str, ...]
    norms: Mapping[str, ForwardFactory] = field(default_factory=dict)
    mlps: Mapping[str, ForwardFactory] = field(default_factory=dict)
    attention: bool = True
    lm_head: bool = True
    notes: str = ""
    rope_attention: Mapping[str, ForwardFactory] = field(default_factory=dict)
    """attention class name -> replacement forward with the fused RoPE kernel (layers/rope_attention.py)."""


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` under each of its model types (a later registration replaces an earlier one)."""
    for mt in recipe.model_types:
        RECIPES[mt] = recipe
    return recipe

"""Per-architecture recipes: a few declarative lines each. Importing this package registers them all."""
from hf_fastkern.patches.recipes import gemma, gpt2, gpt_neox, llama, mistral, phi3, qwen2, qwen3  # noqa: F401

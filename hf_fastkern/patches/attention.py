"""PLACEHOLDER (being replaced): registration of "fastkern" with transformers' attention/mask interfaces."""


def register_fastkern_attention() -> None:
    """Idempotent: registers "fastkern" in AttentionInterface and AttentionMaskInterface."""

"""Models built from tinymoe.nn."""
from .transformer import MoETransformer, TransformerConfig

__all__ = ["MoETransformer", "TransformerConfig"]

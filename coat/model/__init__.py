"""The CoAT model: thinking slots, projection heads, losses."""

from coat.model.coat_model import CoATModel, CoATOutput

__all__ = ["CoATModel", "CoATOutput"]

"""NAO controller: encoder, performance predictor, decoder and arch generation (SPEC section 5)."""

from .controller import NAOController
from .decoder import Decoder
from .encoder import Encoder, arch_embedding
from .predictor import Predictor

__all__ = ["Decoder", "Encoder", "NAOController", "Predictor", "arch_embedding"]

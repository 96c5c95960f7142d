"""The T5 / UL2 encoder-decoder network (imports only jax, flax, numpy)."""
from ul2lab.models.config import PRESETS, T5Config, preset

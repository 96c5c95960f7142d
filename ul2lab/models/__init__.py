"""The T5 / UL2 encoder-decoder network (imports only jax, flax, numpy)."""
from ul2lab.models.config import PRESETS, T5Config, preset
from ul2lab.models.decoding import greedy_decode, init_cache
from ul2lab.models.loss import compute_weighted_accuracy, compute_weighted_cross_entropy, loss_fn
from ul2lab.models.network import Transformer, abstract_params, init_params

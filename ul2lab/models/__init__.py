"""The T5 / UL2 encoder-decoder: config and presets, layers, network, loss, decoding.

This floor imports only jax, flax and numpy (and the standard library): no seqio, TensorFlow,
gin or torch, so it can be used, compiled and tested alone. Import the module you need
(`from ul2lab.models import network`); importing the package itself loads nothing.
"""

"""Training: run config and its checks (config.py), state and its layout (state.py), the jitted step
(step.py), the loop (loop.py), schedules, optimizers, checkpoints, partitioning, multi-host
(distributed.py), XLA flags, FLOPs/MFU, memory analysis and run logging.

Imports jax, flax, optax, orbax and ul2lab.models, never seqio, TensorFlow, gin or torch: the loop
takes its batches as a function, which ul2lab.data.pipeline builds from seqio tasks.
"""

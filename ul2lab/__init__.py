"""ul2lab: UL2 / T5 seq2seq pretraining on JAX + Flax.

Data flows one way:
  source -> seqio Task (tokenize -> objective: ul2lab.data.objectives)
  -> Mixture -> feature converter (packing) -> host batch
  -> sharded global array (ul2lab.train.partitioning) -> jitted train step (ul2lab.train)
  -> metrics / orbax checkpoint (ul2lab.train.checkpoints) -> export (ul2lab.interop.hf).

Importing this package imports nothing heavy; import the submodule you need.
"""

__version__ = "0.1.0"

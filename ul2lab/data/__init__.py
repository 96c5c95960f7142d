"""Data: pretraining objectives (objectives/, table_objectives.py), tables and their linearization,
text sources, SentencePiece vocabularies, metrics, and the pipeline that turns a seqio task or
mixture into host batches (pipeline.py). Imports seqio, TensorFlow and gin; below it, only
ul2lab.models (special ids) and ul2lab.train (nothing of the CLI).
"""

"""A small deterministic seqio task for the data-pipeline tests (positions, caching, per-host shards).

`copy_task`: 96 examples whose inputs are distinct token lists (the first token is the example's
number + 10, so every example can be told apart), targets = the inputs' first half reversed. The
source is tensors (checkpointable); a CacheDatasetPlaceholder follows a deterministic preprocessor
(seqio's append_eos is after it), so the task can be cached with `ul2lab cache`.
"""
import numpy as np
import seqio
import tensorflow as tf

COPY_TASK = "pod_data_copy_task"
VOCAB_SIZE = 512
NUM_EXAMPLES = 96


def _copy_examples(split, shuffle_files=False, seed=None):
    rng = np.random.default_rng(0)
    lengths = rng.integers(6, 20, NUM_EXAMPLES).astype(np.int32)
    padded = rng.integers(3, VOCAB_SIZE, (NUM_EXAMPLES, 20)).astype(np.int32)
    padded[:, 0] = np.arange(NUM_EXAMPLES) + 10
    return tf.data.Dataset.from_tensor_slices((padded, lengths)).map(
        lambda x, n: {"inputs": x[:n], "targets": tf.reverse(x[:n // 2], [0])})


def _add_one(dataset):
    """A deterministic step before the cache point (so the cache holds preprocessed examples)."""
    return dataset.map(lambda ex: {"inputs": ex["inputs"] + 1, "targets": ex["targets"] + 1})


def register_copy_task(name: str = COPY_TASK, vocab_size: int = VOCAB_SIZE, extra_step=None):
    """(Re-)register the task; `vocab_size` or `extra_step` make another vocabulary or task version."""
    seqio.TaskRegistry.remove(name)
    vocabulary = seqio.PassThroughVocabulary(vocab_size, eos_id=1)
    steps = [_add_one] + ([extra_step] if extra_step else []) + [
        seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos]
    return seqio.TaskRegistry.add(
        name, seqio.FunctionDataSource(_copy_examples, splits=["train"]), preprocessors=steps,
        output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")})

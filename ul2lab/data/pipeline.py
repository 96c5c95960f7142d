"""From a seqio task or mixture to the host batches the trainer consumes, and its checks.

    source -> seqio Task (tokenize -> objective) -> Mixture -> EncDecFeatureConverter (packing)
    -> host batch (numpy, this host's share of the global batch)

`check_task` runs before any work (a name that is not registered, a vocabulary larger than the
model's); `seqio_batches` is deterministic for a seed, so a resumed run that skips the batches it
already drew sees exactly the batches an uninterrupted run would have.
"""
import difflib
import logging
from typing import Iterator, Mapping, Optional

import jax
import seqio
import tensorflow as tf


class _DropSeqioUncachedWarning(logging.Filter):
    """seqio warns, on every dataset it builds, that an uncached FunctionDataset shuffles poorly on
    restarts. It does not apply here: a resumed run restores or replays its data position exactly
    (same seed, same order), so the warning only buries the progress lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using an uncached FunctionDataset")


logging.getLogger("absl").addFilter(_DropSeqioUncachedWarning())


def get_mixture_or_task(name: str):
    """The registered seqio task or mixture `name`, or a ValueError naming close matches (import the
    modules that register tasks first: ul2lab.runs.task_modules)."""
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"MIXTURE_OR_TASK_NAME {name!r} is not a registered seqio task or mixture"
                         + (f"; did you mean {' or '.join(map(repr, close))}?" if close else
                            f"; registered: {', '.join(known[:20])}"))
    return seqio.get_mixture_or_task(name)


def check_task(name: str, model_vocab_size: int) -> Optional[str]:
    """The task's vocabulary must fit the model; returns the vocabulary's model file (for config.json)."""
    vocabulary = get_mixture_or_task(name).output_features["targets"].vocabulary
    if vocabulary.vocab_size > model_vocab_size:
        raise ValueError(f"the vocabulary of {name!r} has {vocabulary.vocab_size} ids but the model's vocab_size "
                         f"is {model_vocab_size}; set T5Config vocab_size >= {vocabulary.vocab_size}")
    return getattr(vocabulary, "sentencepiece_model_file", None)


def seqio_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  skip: int = 0, *, seed: int = 0, pack: bool = True, split: str = "train") -> Iterator[dict]:
    """Deterministic host batches (this host's share of `batch_size` global rows), the first `skip`
    left out; every host reads its own shard of the data."""
    dataset = seqio.get_dataset(
        mixture_or_task_name, dict(task_feature_lengths),
        feature_converter=seqio.EncDecFeatureConverter(pack=pack),
        dataset_split=split, shuffle=True, num_epochs=None, seed=seed, use_cached=False,
        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()), verbose=False)
    dataset = dataset.batch(batch_size // jax.process_count(), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.with_options(options).skip(skip).prefetch(2)
    return dataset.as_numpy_iterator()


def train_batches(config):
    """batches(skip) of a TrainConfig's mixture, lengths, batch size, seed and packing."""
    def batches(skip: int) -> Iterator[dict]:
        return seqio_batches(config.mixture_or_task_name, config.task_feature_lengths, config.batch_size, skip,
                             seed=config.seed, pack=config.pack)
    return batches

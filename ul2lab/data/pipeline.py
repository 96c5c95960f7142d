"""From a seqio task or mixture to the host batches the trainer consumes, and its checks.

    source -> seqio Task (tokenize -> objective) -> Mixture -> EncDecFeatureConverter (packing)
    -> host batch (numpy, this host's share of the global batch)

`check_task` runs before any work (a name that is not registered, a vocabulary larger than the
model's); `seqio_batches` is deterministic for a seed and returns a `HostBatches`, whose position the
trainer saves per host in each checkpoint and restores on resume (ul2lab.data.host_batches), so a
resumed run sees exactly the batches an uninterrupted run would have, without replaying them.
"""
import difflib
import logging
from typing import Mapping, Optional

import jax
import seqio
import tensorflow as tf

from ul2lab.data.host_batches import HostBatches


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


def host_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *, seed: int = 0,
                 pack: bool = True, split: str = "train", shuffle: bool = True, num_epochs: Optional[int] = None,
                 use_cached: bool = False) -> tf.data.Dataset:
    """This host's examples (after the feature converter) of a task or mixture: seqio reads the shard
    `ShardInfo(jax.process_index(), jax.process_count())`, by files when the source (or the cache)
    has at least as many files as hosts, else every N-th example; the hosts' shards are disjoint."""
    dataset = seqio.get_dataset(
        mixture_or_task_name, dict(task_feature_lengths),
        feature_converter=seqio.EncDecFeatureConverter(pack=pack),
        dataset_split=split, shuffle=shuffle, num_epochs=num_epochs, seed=seed, use_cached=use_cached,
        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()), verbose=False)
    options = tf.data.Options()
    options.deterministic = True
    # the position is saved with the iterator; what is not saved is external state, and the only
    # such ops in ul2lab's pipelines are counters of skipped text (a tf.py_function that bumps a
    # Python counter): a resumed run's counters start from zero, its examples do not change
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.with_options(options)


def seqio_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  skip: int = 0, *, seed: int = 0, pack: bool = True, split: str = "train",
                  use_cached: bool = False) -> HostBatches:
    """Deterministic host batches (this host's `batch_size // jax.process_count()` rows of each global
    batch), the first `skip` left out (a replay: resumed runs restore the saved position instead);
    every host reads its own shard of the data."""
    rows = batch_size // jax.process_count()
    dataset = host_dataset(mixture_or_task_name, task_feature_lengths, seed=seed, pack=pack, split=split,
                           use_cached=use_cached)
    dataset = dataset.batch(rows, drop_remainder=True).skip(skip).prefetch(2)
    description = {"mixture_or_task_name": mixture_or_task_name, "task_feature_lengths": dict(task_feature_lengths),
                   "host_rows": rows, "seed": seed, "pack": pack, "split": split, "use_cached": use_cached,
                   "shard": [jax.process_index(), jax.process_count()]}
    return HostBatches(dataset, description)


def train_batches(config):
    """batches(skip) of a TrainConfig's mixture, lengths, batch size, seed, packing and cache use."""
    use_cached = bool(config.use_cached_tasks)

    def batches(skip: int) -> HostBatches:
        return seqio_batches(config.mixture_or_task_name, config.task_feature_lengths, config.batch_size, skip,
                             seed=config.seed, pack=config.pack, use_cached=use_cached)
    return batches

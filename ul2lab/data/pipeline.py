"""From a seqio task or mixture to the host batches the trainer consumes, and its checks.

    source -> seqio Task (tokenize -> objective) -> Mixture -> EncDecFeatureConverter (packing)
    -> host batch (numpy, this host's share of the global batch)

`check_task` runs before any work (a name that is not registered, a vocabulary larger than the
model's); `seqio_batches` is deterministic for a seed and returns a `HostBatches`, whose position the
trainer saves per host in each checkpoint and restores on resume (ul2lab.data.host_batches), so a
resumed run sees exactly the batches an uninterrupted run would have, without replaying them.
`validation_batches` are the fixed batches of t5x's training evaluation (the validation loss every
EVAL_PERIOD steps).
`check_yields_examples` reads the first source records of every task through its
preprocessors, so a task whose filters drop everything is an error naming the filter and the
setting, not a pipeline that spins forever (training repeats the source endlessly).
"""
import difflib
import functools
import logging
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import seqio
import tensorflow as tf

from ul2lab.data import table_objectives, text_sources
from ul2lab.data.host_batches import HostBatches
from ul2lab.data.objectives import mixture


class _DropSeqioNoise(logging.Filter):
    """Two seqio warnings that say nothing to a ul2lab user. On every dataset it builds, that an
    uncached FunctionDataset shuffles poorly on restarts: a resumed run here restores or replays its
    data position exactly (same seed, same order). When packing, that features outside the lengths are
    removed: when they are the table masks' statistics (table_objectives.STATISTICS_FEATURES), which
    are there for inspection; any other feature is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Using an uncached FunctionDataset"):
            return False
        if message.startswith("Features not in `features_length` will be removed during packing") and \
                record.args and set(record.args[0]) <= set(table_objectives.STATISTICS_FEATURES):
            return False
        return True


logging.getLogger("absl").addFilter(_DropSeqioNoise())


# source records a task may read without producing one example before it is declared empty
PROBE_RECORDS = 10_000

# Counters of what preprocessors drop (key -> count), and per key what it means and what to change.
# The task modules register theirs (register_drop_counter), so the error names the filter.
_DROP_COUNTERS: list = [lambda: mixture.SKIPPED_TEXT.counts, lambda: table_objectives.SKIPPED,
                        lambda: text_sources.SKIPPED_INPUT]
_DROP_REASONS: Dict[str, Tuple[str, str]] = {
    "empty_documents": ("its documents are empty (mixture_of_denoisers counted them in empty_documents)",
                        "check the files or source the task reads"),
    "short_documents": ("its documents are shorter than the denoisers need at these lengths (mixture_of_denoisers: "
                        "short_documents)", "lower TASK_FEATURE_LENGTHS, or give the task longer documents"),
    "header_over_budget": ("every table's header alone is longer than the inputs length allows (linearize_tables: "
                           "header_over_budget)", "raise TASK_FEATURE_LENGTHS['inputs'], or lower "
                           "ul2lab.LinearizeConfig.max_cell_tokens"),
    "unreadable": ("its tables cannot be decoded (linearize_tables: unreadable)", "check the table files"),
    "malformed_jsonl_lines": ("its .jsonl lines are not JSON objects", "check the .jsonl files the task reads"),
}


def register_drop_counter(counts: Callable[[], Mapping[str, int]], reasons: Mapping[str, Tuple[str, str]]):
    """Make a task module's drop counter (and what its keys mean) known to check_yields_examples."""
    _DROP_COUNTERS.append(counts)
    _DROP_REASONS.update(reasons)


def _drop_counts() -> Dict[str, int]:
    totals: Dict[str, int] = {}
    for counts in _DROP_COUNTERS:
        for key, value in dict(counts()).items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


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


def check_task(name: str, model_vocab_size: int) -> Tuple[Optional[str], int]:
    """The task's vocabulary must fit the model; returns (its SentencePiece model file or None, its
    extra ids), what config.json records so a checkpoint can tokenize on its own."""
    vocabulary = get_mixture_or_task(name).output_features["targets"].vocabulary
    if vocabulary.vocab_size > model_vocab_size:
        raise ValueError(f"the vocabulary of {name!r} has {vocabulary.vocab_size} ids but the model's vocab_size "
                         f"is {model_vocab_size}; set T5Config vocab_size >= {vocabulary.vocab_size}")
    return getattr(vocabulary, "sentencepiece_model_file", None), int(getattr(vocabulary, "extra_ids", 0) or 0)


# the probes that found an example, by task object: a process that trains one task again (an experiment's
# phases and arms, `ul2lab anneal` after its own check) does not rebuild its pipeline to probe it again; a
# task registered anew (another object under the name) is probed again
_PROBED: Dict[tuple, seqio.Task] = {}


def check_yields_examples(name: str, task_feature_lengths: Mapping[str, int], split: str = "train",
                          max_records: int = PROBE_RECORDS, seed: int = 0):
    """Every task of `name` (with a rate above 0) must turn its first `max_records` source records
    into at least one example at these lengths; else a ValueError saying which task, what its
    filters dropped and the setting to change. Reads at most max_records records per task."""
    provider = get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    lengths = dict(task_feature_lengths)
    for task in tasks:
        if isinstance(provider, seqio.Mixture) and _rate(provider, task) == 0:
            continue
        if split not in task.splits:
            raise ValueError(f"task {task.name!r} has no {split!r} split (it has {list(task.splits)})")
        probe = (task.name, tuple(sorted(lengths.items())), split, max_records, seed)
        if _PROBED.get(probe) is task:
            continue
        before = _drop_counts()
        held_elsewhere = {}
        try:
            source = task.source.get_dataset(split=split, shuffle=False, seed=seed).take(max_records)
            if _yields_an_example(task, source, lengths, seed):
                _PROBED[probe] = task
                continue
            records = _count(source)
            # training repeats the source before the objective (seqio num_epochs=None), so a corpus
            # shorter than one segment (a single table) is concatenated across epochs: probe it so
            if 0 < records < max_records and _yields_an_example(
                    task, source.repeat(min(PROBE_EPOCHS, -(-max_records // records))), lengths, seed):
                _PROBED[probe] = task
                continue
            if records == 0:  # a tiny corpus whose items all went to another split by the source's hash
                held_elsewhere = {other: _count(task.source.get_dataset(split=other, shuffle=False).take(max_records))
                                  for other in task.splits if other != split}
        except tf.errors.OpError as e:
            raise ValueError(f"the data of task {task.name!r} cannot be read: {_python_error(e)}") from None
        raise ValueError(_no_examples_message(task.name, split, lengths, records, max_records, before,
                                              {k: n for k, n in held_elsewhere.items() if n}))


PROBE_EPOCHS = 128  # a corpus smaller than the probe is read up to this many times (mixture's documents_per_block)


def _yields_an_example(task, source, lengths, seed) -> bool:
    examples = task.preprocess_postcache(task.preprocess_precache(source, seed=seed),
                                         sequence_length=lengths, seed=seed)
    return any(True for _ in examples.take(1))


def _count(dataset) -> int:
    return int(dataset.reduce(0, lambda count, _: count + 1))


def _rate(mixture_provider, task) -> float:
    try:
        return float(mixture_provider.get_rate(task))
    except (KeyError, ValueError, TypeError):
        return 1.0


def _no_examples_message(task: str, split: str, lengths: dict, records: int, max_records: int,
                         before: Dict[str, int], held_elsewhere: Optional[Dict[str, int]] = None) -> str:
    where = f"task {task!r} (split {split!r}, TASK_FEATURE_LENGTHS {lengths})"
    dropped = {k: v - before.get(k, 0) for k, v in _drop_counts().items() if v - before.get(k, 0) > 0}
    known = [k for k in sorted(dropped, key=dropped.get, reverse=True) if k in _DROP_REASONS]
    if records == 0:
        if known:
            what, fix = _DROP_REASONS[known[0]]
            return f"{where} has no data: its source yields no records because {what} ({dropped[known[0]]}); {fix}"
        if held_elsewhere:
            where_they_are = " and ".join(f"{n} in split {other!r}" for other, n in held_elsewhere.items())
            return (f"{where} has no data: every record of its source went to another split ({where_they_are}; "
                    "sources hold part of the data apart by a hash of each item, e.g. every 20th table or "
                    f"document), none to {split!r}; add data (with a few tables or documents, {split!r} can be "
                    "left empty)")
        return f"{where} has no data: its source yields no records; check the files or source the task reads"
    read = f"the first {records} source records" if records >= max_records else f"all {records} source records"
    if known:
        what, fix = _DROP_REASONS[known[0]]
        return f"{where} produced no example from {read}: {what}, {dropped[known[0]]} dropped; {fix}"
    return (f"{where} produced no example from {read}: its preprocessors filtered out every one; check "
            "TASK_FEATURE_LENGTHS and the data the task reads")


def _python_error(error: Exception) -> str:
    """The Python exception a tf.data op wraps (the last `SomeError: message` line), else its first line."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (raised[-1] if raised else lines[0] if lines else type(error).__name__)[:500]


def get_dataset(name: str, task_feature_lengths: Mapping[str, int], *, use_cached: bool = False, **kwargs):
    """seqio.get_dataset with the EncDecFeatureConverter; a task that USE_CACHED_TASKS wants from a
    cache that does not exist is a ValueError saying so."""
    try:
        return seqio.get_dataset(name, dict(task_feature_lengths),
                                 feature_converter=seqio.EncDecFeatureConverter(pack=kwargs.pop("pack", True)),
                                 use_cached=use_cached, verbose=False, **kwargs)
    except AssertionError as e:  # seqio asserts that a cached task's cache directory exists
        if use_cached and "cache" in str(e):
            raise ValueError(f"USE_CACHED_TASKS is True but {' '.join(str(e).split())}; cache the task with "
                             "seqio's cache_tasks_main (then seqio.add_global_cache_dirs), or set "
                             "USE_CACHED_TASKS = False to preprocess on the fly") from None
        raise


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
    # the position holds cursors, not the data in flight: without this the checkpoint also held every
    # parallel map's and prefetch's buffered outputs (whole denoised blocks of documents_per_block
    # documents), 63 MB for a 73 KB corpus; buffers are refilled from the cursors on restore, so the
    # batches are the same. What remains grows with seqio's shuffle buffer only (README: data positions)
    options.experimental_symbolic_checkpoint = True
    return dataset.with_options(options)


def seqio_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  skip: int = 0, *, seed: int = 0, pack: bool = True, split: str = "train",
                  shuffle: bool = True, use_cached: bool = False) -> HostBatches:
    """Deterministic host batches (this host's `batch_size // jax.process_count()` rows of each global
    batch), the first `skip` left out (a replay: resumed runs restore the saved position instead);
    every host reads its own shard of the data."""
    rows = batch_size // jax.process_count()
    dataset = host_dataset(mixture_or_task_name, task_feature_lengths, seed=seed, pack=pack, split=split,
                           shuffle=shuffle, use_cached=use_cached)
    dataset = dataset.batch(rows, drop_remainder=True).skip(skip).prefetch(2)
    description = {"mixture_or_task_name": mixture_or_task_name, "task_feature_lengths": dict(task_feature_lengths),
                   "host_rows": rows, "seed": seed, "pack": pack, "split": split, "shuffle": shuffle,
                   "use_cached": use_cached,
                   "shard": [jax.process_index(), jax.process_count()]}
    return HostBatches(dataset, description)


def train_batches(config):
    """batches(skip) of a TrainConfig's mixture, lengths, batch size, seed, packing, shuffling, cache."""
    def batches(skip: int) -> HostBatches:
        return seqio_batches(config.mixture_or_task_name, config.task_feature_lengths, config.batch_size, skip,
                             seed=config.seed, pack=config.pack, shuffle=config.shuffle_train_examples,
                             use_cached=bool(config.use_cached_tasks))
    return batches


VALIDATION_SEED = 42  # t5x's train_eval DatasetConfig.seed


def tasks_with_split(name: str, split: str) -> List[str]:
    """The tasks of a task or mixture that have `split`, then the mixture itself if any does
    (t5x's training evaluation reports each task and the mixture)."""
    mixture_or_task = get_mixture_or_task(name)
    names = [task.name for task in seqio.get_subtasks(mixture_or_task) if split in task.splits]
    if names and isinstance(mixture_or_task, seqio.Mixture):
        names.append(mixture_or_task.name)
    return names


def validation_batches(config, split: str = "validation") -> Dict[str, Callable[[], List[dict]]]:
    """{task: () -> its EVAL_STEPS host batches} of a TrainConfig's mixture, as t5x's training eval:
    the split read in order (no shuffling), repeated, this host's share of each packed batch; read on
    first use and kept, so every evaluation sees the same batches. Tasks without the split are left out."""
    lengths, per_host = dict(config.task_feature_lengths), config.batch_size // jax.process_count()

    @functools.lru_cache(maxsize=None)
    def batches(name: str) -> List[dict]:
        dataset = get_dataset(name, lengths, pack=config.pack, dataset_split=split, shuffle=False, num_epochs=1,
                              seed=VALIDATION_SEED, use_cached=config.use_cached_tasks)
        dataset = (dataset.repeat().shard(jax.process_count(), jax.process_index())
                   .batch(per_host, drop_remainder=True).take(config.eval_steps))
        out = list(dataset.as_numpy_iterator())
        if not out:
            logging.warning("the %r split of %s yielded no example: no validation loss for it", split, name)
        return out

    return {name: functools.partial(batches, name) for name in tasks_with_split(config.mixture_or_task_name, split)}

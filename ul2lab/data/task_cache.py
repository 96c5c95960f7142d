"""Cached seqio tasks: the Apache Beam job that writes them, and the checks a run makes before reading them.

`cache_tasks(name, output_dir, pipeline_args)` (`ul2lab cache`) writes seqio's own cache format, as
seqio's cache_tasks_main does, with seqio's Beam transforms (seqio.beam_utils):

    <output_dir>/<task>/train.tfrecord-00000-of-000NN   tf.Examples of the preprocessed examples
    <output_dir>/<task>/info.train.json, stats.train.json
    <output_dir>/<task>/COMPLETED                       written last; ul2lab writes its manifest in it

What is cached is the deterministic part of each task, the preprocessors before its
`seqio.CacheDatasetPlaceholder` (reading, tokenizing, table linearization); the random objective
(UL2's Mixture-of-Denoisers, span corruption, table masking) runs at train time after the cache,
as seqio splits it, with the run's seed. Training reads the cache with gin `USE_CACHED_TASKS = True`
and `SEQIO_CACHE_DIRS = ["<output_dir>"]` (seqio.add_global_cache_dirs).

The manifest names the task's version (a fingerprint of its source, the preprocessors before the
cache and its output features) and its vocabulary (a fingerprint of the SentencePiece model);
`check_cached` refuses a cache written for another version or vocabulary, naming both, and a task
with no cache, naming the command that builds it.
"""
import functools
import hashlib
import inspect
import json
import logging
import os
import re
from typing import Optional, Sequence

import seqio
import tensorflow as tf

from ul2lab.errors import UserError

COMPLETED = "COMPLETED"
MANIFEST_FORMAT = "ul2lab-task-cache-1"


class CacheError(UserError, ValueError):
    """A task cache that is missing, or written for another task version or vocabulary."""


# ------------------------------------------------------------------------------ fingerprints

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _describe(obj) -> str:
    """A stable text for a preprocessor, source or setting: names and arguments, never addresses."""
    if isinstance(obj, functools.partial):
        args = [_describe(a) for a in obj.args] + [f"{k}={_describe(v)}" for k, v in sorted(obj.keywords.items())]
        return f"{_describe(obj.func)}({', '.join(args)})"
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, seqio.Vocabulary):
        return vocabulary_version(obj)
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in sorted(obj.items())) + "}"
    return _ADDRESS.sub("", repr(obj))


def _describe_source(source) -> str:
    parts = [type(source).__name__]
    dataset_fn = getattr(source, "_dataset_fn", None)
    if dataset_fn is not None:  # FunctionDataSource
        parts.append(_describe(dataset_fn))
        parts.append(str(getattr(dataset_fn, "data_version", "")))
    for attribute in ("tfds_name", "_split_to_filepattern"):
        if getattr(source, attribute, None) is not None:
            parts.append(_describe(getattr(source, attribute)))
    parts.append(_describe(sorted(source.splits)))
    return " ".join(parts)


def vocabulary_version(vocabulary: seqio.Vocabulary) -> str:
    """e.g. "SentencePiece 3fa2c19b07de (32100 ids)": a fingerprint of the model itself."""
    model = getattr(vocabulary, "sp_model", None)
    if model is not None:
        digest = hashlib.sha256(model).hexdigest()[:12]
        return f"SentencePiece {digest} ({vocabulary.vocab_size} ids)"
    return f"{type(vocabulary).__name__} ({vocabulary.vocab_size} ids)"


def task_version(task: seqio.Task) -> str:
    """A fingerprint of what the cache holds: the source, the preprocessors before the cache point,
    and the output features (their vocabularies are checked on their own)."""
    cut = next((i for i, p in enumerate(task.preprocessors) if isinstance(p, seqio.CacheDatasetPlaceholder)),
               len(task.preprocessors))
    features = {k: (f.add_eos, f.dtype.name, f.rank, f.required) for k, f in task.output_features.items()}
    text = "\n".join([_describe_source(task.source), _describe(list(task.preprocessors[:cut])), _describe(features)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def task_vocabularies(task: seqio.Task) -> str:
    return "; ".join(sorted({vocabulary_version(f.vocabulary) for f in task.output_features.values()}))


def manifest(task: seqio.Task) -> dict:
    return {"format": MANIFEST_FORMAT, "task": task.name, "task_version": task_version(task),
            "vocabulary": task_vocabularies(task)}


def read_manifest(task_dir: str) -> Optional[dict]:
    """The manifest in a task cache's COMPLETED file, or None (a cache written by seqio's own job)."""
    try:
        with tf.io.gfile.GFile(os.path.join(task_dir, COMPLETED)) as f:
            payload = json.loads(f.read() or "null")
    except (ValueError, tf.errors.OpError):
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == MANIFEST_FORMAT else None


# ------------------------------------------------------------------------------ checks

def tasks_of(mixture_or_task_name: str) -> list:
    return list(seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name)))


def build_command(name: str, output_dir: str = "DIR") -> str:
    return f"ul2lab cache --mixture_or_task {name} --output_dir {output_dir}"


def check_cached(mixture_or_task_name: str, cache_dirs: Sequence[str] = (), log=print):
    """Before a run reads cached tasks (USE_CACHED_TASKS = True): every task of the mixture that can be
    cached must be, in one of `cache_dirs` (added to seqio's global cache dirs) or the dirs already
    added, for its current version and vocabulary. Tasks that cannot be cached are read on the fly
    (one line says which); a cache from seqio's own job has no manifest and is used unchecked."""
    seqio.add_global_cache_dirs(list(cache_dirs))
    searched = seqio.utils.get_global_cache_dirs()
    uncacheable, unchecked = [], []
    for task in tasks_of(mixture_or_task_name):
        if not task.supports_caching:
            uncacheable.append(task.name)
            continue
        task_dir = task.cache_dir
        if not task_dir:
            where = ", ".join(searched) if searched else "none: set SEQIO_CACHE_DIRS"
            raise CacheError(
                f"USE_CACHED_TASKS is True but task {task.name!r} is not cached in any seqio cache directory "
                f"(searched {where}); build it with `{build_command(mixture_or_task_name)}` and set "
                "SEQIO_CACHE_DIRS = ['DIR'], or set USE_CACHED_TASKS = False")
        saved, now = read_manifest(task_dir), manifest(task)
        if saved is None:
            unchecked.append(task_dir)
            continue
        rebuild = (f"rebuild it with `{build_command(mixture_or_task_name, os.path.dirname(task_dir))} "
                   "--overwrite` or point SEQIO_CACHE_DIRS at a cache of this version")
        if saved.get("vocabulary") != now["vocabulary"]:
            raise CacheError(f"the cache {task_dir} of task {task.name!r} was tokenized with vocabulary "
                             f"{saved.get('vocabulary')} but the task now uses vocabulary {now['vocabulary']}; "
                             + rebuild)
        if saved.get("task_version") != now["task_version"]:
            raise CacheError(f"the cache {task_dir} of task {task.name!r} was written by task version "
                             f"{saved.get('task_version')} but the task is now version {now['task_version']} "
                             "(its source, preprocessors before the cache, or features changed); " + rebuild)
    if uncacheable:
        log(f"note: {len(uncacheable)} task(s) have no seqio.CacheDatasetPlaceholder and are read on the fly: "
            f"{', '.join(uncacheable)}", flush=True)
    if unchecked:
        log(f"note: {len(unchecked)} cache(s) were not written by `ul2lab cache` and are used without a version "
            f"or vocabulary check: {', '.join(unchecked)}", flush=True)


# ------------------------------------------------------------------------------ the Beam job

def cache_tasks(mixture_or_task_name: str, output_dir: str, pipeline_args: Sequence[str] = ("--runner=DirectRunner",),
                *, min_shards: int = 16, overwrite: bool = False,
                modules_to_import: Sequence[str] = ("ul2lab_tasks",)) -> list:
    """Cache every cacheable task of a task or mixture under output_dir with Apache Beam (the runner
    and its options in `pipeline_args`, as on a Beam command line); returns the task directories
    written. A task already cached there for the same version and vocabulary is left alone; one of
    another version needs overwrite=True. `modules_to_import` register the tasks on Beam's workers."""
    try:
        import apache_beam as beam
        from seqio import beam_utils
    except ImportError as e:
        raise CacheError(f"`ul2lab cache` needs Apache Beam ({e}); install it with pip install -e \".[beam]\"") from None

    tasks = tasks_of(mixture_or_task_name)
    cacheable = [t for t in tasks if t.supports_caching]
    if not cacheable:
        raise CacheError(f"no task of {mixture_or_task_name!r} can be cached: none has a seqio.CacheDatasetPlaceholder "
                         "among its preprocessors")
    skipped = [t.name for t in tasks if not t.supports_caching]
    if skipped:
        logging.warning("not cached (no seqio.CacheDatasetPlaceholder): %s", ", ".join(skipped))
    written = []
    options = beam.options.pipeline_options.PipelineOptions(list(pipeline_args))
    with beam.Pipeline(options=options) as pipeline:
        for task in cacheable:
            task_dir = os.path.join(output_dir, seqio.get_task_dir_from_name(task.name))
            wanted = manifest(task)
            if tf.io.gfile.exists(os.path.join(task_dir, COMPLETED)) and not overwrite:
                if read_manifest(task_dir) == wanted:
                    print(f"{task.name}: already cached in {task_dir}", flush=True)
                    continue
                raise CacheError(f"{task_dir} already holds a cache of {task.name!r} of another task version or "
                                 "vocabulary (or not written by ul2lab); pass --overwrite to replace it")
            if tf.io.gfile.exists(task_dir):
                tf.io.gfile.rmtree(task_dir)  # a cache of another version, or one never COMPLETED
            tf.io.gfile.makedirs(task_dir)
            done = []
            for split in task.splits:
                label = f"{task.name}_{split}"
                read = beam_utils.PreprocessTask(task, split, modules_to_import=list(modules_to_import))
                num_shards = max(len(read.shards), min_shards)
                # the reshuffle spreads the examples over the shards in random order, as seqio's job does
                examples = pipeline | f"{label}_read" >> read | f"{label}_shuffle" >> beam.Reshuffle()
                done.append(examples | f"{label}_write" >> beam_utils.WriteExampleTfRecord(
                    seqio.get_cached_tfrecord_prefix(task_dir, split), num_shards=num_shards))
                done.append(examples | f"{label}_info" >> beam_utils.GetInfo(num_shards)
                            | f"{label}_write_info" >> beam_utils.WriteJson(seqio.get_cached_info_path(task_dir, split)))
                done.append(examples | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                            | f"{label}_write_stats" >> beam_utils.WriteJson(
                                seqio.get_cached_stats_path(task_dir, split)))
            # COMPLETED, holding the manifest, is written once every split's files are
            _ = (done | f"{task.name}_all" >> beam.Flatten() | f"{task.name}_none" >> beam.Filter(lambda _: False)
                 | f"{task.name}_completed" >> beam.io.textio.WriteToText(
                     os.path.join(task_dir, COMPLETED), num_shards=1, shard_name_template="",
                     append_trailing_newlines=False, header=json.dumps(wanted)))
            written.append(task_dir)
    return written

"""`ul2lab cache` (seqio's cache format written by Apache Beam's DirectRunner) and training from it with
USE_CACHED_TASKS: the cached examples are the uncached task's, the random objective still runs at
train time with the same statistics, and bad caches are refused naming both sides.

Needs the `beam` extra (pip install -e ".[beam]", see setup.py); skipped without Apache Beam."""
import collections
import json
import os

import numpy as np
import pytest
import seqio

pytest.importorskip("apache_beam")

from small_tasks import COPY_TASK, register_copy_task  # noqa: E402
from ul2lab.cli import main as cli  # noqa: E402
from ul2lab.data import task_cache  # noqa: E402

TEXT_TASK = "embedded_text_ul2"


@pytest.fixture(scope="module", autouse=True)
def fresh_cache_dirs():
    """seqio's cache directories are process-wide: leave them as they were."""
    before = list(seqio.utils.get_global_cache_dirs())
    yield
    seqio.set_global_cache_dirs(before)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, ul2lab_cache_dir):
    import ul2lab_tasks  # noqa: F401  embedded_text_ul2

    register_copy_task()
    root = str(tmp_path_factory.mktemp("seqio_cache"))
    for name in (COPY_TASK, TEXT_TASK):
        assert cli.main(["cache", "--mixture_or_task", name, "--output_dir", root, "--min_shards", "4",
                         "--", "--runner=DirectRunner"]) == 0
    seqio.add_global_cache_dirs([root])
    return root


def as_key(example):
    return tuple(tuple(np.asarray(v).tolist()) for _, v in sorted(example.items()))


def test_the_cache_is_seqio_format_and_holds_the_uncached_examples(cache_root):
    task_dir = os.path.join(cache_root, seqio.get_task_dir_from_name(COPY_TASK))
    files = sorted(os.listdir(task_dir))
    assert [f for f in files if f.startswith("train.tfrecord")] == [f"train.tfrecord-0000{i}-of-00004" for i in range(4)]
    assert {"info.train.json", "stats.train.json", "COMPLETED"} <= set(files)
    manifest = task_cache.read_manifest(task_dir)
    assert manifest["task"] == COPY_TASK and manifest["vocabulary"] == "PassThroughVocabulary (512 ids)"
    task = seqio.get_mixture_or_task(COPY_TASK)
    assert task.cache_dir == task_dir
    cached = [as_key(e) for e in task.get_dataset(None, use_cached=True, shuffle=False).as_numpy_iterator()]
    uncached = [as_key(e) for e in task.get_dataset(None, use_cached=False, shuffle=False).as_numpy_iterator()]
    assert len(uncached) == 96 and sorted(cached) == sorted(uncached)


def test_cached_text_has_the_same_tokens_and_objective_statistics(cache_root):
    task = seqio.get_mixture_or_task(TEXT_TASK)
    assert task.cache_dir
    # what is cached: the tokenized documents, every one of them
    uncached = task.preprocess_precache(task.source.get_dataset("train", shuffle=False))
    documents = sorted(tuple(e["targets"].tolist()) for e in uncached.as_numpy_iterator())
    assert len(documents) > 2000
    # the cache holds the tokenized documents; the objective runs after it, so read them back up to there
    cached_documents = sorted(tuple(e["targets"].tolist()) for e in
                              task._get_cached_source("train").get_dataset("train", shuffle=False).as_numpy_iterator())
    assert cached_documents == documents

    # what runs at train time on either: the Mixture-of-Denoisers, same seed; documents arrive in
    # another order from the cache, so the examples differ, and their statistics agree
    lengths = {"inputs": 128, "targets": 128}

    def statistics(use_cached):
        dataset = task.get_dataset(lengths, use_cached=use_cached, shuffle=False, seed=7, num_epochs=1)
        modes, tokens, n = collections.Counter(), 0, 0
        for e in dataset.as_numpy_iterator():
            modes[int(e["inputs"][0])] += 1
            tokens += len(e["inputs"]) + len(e["targets"])
            n += 1
        return n, tokens, {k: v / n for k, v in modes.most_common(3)}

    (n_cached, tokens_cached, modes_cached), (n, tokens, modes) = statistics(True), statistics(False)
    assert n > 500 and abs(n_cached - n) / n < 0.03 and abs(tokens_cached - tokens) / tokens < 0.03
    assert modes_cached.keys() == modes.keys()  # the three mode tokens ([NLU], [NLG], [S2S])
    for mode, share in modes.items():
        assert abs(modes_cached[mode] - share) < 0.05


def train_args(model_dir, *extra):
    return ["train", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain_ul2.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
            "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.TrainConfig.log_period=1",
            "--gin.TrainConfig.num_devices=1", "--gin.TrainConfig.checkpoint_period=4", "--gin.preset.vocab_size=4100",
            *extra]


def test_train_four_steps_from_the_cache(cache_root, tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    assert cli.main(train_args(model_dir, f"--gin.MIXTURE_OR_TASK_NAME={TEXT_TASK}", "--gin.USE_CACHED_TASKS=True",
                               f"--gin.SEQIO_CACHE_DIRS=['{cache_root}']")) == 0
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]  # training records, not evaluations
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert "host-0-of-1.bin" in os.listdir(os.path.join(model_dir, "4", "data"))  # cached reads checkpoint
    assert "not written by `ul2lab cache`" not in capsys.readouterr().out


def test_a_missing_cache_names_the_command_that_builds_it(cache_root, tmp_path, capsys):
    register_copy_task("pod_data_never_cached")
    assert cli.main(train_args(tmp_path / "run", "--gin.MIXTURE_OR_TASK_NAME=pod_data_never_cached",
                               "--gin.USE_CACHED_TASKS=True")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert ("task 'pod_data_never_cached' is not cached in any seqio cache directory" in error
            and "`ul2lab cache --mixture_or_task pod_data_never_cached --output_dir DIR`" in error)
    assert not os.path.exists(tmp_path / "run")


def test_a_cache_of_another_vocabulary_or_task_version_is_refused_naming_both(cache_root):
    try:
        register_copy_task(vocab_size=600)
        with pytest.raises(task_cache.CacheError) as vocabulary:
            task_cache.check_cached(COPY_TASK)
        assert ("tokenized with vocabulary PassThroughVocabulary (512 ids) but the task now uses vocabulary "
                "PassThroughVocabulary (600 ids)") in str(vocabulary.value)

        register_copy_task(extra_step=lambda dataset: dataset.take(50))
        with pytest.raises(task_cache.CacheError, match=r"written by task version (\w+) but the task is now "
                                                        r"version (?!\1)\w+") as version:
            task_cache.check_cached(COPY_TASK)
        assert "--overwrite" in str(version.value) and "\n" not in str(version.value)
    finally:
        register_copy_task()
    task_cache.check_cached(COPY_TASK)  # the task as cached passes

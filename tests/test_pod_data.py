"""The input pipeline on 2 hosts (2 local processes, gloo, as test_multihost.py): each host reads a
disjoint shard of a small task, cached and uncached, whose union is the whole split; each host saves
its own data position in the checkpoint, and a resumed 2-host run restores them and reproduces the
uninterrupted run's losses.

This file is also the worker: `python tests/test_pod_data.py --process_id ...` is one host.
"""
import argparse
import json
import os
import shutil

import pytest

MESH = {"data": 2, "fsdp": 1, "model": 2}
LENGTHS = {"inputs": 32, "targets": 16}
STEPS, SAVE_AT = 4, 2


def run_config(model_dir, train_steps):
    from small_tasks import COPY_TASK
    from ul2lab.models.config import preset
    from ul2lab.train import loop, schedules

    return loop.TrainConfig(
        model_dir=str(model_dir), mixture_or_task_name=COPY_TASK,
        model=preset("tiny", num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1),
        task_feature_lengths=LENGTHS, train_steps=train_steps, batch_size=8,
        learning_rate=schedules.constant_schedule(0.05), checkpoint_period=SAVE_AT, log_period=1,
        tensorboard=False, mesh_shape=MESH)


def host_example_ids(use_cached):
    """The examples this host reads in one epoch (each copy-task example's first input token is its id)."""
    from small_tasks import COPY_TASK
    from ul2lab.data import pipeline

    dataset = pipeline.host_dataset(COPY_TASK, LENGTHS, pack=False, shuffle=False, num_epochs=1,
                                    use_cached=use_cached)
    return [int(e["encoder_input_tokens"][0]) for e in dataset.as_numpy_iterator()]


def worker_main(argv=None):
    parser = argparse.ArgumentParser()
    from ul2lab.cli import train as train_cli
    from ul2lab.train import distributed

    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache_root", default="")
    parser.add_argument("--read_shards", action="store_true")
    train_cli.add_host_arguments(parser)
    args = parser.parse_args(argv)
    distributed.initialize(**train_cli.hosts_from_args(args))

    import jax
    import seqio
    from small_tasks import register_copy_task
    from ul2lab.data import pipeline
    from ul2lab.train import loop

    register_copy_task()
    report = {}
    if args.read_shards:
        report["uncached"] = host_example_ids(False)
        if args.cache_root:
            seqio.add_global_cache_dirs([args.cache_root])
            report["cached"] = host_example_ids(True)
    config = run_config(args.model_dir, STEPS)
    result = loop.train(config, pipeline.train_batches(config))
    report["losses"] = {r["step"]: r["loss"] for r in result["history"]}
    with open(f"{args.out}.{jax.process_index()}.json", "w") as f:
        json.dump(report, f)


def run_two_hosts(tmp_path, name, model_dir, *extra, timeout=600):
    from two_hosts import launch

    return launch(__file__, tmp_path / name, ["--model_dir", model_dir, *extra], tmp_path / "jax_cache", timeout)


@pytest.mark.slow
def test_two_hosts_read_disjoint_shards_and_resume_from_their_own_positions(tmp_path):
    from small_tasks import COPY_TASK, register_copy_task

    register_copy_task()
    whole = sorted(host_example_ids(False))  # this process alone: one host, the whole split
    assert len(whole) == len(set(whole)) == 96
    extra = ["--read_shards"]
    try:
        from ul2lab.data import task_cache

        cache_root = str(tmp_path / "seqio_cache")
        task_cache.cache_tasks(COPY_TASK, cache_root, min_shards=4)  # the DirectRunner
        extra.append(f"--cache_root={cache_root}")
    except task_cache.CacheError as e:  # no Apache Beam here: the cached half is left out
        if "needs Apache Beam" not in str(e):
            raise

    straight = tmp_path / "straight"
    first, _ = run_two_hosts(tmp_path, "first", straight, *extra)
    for kind in ("uncached", "cached") if len(extra) == 2 else ("uncached",):
        hosts = [set(first[i][kind]) for i in range(2)]
        assert hosts[0] and hosts[1] and not hosts[0] & hosts[1], kind  # disjoint ...
        assert sorted(hosts[0] | hosts[1]) == whole, kind               # ... and together the whole split
        assert len(first[0][kind]) + len(first[1][kind]) == 96, kind    # nothing read twice
    assert first[0]["losses"] == first[1]["losses"] and sorted(first[0]["losses"]) == ["1", "2", "3", "4"]

    # a run preempted after step 2: a copy of that checkpoint, holding each host's data position
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / str(SAVE_AT), resumed / str(SAVE_AT))
    shutil.copy2(straight / "config.json", resumed / "config.json")
    assert sorted(p for p in os.listdir(resumed / str(SAVE_AT) / "data") if p.endswith(".bin")) == [
        "host-0-of-2.bin", "host-1-of-2.bin"]
    second, outputs = run_two_hosts(tmp_path, "second", resumed)
    assert all(f"restored the data position after batch {SAVE_AT} (nothing replayed)" in text for text in outputs)
    assert second[0]["losses"] == second[1]["losses"]
    assert second[0]["losses"] == {k: v for k, v in first[0]["losses"].items() if int(k) > SAVE_AT}
    assert pytest.approx(second[0]["losses"]["3"]) == first[0]["losses"]["3"]


if __name__ == "__main__":
    worker_main()

"""The data position of a host's batches: saved as bytes, restored into a fresh pipeline in constant
time, refused (with the reason) when it belongs to another pipeline, and replaced by a replay when a
pipeline cannot be checkpointed. The end-to-end resume through `ul2lab train` is in
test_train_cli.py; across 2 processes in test_pod_data.py."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from small_tasks import COPY_TASK, register_copy_task
from ul2lab.data import pipeline
from ul2lab.data.host_batches import HostBatches
from ul2lab.train import data_position

LENGTHS = {"inputs": 32, "targets": 16}


@pytest.fixture(scope="module", autouse=True)
def copy_task():
    register_copy_task()


def batches(skip=0, seed=0):
    return pipeline.seqio_batches(COPY_TASK, LENGTHS, batch_size=4, skip=skip, seed=seed)


def draw(data, n):
    return [next(data)["encoder_input_tokens"] for _ in range(n)]


def test_restored_position_continues_where_the_saved_one_was():
    data = batches()
    draw(data, 7)  # past the end of the first epoch (96 examples packed into ~ 20 rows): repeats, shuffles
    position = data.save_position()
    expected = draw(data, 5)

    fresh = batches()
    fresh.restore_position(position)
    np.testing.assert_array_equal(draw(fresh, 5), expected)
    # and the replay (skip) that it replaces gives the same batches
    np.testing.assert_array_equal(draw(batches(skip=7), 5), expected)


def test_a_position_of_another_pipeline_is_refused_naming_what_differs():
    data = batches(seed=1)
    draw(data, 2)
    with pytest.raises(ValueError, match=r"seed: 1 then, 0 now"):
        batches(seed=0).restore_position(data.save_position())
    with pytest.raises(ValueError, match="not readable"):
        batches().restore_position(b"not a position")


def test_resume_restores_or_replays_and_says_why():
    data = batches()
    draw(data, 3)
    position = data.save_position()
    expected = draw(data, 2)
    said = []

    resumed = data_position.resume(lambda skip: batches(skip), batches(), 3, position, log=lambda m, **_: said.append(m))
    np.testing.assert_array_equal(draw(resumed, 2), expected)
    assert said == ["restored the data position after batch 3 (nothing replayed)"]

    said.clear()  # a position of another seed: replayed, exactly, with the reason in one line
    other = batches(seed=5)
    next(other)
    resumed = data_position.resume(lambda skip: batches(skip), batches(), 3, other.save_position(),
                                   log=lambda m, **_: said.append(m))
    np.testing.assert_array_equal(draw(resumed, 2), expected)
    assert len(said) == 1 and "replaying the 3 batches" in said[0] and "seed: 5 then, 0 now" in said[0]

    said.clear()  # plain generators (no position at all) are replayed
    replayed = data_position.resume(lambda skip: iter(range(skip, 100)), iter(range(100)), 3, None,
                                    log=lambda m, **_: said.append(m))
    assert next(replayed) == 3 and "no savable position" in said[0]


def test_a_generator_source_has_no_position_and_says_why():
    dataset = tf.data.Dataset.from_generator(lambda: ({"x": np.int32(i)} for i in range(10)),
                                             output_signature={"x": tf.TensorSpec([], tf.int32)})
    data = HostBatches(dataset, {"what": "generator"})
    next(data)
    assert data.save_position() is None
    assert "Python generator (tf.data.Dataset.from_generator)" in data.unsaveable
    assert data_position.position_of(data) is None


def test_the_position_is_a_fixed_size_whatever_the_step():
    """Constant-time resume needs a position that does not grow with the batches drawn."""
    data = batches()
    draw(data, 2)
    early = len(data.save_position())
    draw(data, 40)
    late = len(data.save_position())
    assert late < 2 * early
    assert seqio.get_mixture_or_task(COPY_TASK)  # still registered (other test files re-register it)


POSITION_BOUND_PER_TASK = 1 << 20  # README, "Data positions": under 1 MB for each task of the mixture


@pytest.mark.slow  # a minute on 2 shared cores: the denoising pipeline's first blocks
def test_the_position_of_a_small_text_corpus_holds_cursors_not_the_data_in_flight(tmp_path, tiny_vocabulary):
    """A 73 KB text corpus wrote a 63 MB position into every checkpoint: the iterator's checkpoint held
    every parallel map's and prefetch's buffered outputs (whole denoised blocks of documents)."""
    import ul2lab_tasks.text as text_tasks
    rng = np.random.default_rng(0)
    for i in range(10):  # 73 KB of text
        (tmp_path / f"doc{i}.txt").write_text(" ".join(f"w{n}" for n in rng.integers(0, 3000, 1300)))
    lengths = {"inputs": 512, "targets": 114}  # on main: 9.4 MB at 64/16, 11.7 MB here
    text_tasks.local_text_task("position_size_text", str(tmp_path / "*.txt"), vocabulary=tiny_vocabulary,
                               denoisers="T5")
    try:
        data = pipeline.seqio_batches("position_size_text", lengths, batch_size=8)
        draw(data, 4)
        position = data.save_position()
        assert position is not None, data.unsaveable
        assert len(position) < POSITION_BOUND_PER_TASK, len(position)
        expected = draw(data, 3)
        fresh = pipeline.seqio_batches("position_size_text", lengths, batch_size=8)
        fresh.restore_position(position)
        np.testing.assert_array_equal(draw(fresh, 3), expected)  # and still exact
    finally:
        seqio.TaskRegistry.remove("position_size_text")

"""`ul2lab eval` on a model that was trained: its predictions end (EOS) at different lengths, which is
what a trained model does and a random one does not. seqio's evaluator stacks the predictions with
np.array, so ragged token lists crashed it ("setting an array element with a sequence")."""
import json
import random

import numpy as np
import pytest

from ul2lab.cli import main as cli
from ul2lab.models.config import preset
from ul2lab.runs import train as train_run
from ul2lab.train import loop as trainer
from ul2lab.train import schedules

TASK = "ul2lab_test_copy_words"
LENGTHS = {"inputs": 16, "targets": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (through `ul2lab train`'s own path) to copy 1-6 words: its outputs vary in length."""
    import seqio
    import tensorflow as tf
    from ul2lab.data import vocab as vocab_lib
    root = tmp_path_factory.mktemp("eval_trained")
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "an", "or", "el"]
    vocab_words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    vocab_lines = [" ".join(rng.choice(vocab_words) for _ in range(rng.randint(3, 10))) for _ in range(1500)]
    vocab_path = vocab_lib.train_sentencepiece(vocab_lines, 300, str(root / "sp"))
    words = syllables  # a copy task over a few one-piece words: learned in a few hundred steps
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(2000)]
    vocabulary = seqio.SentencePieceVocabulary(vocab_path, extra_ids=100)

    def dataset_fn(split, shuffle_files=False, seed=None):
        chosen = lines[:1800] if split == "train" else lines[1800:1832]
        return tf.data.Dataset.from_tensor_slices({"inputs": chosen, "targets": chosen})

    def distinct_prediction_lengths(targets, predictions):
        return {"distinct_prediction_lengths": float(len({len(p.split()) for p in predictions})),
                "exact": float(np.mean([p == t for p, t in zip(predictions, targets)]))}

    seqio.TaskRegistry.add(
        TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")},
        metric_fns=[distinct_prediction_lengths])
    config = trainer.TrainConfig(
        model_dir=str(root / "run"), model=preset("tiny"), mixture_or_task_name=TASK,
        task_feature_lengths=LENGTHS, train_steps=300, batch_size=16,
        learning_rate=schedules.constant_schedule(0.01), checkpoint_period=300, log_period=100,
        async_checkpoints=False, tensorboard=False, num_devices=1, mesh_shape={"data": 1, "fsdp": 1, "model": 1})
    try:
        train_run.train_task(config)
        yield root
    finally:
        seqio.TaskRegistry.remove(TASK)


@pytest.mark.parametrize("decoding", [[], ["--beam_size", "3"]], ids=["greedy", "beam"])
def test_eval_of_a_trained_model_whose_predictions_differ_in_length(trained, decoding, tmp_path):
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--checkpoint_dir", str(trained / "run"), "--mixture_or_task", TASK,
                     "--feature_lengths", "inputs=16,targets=16", "--max_decode_length", "12",
                     "--batch_size", "8", "--output_file", str(out), *decoding]) == 0
    metrics = json.loads(out.read_text())[TASK]
    # the case that crashed: predictions of several lengths in one batch
    assert metrics["distinct_prediction_lengths"] >= 3
    assert metrics["exact"] > 0.25  # it learned to copy: the lengths are the targets', not noise


def test_heldout_loss_on_batches_drawn_before_equals_drawing_them(trained):
    """The experiments draw the held-out batches once and score every checkpoint on them."""
    import math

    from ul2lab.runs import evaluate
    drawn = evaluate.heldout_batches(TASK, LENGTHS, batch_size=4, num_batches=2)
    assert len(drawn) == 2
    fresh = evaluate.heldout_loss(str(trained / "run"), TASK, LENGTHS, batch_size=4, num_batches=2)
    again = evaluate.heldout_loss(str(trained / "run"), TASK, LENGTHS, batch_size=4, num_batches=2, batches=drawn)
    assert again == fresh and fresh["examples"] == 8 and math.isfinite(fresh["loss"])

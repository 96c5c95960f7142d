"""`ul2lab eval`'s work: a checkpoint's predictions and scores through seqio's Evaluator, so every
task's own metric functions (WikiTQ denotation accuracy, TabFact accuracy, BLEU, ...) score them.
"""
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np
import seqio

from ul2lab.data import pipeline
from ul2lab.errors import UserError
from ul2lab.files import atomic_write
from ul2lab.models import decoding
from ul2lab.runs import task_modules
from ul2lab.runs.infer import batch_slices, load_checkpoint, pad_rows, predict_tokens
from ul2lab.runs.settings import EVAL_METRICS_FILE, EvalConfig


def run_eval(settings: EvalConfig) -> dict:
    """Evaluate settings.checkpoint_path on its task or mixture; print the metrics and write them
    (EVAL_OUTPUT_DIR/metrics.json and/or settings.output_file). Returns {task: {metric: value}}."""
    # the task's own vocabulary decodes the predictions: the checkpoint's is not needed
    config, params, _ = load_checkpoint(settings.checkpoint_path, settings.step, need_vocabulary=False,
                                        allow_missing_checksums=settings.allow_missing_checksums)
    metrics = evaluate(config, params, settings)
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            print(f"{task}/{name}: {value}")
    text = json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n"
    paths = [settings.output_file] if settings.output_file else []
    if settings.eval_output_dir:
        paths.append(os.path.join(settings.eval_output_dir, EVAL_METRICS_FILE))
    for path in paths:
        atomic_write(path, text)
        print(f"wrote the metrics to {path}")
    return metrics


def make_evaluator(settings: EvalConfig, log_dir=None) -> seqio.Evaluator:
    """seqio's Evaluator of the settings' task or mixture (its examples read once and kept in memory);
    with log_dir, seqio's JSONLogger writes <task>-metrics.jsonl and <task>-<step>.jsonl there, as t5x's."""
    mixture_or_task, split, lengths = settings.mixture_or_task_name, settings.split, settings.task_feature_lengths
    task_modules.import_task_modules(settings.mixture_or_task_module)
    try:
        pipeline.get_mixture_or_task(mixture_or_task)
        # a split whose examples are all filtered out would give metrics of nothing: say why instead
        pipeline.check_yields_examples(mixture_or_task, lengths, split=split)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(" ".join(str(e).strip("'\"").split())) from None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    evaluator = seqio.Evaluator(
        mixture_or_task, feature_converter=seqio.EncDecFeatureConverter(pack=False), eval_split=split,
        sequence_length={"inputs": lengths["inputs"], "targets": lengths["targets"]},
        num_examples=settings.max_examples, use_memory_cache=True, async_compute_metrics=False,
        logger_cls=(seqio.JSONLogger,) if log_dir else (), log_dir=log_dir)
    if not evaluator.eval_tasks:
        raise UserError(f"{mixture_or_task!r} has no task with a {split!r} split and metric functions")
    return evaluator


def evaluate(config, params, settings: EvalConfig, evaluator=None, step=None) -> dict:
    """{task name: {metric: value}} from seqio.Evaluator with this model's predict and score fns
    (`evaluator`: one made by make_evaluator, reused across calls; `step`: for its loggers)."""
    evaluator = evaluator or make_evaluator(settings)
    rng = [jax.random.PRNGKey(settings.seed)]

    def batched(dataset):
        """(indices, features) numpy batches of a cached (index, features) eval dataset."""
        examples = list(dataset.as_numpy_iterator())
        for batch in batch_slices(len(examples), settings.batch_size):
            chunk = examples[batch]
            yield [i for i, _ in chunk], {k: _pad_array([ex[k] for _, ex in chunk], settings.batch_size)
                                         for k in ("encoder_input_tokens", "decoder_target_tokens")}

    def predict_fn(dataset):
        # every prediction as the decoder returns it: max_decode_length tokens, padding after EOS (as
        # t5x's); seqio stacks them with np.array, so they must all have one length, and its
        # vocabulary.decode stops at EOS
        out = []
        for indices, features in batched(dataset):
            rng[0], key = jax.random.split(rng[0])
            tokens, _ = predict_tokens(config, params, features["encoder_input_tokens"], settings, key)
            # whole rows, as t5x hands them to seqio: the vocabulary decodes up to EOS, and rows of one
            # length keep seqio's np.array of the predictions rectangular (stripped rows are ragged)
            out += [(i, t) for i, t in zip(indices, np.asarray(tokens, np.int32))]
        return out

    def score_fn(dataset):
        out = []
        for indices, features in batched(dataset):
            scores = decoding.score(params, config, features["encoder_input_tokens"],
                                     features["decoder_target_tokens"])
            out += [(i, float(s)) for i, s in zip(indices, np.asarray(scores))]
        return out

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                        score_fn=score_fn)
    return {task: {k: _plain(v) for k, v in values.items()} for task, values in all_metrics.result().items()}


_jitted_score = jax.jit(decoding.score, static_argnums=1)  # one compilation per config and batch shape


def heldout_batches(mixture_or_task_name: str, task_feature_lengths, *, batch_size: int = 16, num_batches: int = 4,
                    split: str = "validation", seed: int = 0) -> list:
    """The first `num_batches` unpacked host batches of a task's `split` drawn with `seed`: what
    heldout_loss scores (drawn once, they score any number of checkpoints on the same examples)."""
    task_modules.import_task_modules()
    try:
        pipeline.get_mixture_or_task(mixture_or_task_name)
        batches = pipeline.seqio_batches(mixture_or_task_name, task_feature_lengths, batch_size,
                                         seed=seed, pack=False, split=split)
    except ValueError as e:
        raise UserError(f"held-out loss on {mixture_or_task_name!r} ({split}): {e}") from None
    return [batch for _, batch in zip(range(num_batches), batches)]


def heldout_loss(checkpoint_path: str, mixture_or_task_name: str, task_feature_lengths, *, batch_size: int = 16,
                 num_batches: int = 4, split: str = "validation", seed: int = 0, step=None,
                 batches: Optional[Sequence[dict]] = None) -> dict:
    """A checkpoint's held-out loss on a task's `split`: the mean cross entropy per real target token
    (EOS included, no z-loss; the trainer's NUM_REAL_TARGET_TOKENS loss without its z-loss term) over
    the first `num_batches` unpacked batches of the split, drawn with `seed`, so every checkpoint
    given the same arguments is scored on the same examples (`batches`: those of heldout_batches with
    these arguments, drawn before). Returns {"loss", "tokens", "examples"}."""
    config, params, _ = load_checkpoint(checkpoint_path, step)
    if batches is None:
        batches = heldout_batches(mixture_or_task_name, task_feature_lengths, batch_size=batch_size,
                                  num_batches=num_batches, split=split, seed=seed)
    total, tokens, examples = 0.0, 0, 0
    for batch in batches:
        targets = batch["decoder_target_tokens"]
        total -= float(np.sum(np.asarray(_jitted_score(params, config, batch["encoder_input_tokens"], targets))))
        tokens += int(np.sum(targets > 0))
        examples += int(np.sum(np.any(targets > 0, axis=-1)))
    if not tokens:
        raise UserError(f"{mixture_or_task_name!r} has no {split!r} examples to compute a held-out loss on")
    return {"loss": total / tokens, "tokens": tokens, "examples": examples}


def _pad_array(rows, batch_size: int) -> np.ndarray:
    length = max(len(r) for r in rows)
    return pad_rows([list(r[:length]) for r in rows], length, batch_size)


def _plain(value):
    """seqio metric values (floats, numpy, seqio.metrics.Scalar) as JSON-friendly numbers."""
    value = getattr(value, "value", value)
    return value.item() if hasattr(value, "item") else value

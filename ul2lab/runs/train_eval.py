"""Evaluation during `ul2lab train`, as t5x's train.py: built here, on the runs floor, and handed
to the loop (ul2lab.train.evaluation.EvalSources), which never imports seqio.

  EVAL_PERIOD, EVAL_STEPS      validation loss on EVAL_STEPS batches of the validation split of each
                               task of MIXTURE_OR_TASK_NAME (ul2lab.data.pipeline.validation_batches)
  EVAL_MIXTURE_OR_TASK_NAME    that mixture's metrics on the model's predictions and scores: seqio's
                               Evaluator with the model's predict and score fns (ul2lab.runs.evaluate),
                               greedy, BATCH_SIZE examples a batch, inputs and predictions up to
                               TASK_FEATURE_LENGTHS, EVALUATOR_NUM_EXAMPLES per task (None: all);
                               seqio's JSONLogger writes MODEL_DIR/inference_eval/<task>-metrics.jsonl
                               and <task>-<step>.jsonl (the predictions), as in t5x
"""
import numbers
import os
from typing import Optional

import jax
import seqio

from ul2lab.data import pipeline
from ul2lab.errors import UserError
from ul2lab.runs import evaluate
from ul2lab.runs.settings import EvalConfig
from ul2lab.train.config import ConfigError, TrainConfig
from ul2lab.train.evaluation import INFERENCE_EVAL, EvalSources

SPLIT = "validation"  # t5x's train_eval and infer_eval split


def check(config: TrainConfig):
    """EVAL_MIXTURE_OR_TASK_NAME: registered, with a validation split and metric functions, its
    vocabulary fitting the model (a ConfigError before any work)."""
    name = config.eval_mixture_or_task_name
    if not name or not config.eval_period:
        return
    try:
        pipeline.check_task(name, config.model.vocab_size)
        mixture_or_task = pipeline.get_mixture_or_task(name)
    except ValueError as e:
        raise ConfigError(f"EVAL_MIXTURE_OR_TASK_NAME: {e}") from None
    if not any(SPLIT in task.splits and task.metric_fns for task in seqio.get_subtasks(mixture_or_task)):
        raise ConfigError(f"EVAL_MIXTURE_OR_TASK_NAME {name!r} has no task with a {SPLIT!r} split and metric "
                          "functions; name a task that has both, or set EVAL_MIXTURE_OR_TASK_NAME = None")
    if jax.process_count() > 1:
        raise ConfigError("EVAL_MIXTURE_OR_TASK_NAME during a multi-host run is not supported yet; set it to None "
                          "and run `ul2lab eval` on the checkpoints (the validation loss, EVAL_STEPS, still runs)")


def sources(config: TrainConfig) -> Optional[EvalSources]:
    """What the loop evaluates every EVAL_PERIOD steps (None when EVAL_PERIOD is None or 0)."""
    if not config.eval_period:
        return None
    validation = pipeline.validation_batches(config, SPLIT) if config.eval_steps else {}
    if not validation and jax.process_index() == 0:
        print(f"note: no validation loss during training: {config.mixture_or_task_name!r} has no task with a "
              f"{SPLIT!r} split", flush=True)
    inference = inference_fn(config) if config.eval_mixture_or_task_name else None
    return EvalSources(validation, inference, config.eval_mixture_or_task_name or "")


def inference_fn(config: TrainConfig):
    """(step, params) -> {task: {metric: number}} of EVAL_MIXTURE_OR_TASK_NAME; its examples are read
    at the first evaluation and kept."""
    lengths = dict(config.task_feature_lengths)
    settings = EvalConfig(checkpoint_path=config.model_dir, mixture_or_task_name=config.eval_mixture_or_task_name,
                          task_feature_lengths=lengths, split=SPLIT, batch_size=config.batch_size,
                          max_decode_length=lengths["targets"], max_examples=config.evaluator_num_examples,
                          mixture_or_task_module=config.mixture_or_task_module)
    log_dir = os.path.join(config.model_dir, INFERENCE_EVAL) if jax.process_index() == 0 else None
    made = {}

    def run(step: int, params) -> dict:
        if "evaluator" not in made:
            try:
                made["evaluator"] = evaluate.make_evaluator(settings, log_dir)
            except UserError as e:
                raise ConfigError(f"EVAL_MIXTURE_OR_TASK_NAME: {e}") from None
        metrics = evaluate.evaluate(config.model, params, settings, evaluator=made["evaluator"], step=step)
        # numbers only: text or image metrics go to seqio's loggers, not to scalars
        return {task: {name: value for name, value in values.items()
                       if isinstance(value, numbers.Number) and not isinstance(value, bool)}
                for task, values in metrics.items()}

    return run

"""Evaluation during training, as t5x's train.py does it: every EVAL_PERIOD steps and at the last step,

  training_eval/<task>   validation loss, cross entropy and token accuracy (teacher forcing, no
                         dropout) over EVAL_STEPS batches of each task of the training mixture that
                         has a validation split, and of the mixture itself (t5x's train_eval);
  inference_eval/<task>  the metrics of EVAL_MIXTURE_OR_TASK_NAME's tasks computed on the model's
                         predictions and scores: WikiTQ, TabFact, BLEU... (t5x's infer_eval).

The train floor never imports seqio, so the runs floor hands the loop an `EvalSources`: the
validation batches (numpy host batches, like the training batches) and an `inference(step, params)`
callback. This module runs the jitted loss over those batches on the run's mesh and says when.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ul2lab.models import network
from ul2lab.train import partitioning
from ul2lab.train import step as step_lib
from ul2lab.train.config import TrainConfig

TRAINING_EVAL = "training_eval"    # t5x's TensorBoard folders in MODEL_DIR
INFERENCE_EVAL = "inference_eval"

# {kind: {task: {metric: value}}}, kind one of TRAINING_EVAL / INFERENCE_EVAL
EvalResults = Dict[str, Dict[str, Dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class EvalSources:
    """What the runs floor builds for the loop. validation: {task: () -> that task's host batches,
    the same EVAL_STEPS batches at every evaluation}. inference: (step, params) -> {task: {metric:
    value}}; inference_name names it in the progress line."""
    validation: Mapping[str, Callable[[], Sequence[dict]]] = dataclasses.field(default_factory=dict)
    inference: Optional[Callable[[int, Any], Mapping[str, Mapping[str, float]]]] = None
    inference_name: str = ""


class PeriodicEval:
    """Runs the sources every `config.eval_period` steps and at the run's last step."""

    def __init__(self, sources: EvalSources, config: TrainConfig, mesh, rules, params_shardings):
        self.sources, self.period, self.mesh, self.rules = sources, config.eval_period, mesh, rules
        eval_step = step_lib.make_eval_step(network.Transformer(config.model), z_loss=config.z_loss,
                                            label_smoothing=config.label_smoothing)
        batch_sharding = NamedSharding(mesh, partitioning.batch_partition_spec(2, rules))
        self._eval_step = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding))

    @property
    def enabled(self) -> bool:
        return bool(self.period) and bool(self.sources.validation or self.sources.inference)

    def due(self, step: int, last_step: int) -> bool:
        return self.enabled and (step % self.period == 0 or step == last_step)

    def describe(self) -> str:
        parts = []
        if self.sources.validation:
            parts.append(f"validation loss of {', '.join(self.sources.validation)}")
        if self.sources.inference:
            parts.append(f"inference metrics of {self.sources.inference_name or 'the eval mixture'}")
        return "; ".join(parts)

    def run(self, step: int, params) -> EvalResults:
        results: EvalResults = {}
        for task, batches in self.sources.validation.items():
            metrics = self.validation_metrics(params, batches())
            if metrics is not None:
                results.setdefault(TRAINING_EVAL, {})[task] = metrics
        if self.sources.inference is not None:
            inferred = self.sources.inference(step, params)
            results[INFERENCE_EVAL] = {task: {name: float(value) for name, value in values.items()}
                                       for task, values in inferred.items()}
        return results

    def validation_metrics(self, params, batches: Sequence[dict]) -> Optional[Dict[str, float]]:
        """Token-weighted means over all the batches (not a mean of per-batch means)."""
        sums = None
        for batch in batches:
            out = self._eval_step(params, partitioning.host_batch_to_global(batch, self.mesh, self.rules))
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
        if sums is None:
            return None
        sums = {k: float(v) for k, v in jax.device_get(sums).items()}
        tokens = max(sums["weights"], 1.0)
        return {"loss": sums["loss"] / tokens, "cross_ent_loss": (sums["loss"] - sums["z_loss"]) / tokens,
                "accuracy": sums["correct"] / tokens, "target_tokens": sums["weights"]}

"""What every experiment shares: its sizes (Scale), its folder, and one call into ul2lab.runs for
each training phase, anneal branch and evaluation, so an experiment is only the order of its runs.

A phase is `ul2lab train` with the project's gin files plus the experiment's bindings
(runs.train.load_train_config + train_task); an anneal branch is `ul2lab anneal` (runs.train.anneal);
an evaluation is `ul2lab eval` (runs.evaluate.run_eval) or a held-out loss (runs.evaluate.heldout_loss).
"""
import dataclasses
import functools
import json
import os
import time
from typing import Mapping, Optional, Sequence

from ul2lab.errors import UserError
from ul2lab.files import atomic_write
from ul2lab.runs import evaluate, train
from ul2lab.runs.settings import EvalConfig

# Each experiment's README and committed results are documents of the repository, not package data: they
# are found in the current folder (experiments/NAME/run.sh runs from the repository root), so an installed
# wheel writes them where it is run; --results_dir and --readme put them elsewhere.
EXPERIMENTS_DIR = "experiments"
EMBEDDED_VOCAB_MODEL_SIZE = 4224  # the embedded vocabulary's 4000 pieces + 100 sentinels, rounded up to 128


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big one run of an experiment is. `smoke` (the CI test: 2 steps per phase), `reduced`
    (what 2 busy CPU cores finish in well under an hour) and `full` (the configuration each README
    describes) differ only in these numbers."""
    name: str
    model: str = "tiny"                 # gin/models/t5_1_1_<model>.gin
    steps_per_phase: int = 2            # every pretraining phase (and each arm's continuation)
    batch_size: int = 2
    inputs_length: int = 64             # pretraining lengths (packed)
    targets_length: int = 64
    warmup_steps: int = 0               # per cosine phase, and the infinite schedule's warmup
    cooldown_steps: int = 0             # the infinite schedule's cooldown to the constant
    anneal_steps: int = 1               # each anneal branch (ends where the phase ends)
    peak_learning_rate: float = 1e-2
    constant_learning_rate: float = 5e-3
    end_learning_rate: float = 1e-4
    heldout_batches: int = 1            # held-out loss: this many unpacked batches of the validation split
    heldout_batch_size: int = 4
    finetune_steps: int = 2
    finetune_batch_size: int = 2
    finetune_inputs_length: int = 128   # question ; linearized table
    finetune_targets_length: int = 16
    eval_examples: int = 4              # WikiTQ dev / TabFact held-apart statements scored per run

    def lengths(self) -> dict:
        return {"inputs": self.inputs_length, "targets": self.targets_length}

    def finetune_lengths(self) -> dict:
        return {"inputs": self.finetune_inputs_length, "targets": self.finetune_targets_length}


SCALES = {
    "smoke": Scale("smoke"),
    "reduced": Scale("reduced", steps_per_phase=60, batch_size=8, inputs_length=128, targets_length=128,
                     warmup_steps=6, cooldown_steps=6, anneal_steps=12, heldout_batches=4, heldout_batch_size=16,
                     finetune_steps=60, finetune_batch_size=8, finetune_inputs_length=256,
                     finetune_targets_length=32, eval_examples=96),
    "full": Scale("full", steps_per_phase=300, batch_size=16, inputs_length=128, targets_length=128,
                  warmup_steps=30, cooldown_steps=30, anneal_steps=60, heldout_batches=8, heldout_batch_size=32,
                  finetune_steps=300, finetune_batch_size=16, finetune_inputs_length=256,
                  finetune_targets_length=32, eval_examples=400),
}


def scale(name: str, **overrides) -> Scale:
    if name not in SCALES:
        raise UserError(f"unknown --scale {name!r}; choose one of {', '.join(SCALES)}")
    return dataclasses.replace(SCALES[name], **overrides)


def parse_overrides(items) -> dict:
    """["steps_per_phase=100", ...] -> {field: value} of Scale, each value of its field's type."""
    fields = {f.name: f.type for f in dataclasses.fields(Scale) if f.name != "name"}
    out = {}
    for item in items:
        field, _, value = item.partition("=")
        if field not in fields or not value:
            raise UserError(f"--set {item!r}: give FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = {"int": int, "float": float, "str": str}[fields[field] if isinstance(fields[field], str)
                                                         else fields[field].__name__]
        try:
            out[field] = kind(value)
        except ValueError:
            raise UserError(f"--set {item!r}: {field} takes a {kind.__name__}") from None
    return out


def experiment_dir(name: str) -> str:
    """experiments/NAME under the current folder (the repository root, as run.sh runs it)."""
    return os.path.abspath(os.path.join(EXPERIMENTS_DIR, name))


def gin_file(name: str, file: str) -> str:
    return os.path.join(experiment_dir(name), file)


def pretrain_bindings(s: Scale, seed: int, model_dir: str, task: str, steps: int,
                      initial_checkpoint: Optional[str] = None) -> list:
    """The gin bindings every pretraining phase shares (pass after the run and schedule files). A phase
    from `initial_checkpoint` continues its step (as t5x), so its length is TRAIN_STEPS_RELATIVE."""
    return [f"MODEL_DIR = {model_dir!r}", f"MIXTURE_OR_TASK_NAME = {task!r}", f"TRAIN_STEPS = {steps}",
            f"TRAIN_STEPS_RELATIVE = {steps if initial_checkpoint else None}",
            f"BATCH_SIZE = {s.batch_size}", f"TASK_FEATURE_LENGTHS = {s.lengths()!r}",
            f"INITIAL_CHECKPOINT_PATH = {initial_checkpoint!r}"] + run_bindings(seed)


def run_bindings(seed: int) -> list:
    """What every run of an experiment sets: its seed, the embedded vocabulary's model size, one
    device, no TensorBoard, and no evaluation during training (the experiment measures held-out loss
    and accuracy itself, on the same batches for every arm)."""
    return [f"TrainConfig.seed = {seed}", f"preset.vocab_size = {EMBEDDED_VOCAB_MODEL_SIZE}",
            "TrainConfig.num_devices = 1", "TrainConfig.tensorboard = False", "TrainConfig.log_period = 1",
            "EVAL_PERIOD = None"]


def cosine_bindings(s: Scale, steps: int) -> list:
    return ["TrainConfig.learning_rate = @cosine_schedule()", f"PEAK_LEARNING_RATE = {s.peak_learning_rate}",
            f"END_LEARNING_RATE = {s.end_learning_rate}", f"cosine_schedule.warmup_steps = {s.warmup_steps}",
            f"cosine_schedule.total_steps = {steps}"]


def infinite_bindings(s: Scale) -> list:
    return ["TrainConfig.learning_rate = @infinite_schedule()", f"PEAK_LEARNING_RATE = {s.peak_learning_rate}",
            f"WARMUP_STEPS = {s.warmup_steps}", f"COOLDOWN_STEPS = {s.cooldown_steps}",
            f"CONSTANT_LEARNING_RATE = {s.constant_learning_rate}"]


def model_gin(s: Scale) -> str:
    return f"models/t5_1_1_{s.model}.gin"


def train_phase(gin_files: Sequence[str], bindings: Sequence[str]) -> dict:
    """One `ul2lab train` run; returns {"model_dir", "history": [{step, loss, learning_rate}], "seconds"}."""
    started = time.time()
    config = train.load_train_config(list(gin_files), list(bindings))
    result = train.train_task(config)
    if result.get("preempted"):
        raise UserError(f"the run in {config.model_dir} was stopped (SIGTERM) before its last step")
    return {"model_dir": config.model_dir, "history": curve(result["history"]), "seconds": time.time() - started}


def anneal_branch(main_dir: str, output_dir: str, step: int, anneal_steps: int, end_value: float) -> dict:
    """`ul2lab anneal` of main_dir's checkpoint at `step` into output_dir."""
    started = time.time()
    train.anneal(main_dir, output_dir, step=step, anneal_steps=anneal_steps, end_value=end_value)
    return {"model_dir": output_dir, "history": curve(read_history(output_dir)), "seconds": time.time() - started}


def read_history(model_dir: str) -> list:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(history: Sequence[Mapping]) -> list:
    """[{step, loss, learning_rate}] of the logged training steps (the loss includes the z-loss)."""
    return [{"step": int(h["step"]), "loss": float(h["loss"]), "learning_rate": float(h["learning_rate"])}
            for h in history if "loss" in h]


def heldout(model_dir: str, task: str, s: Scale, lengths: Optional[Mapping[str, int]] = None) -> float:
    """Held-out loss (mean cross entropy per target token) of model_dir on task's validation split."""
    lengths = tuple(sorted((lengths or s.lengths()).items()))
    batches = _heldout_batches(task, lengths, s.heldout_batch_size, s.heldout_batches)
    return evaluate.heldout_loss(model_dir, task, dict(lengths), batch_size=s.heldout_batch_size,
                                 num_batches=s.heldout_batches, batches=batches)["loss"]


@functools.lru_cache(maxsize=None)
def _heldout_batches(task: str, lengths: tuple, batch_size: int, num_batches: int) -> list:
    """Drawn once per experiment process: every arm, phase and seed is scored on these same batches (the
    pipeline's construction cost several seconds a checkpoint)."""
    return evaluate.heldout_batches(task, dict(lengths), batch_size=batch_size, num_batches=num_batches)


def eval_task(model_dir: str, task: str, s: Scale, output_file: str) -> dict:
    """`ul2lab eval` (greedy) of model_dir on the first eval_examples of task's validation split."""
    settings = EvalConfig(checkpoint_path=model_dir, mixture_or_task_name=task,
                          task_feature_lengths=s.finetune_lengths(), batch_size=max(1, min(16, s.eval_examples)),
                          max_decode_length=s.finetune_targets_length, max_examples=s.eval_examples,
                          output_file=output_file)
    return evaluate.run_eval(settings)[task]


def write_result(results_dir: str, experiment: str, s: Scale, seed: int, measurements: Mapping[str, float],
                 extra: Optional[Mapping] = None, seconds: float = 0.0) -> str:
    """results_dir/<scale>-seed<seed>.json: what the report reads."""
    path = os.path.join(results_dir, f"{s.name}-seed{seed}.json")
    payload = {"experiment": experiment, "scale": dataclasses.asdict(s), "seed": seed,
               "measurements": dict(measurements), "seconds": round(seconds, 1), **(extra or {})}
    atomic_write(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path

"""What `ul2lab train`, `ul2lab anneal` and `ul2lab demo` do: gin files -> TrainConfig -> the
task's batches -> the trainer, as t5x's train.py.

Composes the data floor (the seqio task's batches, ul2lab.data.pipeline) with the train floor
(ul2lab.train.loop), which never imports seqio or gin itself.
"""
import dataclasses
import logging
import os
import re
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
import seqio

from ul2lab.data import pipeline, skips, task_cache
from ul2lab.errors import UserError
from ul2lab.interop import convert
from ul2lab.models import decoding
from ul2lab.models.config import T5Config
from ul2lab.runs import gin_config, model_dir_lock, task_modules, train_eval
from ul2lab.runs.infer import load_checkpoint, strip_eos
from ul2lab.train import checkpoints, distributed, loop, schedules, xla_flags
from ul2lab.train import config as train_config
from ul2lab.train.config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig

DEMO_GIN = "runs/demo_continual_tables_cpu.gin"


def start_hosts(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None):
    """XLA flags and jax.distributed first: both must come before anything starts JAX's devices."""
    try:
        xla_flags.apply()
    except RuntimeError as e:  # JAX already started in this process (a notebook): the flags only tune speed
        print(f"note: recommended XLA flags not applied: {e}", file=sys.stderr, flush=True)
    try:
        distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_train_config(gin_files: Sequence[str], bindings: Sequence[str], search_paths: str = "",
                      mixture_or_task_modules: task_modules.Modules = None):
    """Parse gin files + bindings and build the TrainConfig (a UserError for any mistake).
    mixture_or_task_modules (--mixture_or_task_module) are imported first, so gin may configure what
    they register (`MIXTURE_OR_TASK_NAME = @ul2lab.local_text_task()`; a Task or Mixture stands for its
    name), and join the config's MIXTURE_OR_TASK_MODULE."""
    task_modules.import_task_modules(mixture_or_task_modules)
    try:
        config = gin_config.load_config(
            "TrainConfig", gin_files, bindings, search_paths, start_from="gin/runs/pretrain_ul2.gin",
            missing_hint="include a run file (gin/runs/*.gin) and a model file (gin/models/*.gin), or bind "
                         "them with --gin.")
    except (FileNotFoundError, KeyError) as e:  # a task configurable the gin files call, e.g. files missing
        lines = str(e).strip("'\"").splitlines()
        raise UserError(f"gin: {lines[0] if lines else type(e).__name__}") from None
    config = dataclasses.replace(config, mixture_or_task_name=task_modules.task_name(config.mixture_or_task_name))
    if not isinstance(config.model, T5Config):
        raise UserError("TrainConfig.model is not a model config: include a model gin file, e.g. "
                        "--gin_file=gin/models/t5_1_1_small.gin")
    if mixture_or_task_modules:
        config = dataclasses.replace(config, mixture_or_task_module=task_modules.module_names(
            config.mixture_or_task_module, mixture_or_task_modules))
    return config


def set_tfds_data_dir(tfds_data_dir: Optional[str]):
    """Where seqio's TFDS sources read prepared datasets (t5x's --tfds_data_dir); None: TFDS_DATA_DIR."""
    if tfds_data_dir:
        seqio.set_tfds_data_dir_override(tfds_data_dir)


def train_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: str = "",
                   hosts: Optional[Mapping] = None, mixture_or_task_modules: task_modules.Modules = None,
                   tfds_data_dir: Optional[str] = None, log_to_stderr: bool = False) -> int:
    """`ul2lab train`: join the other hosts, parse the gin files, train or resume. Returns the exit code.
    tfds_data_dir and log_to_stderr are t5x's --tfds_data_dir and --alsologtostderr."""
    start_hosts(**(hosts or {}))
    t5x_flags(tfds_data_dir, log_to_stderr)
    return exit_code(train_task(load_train_config(gin_files, bindings, search_paths, mixture_or_task_modules)))


def t5x_flags(tfds_data_dir: Optional[str] = None, log_to_stderr: bool = False):
    """t5x's --tfds_data_dir (where TFDS-backed tasks read their data) and --alsologtostderr (the
    INFO logs of seqio, TFDS and ul2lab on stderr)."""
    set_tfds_data_dir(tfds_data_dir)
    if log_to_stderr:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.INFO)
        absl_logging.set_stderrthreshold(absl_logging.INFO)
        logging.getLogger().setLevel(logging.INFO)


def check(config: TrainConfig) -> Tuple[Optional[str], int]:
    """Every check of a run before any work (settings, mesh, MODEL_DIR, the task, its vocabulary, and
    that it yields examples at these lengths); returns (the vocabulary's model file, its extra ids).
    A ConfigError names the problem."""
    train_config.check(config)
    task_modules.import_task_modules(config.mixture_or_task_module)
    try:
        vocabulary = pipeline.check_task(config.mixture_or_task_name, config.model.vocab_size)
        if config.use_cached_tasks:  # USE_CACHED_TASKS: every cache there, of this version and vocabulary
            task_cache.check_cached(config.mixture_or_task_name, config.seqio_cache_dirs)
        else:
            print(f"checking that {config.mixture_or_task_name} yields examples at TASK_FEATURE_LENGTHS "
                  f"{dict(config.task_feature_lengths)} (reads the first records of each task)", flush=True)
            pipeline.check_yields_examples(config.mixture_or_task_name, config.task_feature_lengths,
                                           seed=config.seed or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(" ".join(str(e).strip("'\"").split())) from None
    train_eval.check(config)
    return vocabulary


_INFINITE_SCHEDULE = re.compile(r"^TrainConfig\.learning_rate = @(?:[\w.]*\.)?infinite_schedule\(\)", re.M)
_START_STEP = re.compile(r"^(?:[\w.]*\.)?infinite_schedule\.start_step = (-?\d+)\s*$", re.M)


def _run_gin(directory: Optional[str]) -> str:
    """The config.gin a `ul2lab train` run wrote into `directory` ("" when there is none)."""
    path = os.path.join(directory, "config.gin") if directory else ""
    if not path or not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f.read()


def resolve_schedule(config: TrainConfig):
    """(config, note): an infinite schedule whose start_step is unset gets one, and the note (gin
    lines for MODEL_DIR/config.gin) records it, so a resume or an anneal branch sees the same
    schedule. The step continues from INITIAL_CHECKPOINT_PATH's step S (as in t5x). The choice: what
    this run recorded before (a resume); else, when that checkpoint's run used the infinite schedule,
    its own start_step (continue, no re-warm); else -S: re-warm (warmup to the peak, cooldown to the
    constant), as continual pretraining from a checkpoint trained with another schedule (an imported
    T5/UL2/Flan model) should."""
    schedule = config.learning_rate
    if not isinstance(schedule, schedules.InfiniteSchedule) or schedule.start_step is not None:
        return config, ""
    recorded = _START_STEP.search(_run_gin(config.model_dir))
    initial = _run_gin(config.initial_checkpoint_path)
    if recorded:
        start, why = int(recorded.group(1)), "as recorded when this run started"
    elif config.initial_checkpoint_path and _INFINITE_SCHEDULE.search(initial):
        before = _START_STEP.search(initial)
        start = int(before.group(1)) if before else 0
        why = f"continuing the infinite schedule of {config.initial_checkpoint_path}: no re-warm"
    else:
        steps = checkpoints.all_steps(config.initial_checkpoint_path) if config.initial_checkpoint_path else []
        start = -max(steps) if steps else 0  # the step continues from the checkpoint's; the schedule restarts
        phases = (f"{schedule.warmup_steps} warmup steps to {schedule.peak_value:g}, "
                  f"{schedule.cooldown_steps} cooldown steps to {schedule.constant_value:g}")
        why = (f"re-warming ({config.initial_checkpoint_path} was not trained with the infinite schedule): "
               f"{phases}" if config.initial_checkpoint_path else f"from step 0: {phases}")
    print(f"learning rate: infinite schedule, {why}", flush=True)
    note = f"# infinite schedule start, chosen when the run started: {why}\ninfinite_schedule.start_step = {start}\n"
    return dataclasses.replace(config, learning_rate=dataclasses.replace(schedule, start_step=start)), note


def resolve_seed(config: TrainConfig) -> TrainConfig:
    """RANDOM_SEED = None (t5x's default): a seed from the clock, the same on every host, kept in the
    checkpoints so that a resumed run reuses it."""
    if config.seed is not None:
        return config
    seed = (checkpoints.latest_run_record(config.model_dir) or {}).get("seed")
    if seed is None:
        from jax.experimental import multihost_utils
        seed = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % (2 ** 31))))
        if jax.process_index() == 0:
            print(f"RANDOM_SEED is None: this run's seed is {seed} (kept in its checkpoints for resuming)",
                  flush=True)
    return dataclasses.replace(config, seed=seed)


def train_task(config: TrainConfig, note: str = "") -> dict:
    """Check everything, write MODEL_DIR/config.gin, train on the config's seqio task or mixture.
    Bad input never touches MODEL_DIR; a MODEL_DIR another live run is writing is refused
    (model_dir_lock). Returns the trainer's result."""
    if train_config.path_problem(config.model_dir):  # checked (and named) by check(); lock nothing there
        check(config)
    with model_dir_lock.locked(config.model_dir) as lock:  # refuses a live run's MODEL_DIR at once
        config, schedule_note = resolve_schedule(config)
        vocab_path, extra_ids = check(config)
        config = resolve_seed(config)

        def write_gin():
            lock.acquire()  # makes MODEL_DIR: another run that got this far meanwhile is refused here
            os.makedirs(config.model_dir, exist_ok=True)
            if jax.process_index() != 0:
                return  # every host runs this; one writes config.gin and prints the start line
            with open(os.path.join(config.model_dir, "config.gin"), "w") as f:
                f.write((note + "\n" if note else "") + gin.config_str()
                        + ("\n" + schedule_note if schedule_note else ""))
            print(f"training {config.mixture_or_task_name} into {config.model_dir} (steps {config.train_steps}, "
                  f"batch {config.batch_size}, lengths {dict(config.task_feature_lengths)})", flush=True)

        result = loop.train(config, pipeline.train_batches(config), vocab_path=vocab_path, extra_ids=extra_ids,
                            on_checked=write_gin, evaluation=train_eval.sources(config))
    if skips.summary() and jax.process_index() == 0:
        print(skips.summary(), "(details at debug level)", flush=True)
    return result


def exit_code(result: dict) -> int:
    """0 when the run reached TRAIN_STEPS; 128 + the signal when SIGTERM (PREEMPTED_EXIT_CODE, 143) or
    Ctrl-C (130) stopped it after saving, as a shell reports a process ended by that signal."""
    if not result.get("preempted"):
        return 0
    return 128 + result["stop_signal"] if result.get("stop_signal") else PREEMPTED_EXIT_CODE


def anneal(checkpoint_dir: str, output_dir: str, step: Optional[int] = None, anneal_steps: Optional[int] = None,
           end_value: Optional[float] = None, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
           search_paths: str = "", hosts: Optional[Mapping] = None, tfds_data_dir: Optional[str] = None) -> int:
    """`ul2lab anneal`: copy the main run's checkpoint at `step` (default: latest) into output_dir and
    train the infinite schedule's anneal there; the main run is untouched. Returns the exit code."""
    start_hosts(**(hosts or {}))
    set_tfds_data_dir(tfds_data_dir)
    train_config.check_output_dir(output_dir)  # before anything is copied there
    main, new = os.path.abspath(checkpoint_dir), os.path.abspath(output_dir)
    if not os.path.exists(os.path.join(main, "config.gin")):
        raise UserError(f"--checkpoint_dir {main} has no config.gin: give the MODEL_DIR of a `ul2lab train` run")
    if main == new or checkpoints.has_checkpoint(new):
        raise UserError(f"--output_dir {new} already holds a checkpoint (or is the main run); "
                        "give a new directory so the main run stays untouched")
    available = checkpoints.all_steps(main)
    step = (max(available) if available else None) if step is None else step
    if step not in available:
        raise UserError(f"{main} has no checkpoint at step {step}; it has steps {sorted(available)}")
    config = load_train_config([os.path.join(main, "config.gin")] + list(gin_files),
                               list(bindings) + [f"MODEL_DIR = {new!r}"], search_paths)
    config, _ = resolve_schedule(dataclasses.replace(config, model_dir=main))  # the main run's choice
    if not isinstance(config.learning_rate, schedules.InfiniteSchedule):
        raise UserError("the main run's learning rate is not ul2lab.train.schedules.infinite_schedule; "
                        "only an infinite schedule's constant phase can be branched into an anneal")
    schedule = config.learning_rate
    missing = [(flag, macro) for flag, macro, given, in_gin in (
        ("--anneal_steps", "ANNEAL_STEPS", anneal_steps, schedule.anneal_steps),
        ("--end_value", "END_LEARNING_RATE", end_value, schedule.end_value)) if given is None and in_gin is None]
    if missing:
        raise UserError(f"the anneal needs {' and '.join(f for f, _ in missing)} (the main run's gin sets no "
                        f"{' or '.join(m for _, m in missing)}); e.g. --anneal_steps {max(1, step // 10)} (the "
                        "anneal's length in steps) --end_value 0.0 (the learning rate it ends at)")
    try:
        branch = config.learning_rate.branch_anneal(step, anneal_steps, end_value)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = dataclasses.replace(config, model_dir=new, learning_rate=branch,
                                 train_steps=step + branch.anneal_steps, train_steps_relative=None)
    check(config)
    existed = os.path.exists(new)
    checkpoints.copy_step(main, new, step)
    note = (f"# anneal branch of {main} at step {step}: infinite_schedule.anneal_start={branch.anneal_start} "
            f"anneal_steps={branch.anneal_steps} end_value={branch.end_value} (set by `ul2lab anneal`)")
    try:
        return exit_code(train_task(config, note))
    except checkpoints.CorruptCheckpointError as e:
        # the copy is of a damaged step: take it away again, and name the main run's step
        if jax.process_index() == 0:
            shutil.rmtree(new) if not existed else shutil.rmtree(os.path.join(new, str(step)), ignore_errors=True)
        others = [s for s in available if s != step]
        raise UserError(f"step {step} of {main} cannot be annealed: {str(e).replace(new, main)}"
                        + (f"; branch from another step (--step, it has {others})" if others else "")) from None


def demo(model_dir: str = "ul2lab_demo", train_steps: Optional[int] = None, gin_files: Sequence[str] = (),
         bindings: Sequence[str] = (), search_paths: str = "") -> int:
    """`ul2lab demo`, the main job on CPU: continual UL2 pretraining of a tiny T5 on tables + text,
    export to Hugging Face, a few predictions from both. Returns the exit code."""
    started = time.time()
    bindings = [f"MODEL_DIR = {os.path.abspath(model_dir)!r}"] + list(bindings)
    if train_steps:
        bindings.append(f"TRAIN_STEPS = {train_steps}")
    config = load_train_config([DEMO_GIN] + list(gin_files), bindings, search_paths)
    result = train_task(config)
    if result.get("preempted"):
        return exit_code(result)
    hf_dir = os.path.join(config.model_dir, "hf")
    export_and_predict(config, hf_dir)
    print(f"demo done in {time.time() - started:.0f}s: checkpoint {config.model_dir}, Hugging Face model {hf_dir}")
    return 0


def export_and_predict(config, hf_dir: str, num_examples: int = 4):
    """`ul2lab export-hf` of the run, then greedy predictions on a few of the mixture's examples,
    from the JAX checkpoint and (when transformers is installed) from the exported model."""
    convert.export_hf(config.model_dir, hf_dir, overwrite=True)
    model_config, params, vocab = load_checkpoint(config.model_dir)
    lengths = dict(config.task_feature_lengths)
    dataset = seqio.get_dataset(config.mixture_or_task_name, lengths, seqio.EncDecFeatureConverter(pack=False),
                                dataset_split="train", shuffle=True, seed=1234, num_epochs=1, verbose=False)
    examples = list(dataset.take(num_examples).as_numpy_iterator())
    inputs = np.stack([e["encoder_input_tokens"] for e in examples])
    predicted, _ = decoding.predict(params, model_config, inputs, max_decode_length=lengths["targets"])
    predicted = np.asarray(predicted)
    hf_predicted = _hf_greedy(hf_dir, inputs, lengths["targets"])

    def text(tokens, limit=160):
        decoded = vocab.decode(strip_eos(tokens))
        return decoded if len(decoded) <= limit else decoded[:limit] + " ..."

    print(f"\ngreedy predictions of {config.model_dir} on {num_examples} examples of {config.mixture_or_task_name}:")
    for i, example in enumerate(examples):
        print(f"[{i}] input:      {text(example['encoder_input_tokens'])}")
        print(f"    target:     {text(example['decoder_target_tokens'])}")
        print(f"    prediction: {text(predicted[i])}")
    if hf_predicted is not None:
        same = sum(text(a, 10 ** 6) == text(b, 10 ** 6) for a, b in zip(predicted, hf_predicted))
        print(f"exported Hugging Face model (transformers greedy generate): {same}/{len(examples)} predictions "
              "identical to the JAX checkpoint's")


def _hf_greedy(hf_dir: str, inputs, max_new_tokens: int):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ids = torch.as_tensor(inputs, dtype=torch.long)
        out = model.generate(input_ids=ids, attention_mask=(ids > 0).long(), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1)
    return out[:, 1:].numpy()  # drop the decoder start token

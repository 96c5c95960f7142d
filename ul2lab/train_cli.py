"""`ul2lab train`, `ul2lab anneal` and `ul2lab demo`: gin-configured runs, as t5x's train script.

    ul2lab train --gin_file=gin/runs/pretrain_ul2.gin --gin_file=gin/models/t5_1_1_small.gin \\
        --gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=10000 --gin.BATCH_SIZE=128

`--gin.NAME=VALUE` adds the gin binding `NAME = VALUE`; a value that is not a Python/gin literal
(a bare path or word) is taken as a string, so `--gin.MODEL_DIR=/tmp/run` needs no quotes.
Every misspelled name fails before any work, with the closest registered names suggested.
"""
import argparse
import dataclasses
import os
import shutil
from typing import Sequence

from ul2lab import gin_cli
from ul2lab.cli import UserError

DEMO_GIN = "runs/demo_continual_tables_cpu.gin"


def _add_gin_args(p):
    gin_cli.add_gin_arguments(p, "--gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=100")
    p.epilog += (" Exit status: 0 done, 2 bad input or the run stopped itself (message says why), 143 "
                 "preempted: SIGTERM saved the current step; requeue the same command to resume.")


def add_parser(subparsers):
    for name, helptext, func in (
            ("train", "train or resume a model from gin files (as t5x's train.py)", run_train),
            ("anneal", "branch the learning-rate anneal off a constant-phase checkpoint into a new directory",
             run_anneal),
            ("demo", "the main job on CPU: continual UL2 pretraining of a tiny T5 on tables + text, "
                     "export to Hugging Face, a few predictions", run_demo)):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        _add_gin_args(p)
        p.set_defaults(func=func)
        if name in ("train", "anneal"):
            from ul2lab import distributed
            distributed.add_arguments(p)
        if name == "anneal":
            p.add_argument("--checkpoint_dir", required=True, help="MODEL_DIR of the main (constant-phase) run")
            p.add_argument("--output_dir", required=True, help="new directory for the annealed branch")
            p.add_argument("--step", type=int, default=None, help="checkpoint step to branch from (default: latest)")
            p.add_argument("--anneal_steps", type=int, default=None, help="length of the anneal (default: the gin's)")
            p.add_argument("--end_value", type=float, default=None, help="final learning rate (default: the gin's)")
        if name == "demo":
            p.add_argument("--model_dir", default="ul2lab_demo", help="where the demo run writes (default ./ul2lab_demo)")
            p.add_argument("--train_steps", type=int, default=None, help="override the demo's TRAIN_STEPS")


# ---------------------------------------------------------------------------------------------
# gin -> TrainConfig, every mistake reported before any work.

def load_train_config(gin_files: Sequence[str], bindings: Sequence[str], search_paths: str = ""):
    """Parse gin files + bindings and build the TrainConfig (a UserError for any mistake)."""
    from ul2lab import trainer

    config = gin_cli.load_config(
        "TrainConfig", gin_files, bindings, search_paths, start_from="gin/runs/pretrain_ul2.gin",
        missing_hint="include a run file (gin/runs/*.gin) and a model file (gin/models/*.gin), or bind "
                     "them with --gin.")
    if not isinstance(config.model, trainer.T5Config):
        raise UserError("TrainConfig.model is not a model config: include a model gin file, e.g. "
                        "--gin_file=gin/models/t5_1_1_small.gin")
    return config


# ---------------------------------------------------------------------------------------------
# Subcommands.

def train_with_checks(config, note: str = "") -> dict:
    """Check everything, write MODEL_DIR/config.gin, train. Bad input never touches MODEL_DIR."""
    import gin
    from ul2lab import checkpoints, trainer

    def write_gin():
        import jax

        os.makedirs(config.model_dir, exist_ok=True)
        if jax.process_index() != 0:
            return  # every host runs this; one writes config.gin and prints the start line
        with open(os.path.join(config.model_dir, "config.gin"), "w") as f:
            f.write((note + "\n" if note else "") + gin.config_str())
        print(f"training {config.mixture_or_task_name} into {config.model_dir} (steps {config.train_steps}, "
              f"batch {config.batch_size}, lengths {dict(config.task_feature_lengths)})", flush=True)

    try:
        return trainer.train(config, on_checked=write_gin)
    except (trainer.ConfigError, checkpoints.CheckpointError, trainer.TrainingStopped) as e:
        raise UserError(str(e)) from None


def exit_code(result: dict) -> int:
    """0 when the run reached TRAIN_STEPS; PREEMPTED_EXIT_CODE (143) when SIGTERM stopped it after saving."""
    from ul2lab import trainer
    return trainer.PREEMPTED_EXIT_CODE if result.get("preempted") else 0


def start_hosts(args):
    """XLA flags and jax.distributed first: both must come before anything starts JAX's devices."""
    from ul2lab import distributed, xla_flags

    try:
        xla_flags.apply()
    except RuntimeError as e:  # JAX already started in this process (a notebook): the flags only tune speed
        print(f"note: recommended XLA flags not applied: {e}", file=sys.stderr, flush=True)
    try:
        distributed.initialize_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None


def run_train(args) -> int:
    start_hosts(args)
    config = load_train_config(args.gin_file, args.gin_bindings, args.gin_search_paths)
    return exit_code(train_with_checks(config))


def run_anneal(args) -> int:
    """Copy the main run's checkpoint at `step` into output_dir and train the anneal there."""
    start_hosts(args)
    from ul2lab import checkpoints, schedules

    main, new = os.path.abspath(args.checkpoint_dir), os.path.abspath(args.output_dir)
    if not os.path.exists(os.path.join(main, "config.gin")):
        raise UserError(f"--checkpoint_dir {main} has no config.gin: give the MODEL_DIR of a `ul2lab train` run")
    if main == new or checkpoints.has_checkpoint(new):
        raise UserError(f"--output_dir {new} already holds a checkpoint (or is the main run); "
                        "give a new directory so the main run stays untouched")
    steps = checkpoints.RunCheckpoints(main, max_to_keep=None, async_save=False)
    step = steps.latest_step() if args.step is None else args.step
    available = steps.manager.all_steps()
    steps.close()
    if step not in available:
        raise UserError(f"{main} has no checkpoint at step {step}; it has steps {sorted(available)}")
    config = load_train_config([os.path.join(main, "config.gin")] + list(args.gin_file),
                               list(args.gin_bindings) + [f"MODEL_DIR = {new!r}"], args.gin_search_paths)
    if not isinstance(config.learning_rate, schedules.InfiniteSchedule):
        raise UserError("the main run's learning rate is not ul2lab.schedules.infinite_schedule; "
                        "only an infinite schedule's constant phase can be branched into an anneal")
    try:
        branch = config.learning_rate.branch_anneal(step, args.anneal_steps, args.end_value)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = dataclasses.replace(config, model_dir=new, learning_rate=branch,
                                 train_steps=step + branch.anneal_steps)
    from ul2lab import trainer
    try:
        trainer.check(config)
    except trainer.ConfigError as e:
        raise UserError(str(e)) from None
    import jax
    from jax.experimental import multihost_utils

    os.makedirs(new, exist_ok=True)
    if jax.process_index() == 0:  # one host copies; the others wait for it before restoring
        shutil.copytree(os.path.join(main, str(step)), os.path.join(new, str(step)))
        shutil.copy2(os.path.join(main, checkpoints.CONFIG_FILE), os.path.join(new, checkpoints.CONFIG_FILE))
    multihost_utils.sync_global_devices("ul2lab anneal: branch checkpoint copied")
    note = (f"# anneal branch of {main} at step {step}: infinite_schedule.anneal_start={branch.anneal_start} "
            f"anneal_steps={branch.anneal_steps} end_value={branch.end_value} (set by `ul2lab anneal`)")
    return exit_code(train_with_checks(config, note))


def run_demo(args) -> int:
    import time
    started = time.time()
    bindings = [f"MODEL_DIR = {os.path.abspath(args.model_dir)!r}"] + list(args.gin_bindings)
    if args.train_steps:
        bindings.append(f"TRAIN_STEPS = {args.train_steps}")
    config = load_train_config([DEMO_GIN] + list(args.gin_file), bindings, args.gin_search_paths)
    result = train_with_checks(config)
    if result.get("preempted"):
        return exit_code(result)
    hf_dir = os.path.join(config.model_dir, "hf")
    export_and_predict(config, hf_dir)
    print(f"demo done in {time.time() - started:.0f}s: checkpoint {config.model_dir}, Hugging Face model {hf_dir}")
    return 0


def export_and_predict(config, hf_dir: str, num_examples: int = 4):
    """`ul2lab export-hf` of the run, then greedy predictions on a few of the mixture's examples,
    from the JAX checkpoint and (when transformers is installed) from the exported model."""
    import numpy as np
    import seqio
    from ul2lab import hf_cli, infer_cli, inference

    hf_cli.export_hf(argparse.Namespace(checkpoint_dir=config.model_dir, output_dir=hf_dir, vocab_path=None,
                                        overwrite=True))
    model_config, params, vocab = infer_cli.load_checkpoint(config.model_dir)
    lengths = dict(config.task_feature_lengths)
    dataset = seqio.get_dataset(config.mixture_or_task_name, lengths, seqio.EncDecFeatureConverter(pack=False),
                                dataset_split="train", shuffle=True, seed=1234, num_epochs=1, verbose=False)
    examples = list(dataset.take(num_examples).as_numpy_iterator())
    inputs = np.stack([e["encoder_input_tokens"] for e in examples])
    predicted, _ = inference.predict(params, model_config, inputs, max_decode_length=lengths["targets"])
    predicted = np.asarray(predicted)
    hf_predicted = _hf_greedy(hf_dir, inputs, lengths["targets"])

    def text(tokens, limit=160):
        tokens = [int(t) for t in tokens if t > 0]
        if 1 in tokens:
            tokens = tokens[:tokens.index(1)]
        decoded = vocab.decode(tokens)
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

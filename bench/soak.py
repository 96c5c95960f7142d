"""Soak: a tiny model trained for many steps with frequent checkpoints while it is repeatedly
preempted (SIGTERM) or killed (SIGKILL) at random moments and restarted with the same command.

Prints one JSON object: restarts survived, steps lost (steps redone because they were past the last
checkpoint when the process died), exit codes seen, and the final loss against an uninterrupted run
of the same steps (equal when resumption is exact).

    python bench/soak.py --steps 3000 --checkpoint_period 20 --interruptions 20 --workdir /tmp/soak

Each training process is a child: `python bench/soak.py --child MODEL_DIR --steps N ...`.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

LENGTHS = {"inputs": 32, "targets": 32}


def synthetic_batch(index: int, batch_size: int = 8, length: int = 32, vocab_size: int = 512):
    """Batch i is one of 4 fixed packed batches (by i % 4): deterministic, so a resumed run that
    skips the batches it already drew sees exactly what an uninterrupted run sees."""
    import numpy as np
    rng = np.random.default_rng(1000 + index % 4)
    batch = {}
    for prefix in ("encoder", "decoder"):
        n = rng.integers(length // 2, length + 1, batch_size)
        mask = np.arange(length)[None, :] < n[:, None]
        tokens = np.where(mask, rng.integers(2, vocab_size, (batch_size, length)), 0).astype(np.int32)
        batch[f"{prefix}_segment_ids"] = mask.astype(np.int32)
        batch[f"{prefix}_positions"] = np.where(mask, np.arange(length)[None, :], 0).astype(np.int32)
        if prefix == "encoder":
            batch["encoder_input_tokens"] = tokens
        else:
            batch["decoder_target_tokens"] = tokens
            batch["decoder_input_tokens"] = np.concatenate([np.zeros((batch_size, 1), np.int32), tokens[:, :-1]], 1)
            batch["decoder_loss_weights"] = mask.astype(np.int32)
    return batch


def child(args) -> int:
    import jax
    from ul2lab.models.config import preset
    from ul2lab.runs import train as train_run
    from ul2lab.train import loop as trainer
    from ul2lab.train import schedules

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    def batches(skip):
        index = skip
        while True:
            yield synthetic_batch(index)
            index += 1

    config = trainer.TrainConfig(
        model_dir=args.child, model=preset("tiny", dropout_rate=0.1), mixture_or_task_name="synthetic",
        task_feature_lengths=LENGTHS, train_steps=args.steps, batch_size=8,
        learning_rate=schedules.constant_schedule(0.01), checkpoint_period=args.checkpoint_period,
        keep_checkpoints=2, log_period=1, tensorboard=False, num_devices=1,
        mesh_shape={"data": 1, "fsdp": 1, "model": 1})
    return train_run.exit_code(trainer.train(config, batches))


def logged(model_dir):
    """step -> loss, the latest record of a repeated step winning; {} before the first log."""
    path = os.path.join(model_dir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the line being written when the process was killed
                    continue
                by_step[record["step"]] = record["loss"]
    return by_step


def launch(model_dir, args):
    command = [sys.executable, os.path.abspath(__file__), "--child", model_dir, "--steps", str(args.steps),
               "--checkpoint_period", str(args.checkpoint_period), "--cache_dir", args.cache_dir]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint_period", type=int, default=20)
    parser.add_argument("--interruptions", type=int, default=20, help="signals sent before letting it finish")
    parser.add_argument("--kill_fraction", type=float, default=0.3, help="share of SIGKILL (the rest SIGTERM)")
    parser.add_argument("--min_run_s", type=float, default=3.0, help="shortest life of a process after its first step")
    parser.add_argument("--max_run_s", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/ul2lab_soak")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(args))

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    args.cache_dir = args.cache_dir or os.path.join(args.workdir, "jax_cache")
    rng = random.Random(args.seed)

    started = time.time()
    reference_dir = os.path.join(args.workdir, "uninterrupted")
    process = launch(reference_dir, args)
    output, _ = process.communicate()
    if process.returncode != 0:
        sys.exit(f"the uninterrupted run failed ({process.returncode}):\n{output[-3000:]}")
    reference = logged(reference_dir)
    reference_s = time.time() - started

    run_dir = os.path.join(args.workdir, "interrupted")
    started = time.time()
    restarts, steps_lost, exit_codes, signals_sent, sessions = 0, 0, {}, {"SIGTERM": 0, "SIGKILL": 0}, 0
    reached = None  # the last step the previous session logged
    while True:
        before = max(logged(run_dir), default=0)
        process = launch(run_dir, args)
        sessions += 1
        interrupt = signals_sent["SIGTERM"] + signals_sent["SIGKILL"] < args.interruptions
        if interrupt:
            # wait for this session's first step, then a random while, then the signal
            while process.poll() is None and max(logged(run_dir), default=0) <= before:
                time.sleep(0.05)
            time.sleep(rng.uniform(args.min_run_s, args.max_run_s))
            if process.poll() is None:
                kind = "SIGKILL" if rng.random() < args.kill_fraction else "SIGTERM"
                process.send_signal(getattr(signal, kind))
                signals_sent[kind] += 1
        output, _ = process.communicate()
        exit_codes[str(process.returncode)] = exit_codes.get(str(process.returncode), 0) + 1
        if reached is not None:  # what this session redid of the previous one's steps
            resumed = re.search(r"resuming \S+ at step (\d+)", output)
            steps_lost += reached - (int(resumed.group(1)) if resumed else 0)
            restarts += 1
        if process.returncode == 0:
            break
        if process.returncode not in (143, -signal.SIGKILL):
            sys.exit(f"a training process failed ({process.returncode}):\n{output[-3000:]}")
        reached = max(logged(run_dir), default=0)
    interrupted = logged(run_dir)
    interrupted_s = time.time() - started

    same = sum(interrupted.get(s) == loss for s, loss in reference.items())
    last = args.steps
    print(json.dumps({
        "steps": args.steps, "checkpoint_period": args.checkpoint_period, "sessions": sessions,
        "restarts_survived": restarts, "signals_sent": signals_sent, "exit_codes": exit_codes,
        "steps_lost": steps_lost, "steps_lost_per_sigkill": round(steps_lost / max(signals_sent["SIGKILL"], 1), 2),
        "final_loss_uninterrupted": reference[last], "final_loss_interrupted": interrupted.get(last),
        "steps_with_identical_loss": f"{same}/{len(reference)}",
        "wall_s_uninterrupted": round(reference_s, 1), "wall_s_interrupted": round(interrupted_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

"""Resume time: seconds from process start to the first resumed step after 10, 1,000 and 10,000 steps.

A tiny model (gin models/t5_1_1_tiny.gin) trains `embedded_text_ul2` (UL2's Mixture-of-Denoisers
over the embedded corpus) at batch 64 with `ul2lab train`. The run is preempted after N completed
steps; the bench times a fresh `ul2lab train` process resuming it, from its start to the progress
line of step N + 1 (imports, restore of parameters, optimizer state and data position, the
compile of the step, and one step).

The checkpoints at 1,000 and 10,000 steps are fabricated rather than trained (as the issue allows):
the parameters and optimizer state of a real 10-step run are saved again at step N with the
project's own RunCheckpoints.save, with the run record of step N and a data position. By default
that position is the real run's (after 10 batches) relabeled as step N's: a position does not grow
with the batches drawn (tests/test_data_position.py::test_the_position_is_a_fixed_size_whatever_the_step),
so restoring it costs the same. With --real_positions the bench draws the N batches of this host's
pipeline (pipeline.seqio_batches, the one `ul2lab train` builds) once and saves that position;
`replay_s` is then the time those N batches took, what the restart would cost without saved
positions (seqio's `skip(n)` over the pipeline). The restore is the real one: the resumed process
reads the step and position as any resumed run does.

Prints one JSON object; `ratio_10000_to_10` is the figure the issue bounds (<= 1.2).

    python bench/resume_time.py [--steps 10 1000 10000] [--batch_size 64] [--real_positions] [--workdir DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TASK = "embedded_text_ul2"
LENGTHS = {"inputs": 64, "targets": 64}


def train_command(model_dir: str, train_steps: int, batch_size: int, period: int) -> list:
    return [sys.executable, "-m", "ul2lab.cli.main", "train", "--gin_file=models/t5_1_1_tiny.gin",
            "--gin_file=runs/pretrain_ul2.gin", f"--gin.MODEL_DIR={model_dir}",
            f"--gin.MIXTURE_OR_TASK_NAME={TASK}", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
            f"--gin.TRAIN_STEPS={train_steps}", f"--gin.BATCH_SIZE={batch_size}",
            "--gin.TrainConfig.log_period=1", f"--gin.TrainConfig.checkpoint_period={period}",
            "--gin.TrainConfig.num_devices=1", "--gin.preset.vocab_size=4100", "--gin.TrainConfig.tensorboard=False"]


def env() -> dict:
    out = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    out["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    out.get("PYTHONPATH", "")] if p)
    return out


def seconds_to_step(command: list, step: int) -> tuple:
    """(seconds from spawning `command` to its progress line of `step`, the lines it printed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seconds = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if seconds is None and line.startswith(f"step {step}/"):
            seconds = time.perf_counter() - start
    if proc.wait() != 0 or seconds is None:
        sys.exit("the run failed:\n" + "\n".join(lines[-30:]))
    return seconds, lines


def fabricate(base_dir: str, base_step: int, model_dir: str, steps: int, batch_size: int,
              real_position: bool):
    """model_dir = base_dir's run preempted after `steps` steps (see above); returns the seconds the
    data pipeline took to reach its position after `steps` batches, when real_position, else None."""
    import orbax.checkpoint as ocp

    from ul2lab.train import checkpoints, data_position

    source = checkpoints.RunCheckpoints(base_dir, None, None, False)
    replay_s, position = None, source.restore_data_position(base_step)
    if real_position:
        from ul2lab.data import pipeline
        from ul2lab.runs import task_modules

        task_modules.import_task_modules()
        start = time.perf_counter()
        data = pipeline.seqio_batches(TASK, LENGTHS, batch_size, seed=0, pack=True)
        for _ in range(steps):
            next(data)
        replay_s = time.perf_counter() - start
        position = data.save_position()
    assert position is not None, "the base run saved no data position"

    os.makedirs(model_dir)
    for name in os.listdir(base_dir):  # config.json, config.gin, metrics: everything but the steps
        path = os.path.join(base_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, model_dir)
    restored = source.manager.restore(base_step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(), run=ocp.args.JsonRestore()))
    run = dict(restored["run"], step=steps, data_batches=steps)
    target = checkpoints.RunCheckpoints(model_dir, None, None, False)
    target.save(steps, restored["params"], restored["opt_state"], run,
                data_position=data_position.HostBytesSave(position))
    target.manager.wait_until_finished()
    return replay_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--real_positions", action="store_true",
                        help="draw the N batches for each position (slow; reports replay_s)")
    parser.add_argument("--workdir", default="", help="kept when given (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ul2lab-resume-bench-")
    base_step = min(args.steps)

    base_dir = os.path.join(workdir, f"trained-{base_step}")
    if not os.path.isdir(os.path.join(base_dir, str(base_step))):
        seconds_to_step(train_command(base_dir, base_step, args.batch_size, base_step), base_step)
    results = {}
    for steps in args.steps:
        replay_s = None
        if steps == base_step:
            model_dir = os.path.join(workdir, f"resume-{steps}")
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.copytree(base_dir, model_dir)
        else:
            model_dir = os.path.join(workdir, f"resume-{steps}")
            shutil.rmtree(model_dir, ignore_errors=True)
            replay_s = fabricate(base_dir, base_step, model_dir, steps, args.batch_size, args.real_positions)
        seconds, lines = seconds_to_step(train_command(model_dir, steps + 1, args.batch_size, 10 ** 9), steps + 1)
        restored = [line for line in lines if "data position" in line]
        results[str(steps)] = {"seconds_to_first_resumed_step": round(seconds, 2),
                               "replay_s": None if replay_s is None else round(replay_s, 2),
                               "how": restored[0] if restored else "no data position line"}
    first, last = str(min(args.steps)), str(max(args.steps))
    report = {"task": TASK, "task_feature_lengths": LENGTHS, "batch_size": args.batch_size, "model": "t5_1_1_tiny",
              "positions": "drawn" if args.real_positions else "relabeled",
              "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "steps": results,
              f"ratio_{last}_to_{first}": round(results[last]["seconds_to_first_resumed_step"]
                                                / results[first]["seconds_to_first_resumed_step"], 3)}
    print(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

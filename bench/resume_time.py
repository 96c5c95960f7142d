"""Resume time: seconds from process start to the first resumed step after 10, 1,000 and 10,000 steps,
and the restore itself apart from the process start.

A tiny model (gin models/t5_1_1_tiny.gin) trains `embedded_text_ul2` (UL2's Mixture-of-Denoisers
over the embedded corpus) at batch 64 with `ul2lab train` for 10 steps. The run is preempted after N
completed steps; the bench times a fresh `ul2lab train` process resuming it:
  seconds_to_first_resumed_step  from spawning the process to its progress line of step N + 1 (imports,
                                 gin, the task and pipeline build, the restore, the compile, one step);
  restore_s                      the restore alone, timed inside that process around the project's own
                                 calls: state.restore_or_init (parameters, optimizer state, run record)
                                 + RunCheckpoints.restore_data_position + data_position.resume (the
                                 pipeline moved to the saved position, or replayed when it cannot be);
  startup_s                      from spawning the process to the start of the restore;
  after_restore_s                from the end of the restore to the step N + 1 line (compile + one step).

The checkpoints at 1,000 and 10,000 steps are fabricated rather than trained: the parameters and
optimizer state of the real 10-step run are saved again at step N with the project's own
RunCheckpoints.save, with the run record of step N and a data position, of one of two kinds
(--positions, both by default, each reported under its name):
  drawn      the position of this host's pipeline (pipeline.seqio_batches, the one `ul2lab train`
             builds) after N batches actually drawn; `replay_s` is the time drawing them took, what the
             restart would cost without saved positions (seqio's `skip(n)` over the pipeline);
  relabeled  the real run's position (after 10 batches) saved as step N's: a position does not grow with
             the batches drawn (tests/test_data_position.py::test_the_position_is_a_fixed_size_whatever_the_step).
At N = 10 both are the trained run itself. Each entry's `how` says which position it restored and
the line the resumed run printed about it.

Prints one JSON object; `ratio_10000_to_10` (per kind, of seconds_to_first_resumed_step and of
restore_s) is the figure the issue bounds (<= 1.2).

    python bench/resume_time.py [--steps 10 1000 10000] [--batch_size 64] [--positions drawn relabeled]
                                [--workdir DIR]
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
TIMING = "resume-time-bench "  # the prefix of the line the timed resumed process prints its restore timings on
KINDS = ("drawn", "relabeled")


def train_args(model_dir: str, train_steps: int, batch_size: int, period: int) -> list:
    return ["train", "--gin_file=models/t5_1_1_tiny.gin",
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


def run_until_step(command: list, step: int) -> tuple:
    """(wall-clock time of spawning `command`, seconds from then to its progress line of `step`, its lines)."""
    spawned = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seconds = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if seconds is None and line.startswith(f"step {step}/"):
            seconds = time.perf_counter() - start
    if proc.wait() != 0 or seconds is None:
        sys.exit("the run failed:\n" + "\n".join(lines[-30:]))
    return spawned, seconds, lines


def timed_train(argv: list):
    """`ul2lab train argv` in this process, with the restore's calls timed (wall clock, so the bench can
    place them against the moment it spawned the process); prints one TIMING line of JSON."""
    import jax

    from ul2lab.cli import main as cli
    from ul2lab.train import checkpoints, data_position
    from ul2lab.train import state as state_lib

    timings = {}

    def timed(name, fn, block=False):
        def wrapper(*args, **kwargs):
            began = time.time()
            out = fn(*args, **kwargs)
            if block:  # the arrays read, not only their reads started
                jax.block_until_ready(out[0])
            timings.setdefault(f"{name}_began", began)
            timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.time() - began
            timings[f"{name}_ended"] = time.time()
            return out
        return wrapper

    state_lib.restore_or_init = timed("state_restore", state_lib.restore_or_init, block=True)
    checkpoints.RunCheckpoints.restore_data_position = timed("position_read",
                                                             checkpoints.RunCheckpoints.restore_data_position)
    data_position.resume = timed("position_restore", data_position.resume)
    code = cli.main(argv)
    print(TIMING + json.dumps(timings), flush=True)
    sys.exit(code)


def draw_positions(steps: list, batch_size: int) -> dict:
    """{N: (this host's data position after N batches actually drawn, seconds from building the pipeline
    to that batch)} for every N in steps, drawn once along one pipeline."""
    from ul2lab.data import pipeline
    from ul2lab.runs import task_modules

    task_modules.import_task_modules()
    start = time.perf_counter()
    data = pipeline.seqio_batches(TASK, LENGTHS, batch_size, seed=0, pack=True)
    out, drawn = {}, 0
    for n in sorted(steps):
        for _ in range(n - drawn):
            next(data)
        drawn = n
        out[n] = (data.save_position(), time.perf_counter() - start)
    return out


def fabricate(base_dir: str, base_step: int, model_dir: str, steps: int, position: bytes):
    """model_dir = base_dir's run preempted after `steps` steps with data position `position`."""
    import orbax.checkpoint as ocp

    from ul2lab.train import checkpoints, data_position

    source = checkpoints.RunCheckpoints(base_dir, None, None, False)
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
    # restored without a target, the optimizer state is plain dicts and lists, so the checksums this save
    # wrote name its arrays otherwise than a run's restore does; the arrays are base_step's, unchanged:
    # its checksums are theirs
    checksums = os.path.join(checkpoints.CHECKSUMS_ITEM, checkpoints.JSON_ITEM_FILE)
    shutil.copyfile(os.path.join(base_dir, str(base_step), checksums), os.path.join(model_dir, str(steps), checksums))


def measure_resume(model_dir: str, steps: int, batch_size: int) -> dict:
    """One timed resume of model_dir (preempted after `steps`) to step steps + 1."""
    command = [sys.executable, os.path.abspath(__file__), "--_timed_train", "--",
               *train_args(model_dir, steps + 1, batch_size, 10 ** 9)]
    spawned, seconds, lines = run_until_step(command, steps + 1)
    timing = json.loads(next(line[len(TIMING):] for line in lines if line.startswith(TIMING)))
    parts = ("state_restore", "position_read", "position_restore")
    began = min(timing[f"{p}_began"] for p in parts if f"{p}_began" in timing)
    ended = max(timing[f"{p}_ended"] for p in parts if f"{p}_ended" in timing)
    restore_s = sum(timing.get(f"{p}_s", 0.0) for p in parts)
    position_lines = [line for line in lines if "data position" in line]
    return {"seconds_to_first_resumed_step": round(seconds, 2),
            "restore_s": round(restore_s, 3),
            "state_restore_s": round(timing.get("state_restore_s", 0.0), 3),
            "data_position_restore_s": round(timing.get("position_read_s", 0.0)
                                             + timing.get("position_restore_s", 0.0), 3),
            "startup_s": round(began - spawned, 2),
            "after_restore_s": round(seconds - (ended - spawned), 2),
            "run_said": position_lines[0] if position_lines else "no data position line"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--_timed_train", "--"]:
        return timed_train(argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--positions", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which data positions the fabricated checkpoints hold (default: both)")
    parser.add_argument("--workdir", default="", help="kept when given (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ul2lab-resume-bench-")
    base_step = min(args.steps)

    base_dir = os.path.join(workdir, f"trained-{base_step}")
    if not os.path.isdir(os.path.join(base_dir, str(base_step))):
        run_until_step([sys.executable, "-m", "ul2lab.cli.main",
                        *train_args(base_dir, base_step, args.batch_size, base_step)], base_step)
    from ul2lab.train import checkpoints

    relabeled = checkpoints.RunCheckpoints(base_dir, None, None, False).restore_data_position(base_step)
    assert relabeled is not None, "the trained run saved no data position"
    fabricated = [n for n in args.steps if n != base_step]
    drawn = draw_positions(fabricated, args.batch_size) if "drawn" in args.positions and fabricated else {}

    # the trained run itself: its position is the one drawn by its 10 steps
    model_dir = os.path.join(workdir, f"resume-{base_step}")
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(base_dir, model_dir)
    trained = measure_resume(model_dir, base_step, args.batch_size)
    said = trained.pop("run_said")
    trained["replay_s"] = None
    trained["how"] = (f"the trained run itself: the position after its {base_step} batches drawn in training; "
                      "the resumed run said: " + said)

    results = {}
    for kind in args.positions:
        results[kind] = {str(base_step): dict(trained)}
        for steps in fabricated:
            model_dir = os.path.join(workdir, f"resume-{kind}-{steps}")
            shutil.rmtree(model_dir, ignore_errors=True)
            position, replay_s = drawn[steps] if kind == "drawn" else (relabeled, None)
            fabricate(base_dir, base_step, model_dir, steps, position)
            entry = measure_resume(model_dir, steps, args.batch_size)
            said = entry.pop("run_said")
            entry["replay_s"] = None if replay_s is None else round(replay_s, 2)
            entry["how"] = (f"a position drawn: the pipeline read {steps} batches ({entry['replay_s']} s) and saved "
                            "its position" if kind == "drawn" else
                            f"a relabeled position: the trained run's position after batch {base_step}, saved "
                            f"as step {steps}'s") + "; the resumed run said: " + said
            results[kind][str(steps)] = entry
    first, last = str(min(args.steps)), str(max(args.steps))
    report = {"task": TASK, "task_feature_lengths": LENGTHS, "batch_size": args.batch_size, "model": "t5_1_1_tiny",
              "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
              "measured": "seconds_to_first_resumed_step: process spawn to the step N+1 line; restore_s: "
                          "state.restore_or_init + restore_data_position + data_position.resume inside that "
                          "process; startup_s: spawn to the restore; after_restore_s: the restore to step N+1",
              "positions": results,
              f"ratio_{last}_to_{first}": {
                  kind: {key: round(results[kind][last][key] / results[kind][first][key], 3)
                         for key in ("seconds_to_first_resumed_step", "restore_s")}
                  for kind in results}}
    print(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

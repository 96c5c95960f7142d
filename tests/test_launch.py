"""Launchers' dry runs print exactly the command every host will run."""
import os
import shlex
import subprocess
import sys

import pytest
import yaml

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch", "launch.py")
# a MODEL_DIR with a space and quotes: the train args must survive every layer of quoting
TRAIN_ARGS = ["--gin_file=gin/runs/pretrain_ul2.gin", "--gin.MODEL_DIR='/ckpt/run 1'", "--gin.TRAIN_STEPS=100"]


def dry_run(*launch_args):
    result = subprocess.run([sys.executable, LAUNCH, "--dry_run", *launch_args, "--", *TRAIN_ARGS],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_runs_same_train_command_on_all_workers():
    out = dry_run("tpu", "--tpu_name", "pod", "--zone", "us-central2-b", "--project", "p")
    (line,) = out.splitlines()
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=p" in argv
    (command,) = [a for a in argv if a.startswith("--command=")]
    assert shlex.split(command[len("--command="):]) == ["ul2lab", "train", *TRAIN_ARGS]


def test_tpu_setup_command_runs_first():
    out = dry_run("tpu", "--tpu_name", "pod", "--zone", "z", "--setup", "pip install -e .")
    first, second = out.splitlines()
    assert "--command=pip install -e ." in shlex.split(first)
    assert "ul2lab train" in second


def test_slurm_script_one_task_per_gpu_and_requeues():
    out = dry_run("--workdir", "/src/ul2lab", "slurm", "--nodes", "2", "--gpus_per_node", "4",
                  "--partition", "gpu")
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --partition=gpu" in lines
    assert any(l.startswith("#SBATCH --signal=TERM@") for l in lines)
    # a preempted run (exit 143 after its checkpoint) is put back in the queue
    from ul2lab.train.loop import PREEMPTED_EXIT_CODE
    assert f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in lines
    assert lines.index("rc=$?") == lines.index(next(l for l in lines if l.startswith("srun "))) + 1
    (srun,) = [l for l in lines if l.startswith("srun ")]
    argv = shlex.split(srun)
    assert "--ntasks=8" in argv and "--gpus-per-task=1" in argv
    assert argv[-3:-1] == ["bash", "-c"]
    assert shlex.split(argv[-1]) == ["cd", "/src/ul2lab", "&&", "ul2lab", "train", *TRAIN_ARGS]


def test_gke_jobset_has_one_pod_per_host():
    out = dry_run("gke", "--name", "ul2", "--image", "us-docker.pkg.dev/p/ul2lab:1", "--tpu_type", "v5p",
                  "--tpu_topology", "2x2x4", "--num_hosts", "4")
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "ul2"
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4
    pod = job["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x4"
    (container,) = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/ul2lab:1"
    assert container["command"][:2] == ["bash", "-c"]
    assert shlex.split(container["command"][2]) == ["ul2lab", "train", *TRAIN_ARGS]


@pytest.mark.parametrize("args, message", [
    (["slurm", "--nodes", "0"], "--nodes must be at least 1"),
    (["tpu", "--tpu_name", "pod"], "--zone"),
])
def test_bad_launch_arguments_are_named(args, message):
    result = subprocess.run([sys.executable, LAUNCH, "--dry_run", *args, "--", *TRAIN_ARGS],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr


def test_missing_train_args_is_an_error():
    result = subprocess.run([sys.executable, LAUNCH, "--dry_run", "slurm", "--nodes", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "after `--`" in result.stderr


@pytest.mark.parametrize("target_args", [
    ["tpu", "--tpu_name", "pod", "--zone", "z"],
    ["slurm", "--nodes", "1"],
    ["gke", "--name", "ul2", "--image", "IMAGE", "--tpu_type", "v5p", "--tpu_topology", "2x2x4", "--num_hosts", "1"],
])
def test_dry_run_and_workdir_after_the_target(target_args):
    """`launch.py TARGET ... --workdir W --dry_run -- ...`, as the README types it, prints the same as
    with the two options before the target."""
    def launch(*args):
        result = subprocess.run([sys.executable, LAUNCH, *args, "--", *TRAIN_ARGS],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    after = launch(*target_args, "--workdir", "/src/ul2lab", "--dry_run")
    assert after == launch("--workdir", "/src/ul2lab", "--dry_run", *target_args)
    assert "cd /src/ul2lab && ul2lab train" in after
    # an option given before the target is kept when the target does not repeat it
    assert launch("--workdir", "/src/ul2lab", *target_args, "--dry_run") == after

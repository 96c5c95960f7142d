"""Launch `ul2lab train` on a TPU pod, a SLURM GPU cluster, or GKE.

Every launcher runs the same command on every host: `ul2lab train <your train args>`.
Multi-host set-up is left to `ul2lab train` itself: on TPU pods and under SLURM
`jax.distributed.initialize()` finds the coordinator from the environment.

    python launch/launch.py tpu   --tpu_name my-pod --zone us-central2-b --dry_run -- --gin_file=...
    python launch/launch.py slurm --nodes 2 --gpus_per_node 8 --dry_run -- --gin_file=...
    python launch/launch.py gke   --name ul2 --image IMAGE --tpu_type v5p --tpu_topology 2x2x4 \
                                  --num_hosts 4 --dry_run -- --gin_file=...

`--dry_run` prints exactly what would be run (or submitted) and changes nothing; it and `--workdir`
may come before or after the target.
Everything after `--` is passed to `ul2lab train` unchanged.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

# what `ul2lab train` exits with when it saved a checkpoint on SIGTERM (128 + SIGTERM);
# ul2lab.train.loop.PREEMPTED_EXIT_CODE, not imported here so the launcher needs no jax
PREEMPTED_EXIT_CODE = 143


def train_command(train_args, workdir=None):
    """The shell line every host runs."""
    line = shlex.join(["ul2lab", "train", *train_args])
    return f"cd {shlex.quote(workdir)} && {line}" if workdir else line


def tpu_commands(args, train_args):
    """gcloud ssh into every worker of a TPU VM pod at once."""
    base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu_name, f"--zone={args.zone}"]
    if args.project:
        base.append(f"--project={args.project}")
    base.append("--worker=all")
    commands = []
    if args.setup:
        commands.append(base + [f"--command={args.setup}"])
    commands.append(base + [f"--command={train_command(train_args, args.workdir)}"])
    return commands


def slurm_script(args, train_args):
    """An sbatch script: one task per GPU; SIGTERM before the time limit so the run checkpoints."""
    tasks = args.nodes * args.gpus_per_node
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        # preemption and the time limit both arrive as SIGTERM; ul2lab saves a checkpoint and
        # exits with a requeue code, and --requeue lets SLURM start it again
        "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue",
        f"#SBATCH --output={args.log_dir}/%x-%j.out",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    lines += [
        "set -euo pipefail",
        f"# {tasks} processes in all, one per GPU; jax.distributed reads SLURM's environment",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        # `ul2lab train` exits 143 after saving on SIGTERM (preemption or the time limit); SLURM
        # does not requeue a job that exits on its own, so ask for it
        "set +e",
        f"srun --ntasks={tasks} --ntasks-per-node={args.gpus_per_node} --gpus-per-task=1 "
        f"bash -c {shlex.quote(train_command(train_args, args.workdir))}",
        "rc=$?",
        f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def gke_manifest(args, train_args):
    """A JobSet with one pod per TPU host, all running the same `ul2lab train`."""
    container = {
        "name": "ul2lab",
        "image": args.image,
        "command": ["bash", "-c", train_command(train_args, args.workdir)],
        "resources": {"limits": {"google.com/tpu": args.chips_per_host}},
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": f"tpu-{args.tpu_type}-slice",
            "cloud.google.com/gke-tpu-topology": args.tpu_topology,
        },
        "containers": [container],
    }
    job = {
        "name": "workers",
        "replicas": 1,
        "template": {"spec": {
            "parallelism": args.num_hosts,
            "completions": args.num_hosts,
            "backoffLimit": 0,
            "template": {"spec": pod_spec},
        }},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": args.name},
        # a preempted slice restarts the whole JobSet; the run resumes from its last checkpoint
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            # stable host names so the workers find their coordinator
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [job],
        },
    }


def _require(program):
    if shutil.which(program) is None:
        sys.exit(f"launch: `{program}` is not on PATH; install it, or use --dry_run to see the command")


def add_shared_options(parser, default):
    """--workdir and --dry_run, accepted before the target and after it."""
    parser.add_argument("--workdir", default=default, help="directory to cd into on each host")
    parser.add_argument("--dry_run", action="store_true", default=default,
                        help="print what would run; change nothing")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own_args = argv[:argv.index("--")] if "--" in argv else argv

    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n")[0])
    add_shared_options(parser, default=None)
    # the same options after the target (`launch.py tpu ... --dry_run`), as the README types them; there
    # they default to SUPPRESS, so a target that omits them keeps what was given before it
    shared = argparse.ArgumentParser(add_help=False)
    add_shared_options(shared, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="target", required=True)
    tpu = sub.add_parser("tpu", parents=[shared], help="TPU VM pod via gcloud ssh --worker=all")
    tpu.add_argument("--tpu_name", required=True)
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", default=None)
    tpu.add_argument("--setup", default=None, help="a command to run on every worker first, e.g. pip install")
    slurm = sub.add_parser("slurm", parents=[shared], help="multi-node GPU job via sbatch + srun")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus_per_node", type=int, default=8)
    slurm.add_argument("--cpus_per_task", type=int, default=12)
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--job_name", default="ul2lab")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--log_dir", default="slurm_logs")
    gke = sub.add_parser("gke", parents=[shared], help="GKE TPU slice via a JobSet manifest")
    gke.add_argument("--name", required=True)
    gke.add_argument("--image", required=True)
    gke.add_argument("--tpu_type", required=True, help="e.g. v5p, v5-lite-podslice, v4-podslice")
    gke.add_argument("--tpu_topology", required=True, help="e.g. 2x2x4")
    gke.add_argument("--num_hosts", type=int, required=True)
    gke.add_argument("--chips_per_host", type=int, default=4)
    gke.add_argument("--max_restarts", type=int, default=3)
    args = parser.parse_args(own_args)
    args.dry_run = bool(args.dry_run)
    if not train_args:
        parser.error("give the `ul2lab train` arguments after `--`, e.g. -- --gin_file=gin/runs/pretrain_ul2.gin")
    for name in ("nodes", "gpus_per_node", "num_hosts", "chips_per_host"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")

    if args.target == "tpu":
        commands = tpu_commands(args, train_args)
        for command in commands:
            print(shlex.join(command))
        if not args.dry_run:
            _require("gcloud")
            for command in commands:
                subprocess.run(command, check=True)
    elif args.target == "slurm":
        script = slurm_script(args, train_args)
        print(script, end="")
        if not args.dry_run:
            _require("sbatch")
            os.makedirs(args.log_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
                f.write(script)
            subprocess.run(["sbatch", f.name], check=True)
    else:
        manifest = yaml.safe_dump(gke_manifest(args, train_args), sort_keys=False)
        print(manifest, end="")
        if not args.dry_run:
            _require("kubectl")
            subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

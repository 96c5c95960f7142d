"""Flags of `ul2lab train`, `ul2lab anneal` and `ul2lab demo` (gin-configured runs, as t5x's train.py).

    ul2lab train --gin_file=gin/models/t5_1_1_small.gin --gin_file=gin/runs/pretrain_ul2.gin \\
        --gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=10000 --gin.BATCH_SIZE=128

t5x's train.py flags work as there: --gin_file, --gin_search_paths, --gin.NAME=VALUE, --tfds_data_dir,
--alsologtostderr; --mixture_or_task_module is the flag form of MIXTURE_OR_TASK_MODULE.

The work is ul2lab.runs.train's; each command here reads its flags and makes one call.
"""
from ul2lab.cli import gin_flags
from ul2lab.errors import UserError

EXIT_CODES = (" Exit status: 0 done, 2 bad input or the run stopped itself (message says why), 143 "
              "preempted: SIGTERM saved the current step; requeue the same command to resume.")


def add_parser(subparsers):
    for name, helptext, func in (
            ("train", "train or resume a model from gin files (as t5x's train.py)", run_train),
            ("anneal", "branch the learning-rate anneal off a constant-phase checkpoint into a new directory",
             run_anneal),
            ("demo", "the main job on CPU: continual UL2 pretraining of a tiny T5 on tables + text, "
                     "export to Hugging Face, a few predictions", run_demo)):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        gin_flags.add_gin_arguments(p, "--gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=100")
        p.epilog += EXIT_CODES
        p.set_defaults(func=func)
        if name in ("train", "anneal"):
            add_host_arguments(p)
            p.add_argument("--tfds_data_dir", default=None,
                           help="where TFDS datasets (e.g. c4/en:3.1.0 of the c4_ul2 task) are prepared; "
                                "overrides TFDS_DATA_DIR, as t5x's --tfds_data_dir")
        if name == "train":
            add_t5x_arguments(p)
        if name == "anneal":
            p.add_argument("--checkpoint_dir", required=True, help="MODEL_DIR of the main (constant-phase) run")
            p.add_argument("--output_dir", required=True, help="new directory for the annealed branch")
            p.add_argument("--step", type=int, default=None, help="checkpoint step to branch from (default: latest)")
            p.add_argument("--anneal_steps", type=int, default=None, help="length of the anneal (default: the gin's)")
            p.add_argument("--end_value", type=float, default=None, help="final learning rate (default: the gin's)")
        if name == "demo":
            p.add_argument("--model_dir", default="ul2lab_demo", help="where the demo run writes (default ./ul2lab_demo)")
            p.add_argument("--train_steps", type=int, default=None, help="override the demo's TRAIN_STEPS")


def add_host_arguments(parser):
    group = parser.add_argument_group("multi-host (automatic under SLURM and on TPU pods)")
    group.add_argument("--coordinator_address", default=None,
                       help="host:port of process 0, the same on every process")
    group.add_argument("--num_processes", type=int, default=None, help="number of processes in the run")
    group.add_argument("--process_id", type=int, default=None, help="this process's index, 0 ... N-1")
    group.add_argument("--local_device_ids", default=None,
                       help="comma-separated device ids this process uses (e.g. 0,1)")


def add_t5x_arguments(parser):
    group = parser.add_argument_group("as t5x's train.py")
    group.add_argument("--mixture_or_task_module", action="append", default=None, metavar="MODULE",
                       help="module that registers your seqio tasks, imported before the task is looked up "
                            "(repeatable or comma-separated; gin: MIXTURE_OR_TASK_MODULE)")
    group.add_argument("--alsologtostderr", action="store_true", help="also show INFO logs (seqio, TFDS) on stderr")


def hosts_from_args(args) -> dict:
    ids = args.local_device_ids
    if ids is not None:
        try:
            ids = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise UserError(f"--local_device_ids {args.local_device_ids!r} is not a comma-separated "
                            "list of device numbers such as 0,1") from None
    return dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                process_id=args.process_id, local_device_ids=ids)


def run_train(args) -> int:
    from ul2lab.runs import train
    return train.train_from_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, hosts=hosts_from_args(args),
                                mixture_or_task_modules=args.mixture_or_task_module,
                                tfds_data_dir=args.tfds_data_dir, log_to_stderr=args.alsologtostderr)


def run_anneal(args) -> int:
    from ul2lab.runs import train
    return train.anneal(args.checkpoint_dir, args.output_dir, args.step, args.anneal_steps, args.end_value,
                        args.gin_file, args.gin_bindings, args.gin_search_paths, hosts=hosts_from_args(args),
                        tfds_data_dir=args.tfds_data_dir)


def run_demo(args) -> int:
    from ul2lab.runs import train
    return train.demo(args.model_dir, args.train_steps, args.gin_file, args.gin_bindings, args.gin_search_paths)

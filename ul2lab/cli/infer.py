"""Flags of `ul2lab infer` (predict or score a jsonl file or a seqio task) and `ul2lab eval` (a seqio
eval of a checkpoint).

    ul2lab infer --checkpoint_dir D --input_file in.jsonl --output_file out.jsonl \
        [--mode predict|score] [--beam_size N --alpha A] [--temperature T --top_k K --top_p P]
    ul2lab infer --checkpoint_dir D --mixture_or_task NAME --split test --infer_output_dir DIR
    ul2lab eval --checkpoint_dir D --mixture_or_task NAME [--split validation] \
        [--feature_lengths inputs=512,targets=114] [--eval_output_dir DIR]

or, as t5x's eval.py / infer.py, from gin run files (gin/runs/eval.gin, gin/runs/infer.gin):

    ul2lab eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=D --gin.MIXTURE_OR_TASK_NAME=NAME \
        --gin.EVAL_OUTPUT_DIR=DIR
    ul2lab infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=D --gin.INPUT_FILE=in.jsonl \
        --gin.OUTPUT_FILE=out.jsonl --gin.BEAM_SIZE=4
    ul2lab infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=D --gin.MIXTURE_OR_TASK_NAME=NAME \
        --gin.INFER_OUTPUT_DIR=DIR

Every flag sets the EvalConfig / InferConfig field of the same meaning (ul2lab.runs.settings). When
both are given, explicit flags win over gin (files and --gin.NAME=VALUE bindings alike):
`--gin_file=runs/eval.gin --batch_size 4` evaluates with batch 4. The work is ul2lab.runs.infer's
and ul2lab.runs.evaluate's.
"""
from ul2lab.cli import gin_flags

FLAGS_WIN = "Flags given explicitly override the gin files and --gin. bindings."


def add_parser(subparsers):
    # flags default to None ("not given"): the defaults are EvalConfig's / InferConfig's, and a flag
    # that is given overrides the gin files
    p = subparsers.add_parser("infer", help="predict (greedy, beam, sampling) or score a jsonl file or a seqio task",
                              description="predict (greedy, beam, sampling) or score a jsonl file, or a seqio "
                                          "task or mixture's split (as t5x's infer.py); configure by flags or gin "
                                          "(gin/runs/infer.gin); flags win")
    gin_flags.add_gin_arguments(p, "--gin.CHECKPOINT_PATH=/ckpt --gin.INPUT_FILE=in.jsonl --gin.OUTPUT_FILE=out.jsonl")
    p.epilog += " Start from --gin_file=runs/infer.gin. " + FLAGS_WIN
    _add_checkpoint_args(p)
    p.add_argument("--input_file", help='jsonl, one {"inputs": ..., "targets": ...} per line')
    p.add_argument("--output_file", help="jsonl written here, one line per input line")
    p.add_argument("--mixture_or_task", dest="mixture_or_task_name", metavar="NAME",
                   help="instead of --input_file: a registered seqio task or mixture (with --split, --infer_output_dir)")
    p.add_argument("--split", help="the task's split (default test)")
    p.add_argument("--infer_output_dir", help="<task>-<mode>.jsonl-00000-of-00001 is written here for each task")
    p.add_argument("--feature_lengths", dest="task_feature_lengths", metavar="inputs=N,targets=M",
                   help="a task's features are trimmed to these (default: --max_input_length, --max_decode_length)")
    _add_module_arg(p)
    p.add_argument("--mode", choices=("predict", "score"),
                   help="predict (default) or score: log-likelihood of each line's targets")
    p.add_argument("--max_input_length", type=int, help="inputs are truncated to this (EOS included; default 512)")
    p.add_argument("--max_target_length", type=int,
                   help="score mode: targets are truncated to this (EOS included; default 512)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace --output_file if it exists")
    p.set_defaults(func=run_infer)

    e = subparsers.add_parser("eval", help="run a seqio task or mixture's metrics on a checkpoint",
                              description="run a seqio task or mixture's metrics on a checkpoint; configure by "
                                          "flags or gin (gin/runs/eval.gin); flags win")
    gin_flags.add_gin_arguments(e, "--gin.CHECKPOINT_PATH=/ckpt --gin.MIXTURE_OR_TASK_NAME=my_task "
                                 "--gin.EVAL_OUTPUT_DIR=/tmp/eval")
    e.epilog += " Start from --gin_file=runs/eval.gin. " + FLAGS_WIN
    _add_checkpoint_args(e)
    e.add_argument("--mixture_or_task", dest="mixture_or_task_name", metavar="NAME",
                   help="a registered seqio task or mixture name")
    e.add_argument("--split", help="default validation")
    e.add_argument("--feature_lengths", dest="task_feature_lengths", metavar="inputs=N,targets=M",
                   help="examples are truncated to these lengths (default inputs=512,targets=114)")
    e.add_argument("--max_examples", type=int, help="evaluate only the first N examples")
    e.add_argument("--eval_output_dir", help="write the metrics to DIR/metrics.json")
    e.add_argument("--output_file", help="also write the metrics here as JSON")
    _add_module_arg(e)
    e.set_defaults(func=run_eval)


def _add_module_arg(p):
    p.add_argument("--mixture_or_task_module", action="append", metavar="MODULE",
                   help="module that registers your seqio tasks (repeatable; gin: MIXTURE_OR_TASK_MODULE)")


def _add_checkpoint_args(p):
    p.add_argument("--checkpoint_dir", dest="checkpoint_path", metavar="DIR",
                   help="a ul2lab checkpoint directory (has config.json)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--batch_size", type=int, help="default 16")
    p.add_argument("--max_decode_length", type=int, help="default 128")
    p.add_argument("--beam_size", type=int, help="> 1: beam search (default 1)")
    p.add_argument("--alpha", type=float, help="beam search length penalty ((5+len)/6)^alpha (default 0.6)")
    p.add_argument("--temperature", type=float, help="> 0: sampling (default 0: greedy or beam)")
    p.add_argument("--top_k", type=int, help="sample from the top K tokens only (default 0: all)")
    p.add_argument("--top_p", type=float, help="sample from the smallest set with probability >= P (default 1)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--allow_missing_checksums", action="store_true", default=None,
                   help="read a step that has no checksums (written before ul2lab saved them), its arrays unchecked")


def _given(cls, args) -> dict:
    """The flags the user typed (None means "not given": gin or the config's default decides)."""
    import dataclasses
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def run_infer(args) -> int:
    from ul2lab.runs import gin_config, infer, settings
    infer.infer(gin_config.load_settings(settings.InferConfig, _given(settings.InferConfig, args), args.gin_file,
                                         args.gin_bindings, args.gin_search_paths))
    return 0


def run_eval(args) -> int:
    from ul2lab.runs import evaluate, gin_config, settings
    evaluate.run_eval(gin_config.load_settings(settings.EvalConfig, _given(settings.EvalConfig, args), args.gin_file,
                                               args.gin_bindings, args.gin_search_paths))
    return 0

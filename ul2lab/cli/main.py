"""The `ul2lab` command: one subcommand per concern, each a parser of flags that makes one library call.

Each subcommand module exposes `add_parser(subparsers)`, which builds its argparse parser and sets
`func=<callable(args) -> exit code>`. Those modules import the library only inside `func`, so
`ul2lab --help` starts fast. A UserError (bad input, config or files) is printed as one line, exit 2.
"""
import argparse
import os
import sys

from ul2lab.cli import cache, hf, infer, t5x, train, vocab
from ul2lab.errors import UserError

# in the order `ul2lab --help` lists them
SUBCOMMAND_MODULES = (train, cache, hf, t5x, vocab, infer)
# commands that run the seqio data pipeline, so import TensorFlow anyway
DATA_PIPELINE_COMMANDS = ("train", "anneal", "demo", "eval", "infer", "cache")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with the process's native stderr closed. On import it writes lines no
    setting stops (absl's "log messages before absl::InitializeLog()", "Could not find cuda drivers"
    on a CPU machine) straight to file descriptor 2; they mean nothing to a user of the data pipeline.
    Python errors of the import still surface: they are raised after stderr is restored."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ul2lab", description="UL2 / T5 pretraining, evaluation and Hugging Face interop on JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    # TensorFlow (the data pipeline) logs its C++ chatter unless told otherwise; level 3 also hides
    # "failed call to cuInit" on a machine without a GPU (TF only feeds data here, on the CPU)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.command in DATA_PIPELINE_COMMANDS:
            import_tensorflow_quietly()
        return int(args.func(args) or 0)
    except UserError as e:
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"ul2lab {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or Ctrl-C where nothing needs saving
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"ul2lab {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

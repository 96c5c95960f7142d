"""The `ul2lab` command: one subcommand per concern.

Each subcommand lives in the module that owns the work and exposes
`add_parser(subparsers)`, which builds its argparse parser and sets
`func=<callable(args) -> int>`. Modules are imported only to build the parser,
so they must keep heavy imports (tensorflow, seqio, torch) inside functions.
"""
import argparse
import importlib
import os
import sys

# subcommand modules, in the order `ul2lab --help` lists them
SUBCOMMAND_MODULES = (
    "ul2lab.train_cli",     # train, anneal, demo
    "ul2lab.hf_cli",        # import-hf, export-hf
    "ul2lab.vocab",         # vocab
    "ul2lab.infer_cli",     # infer, eval
)


class UserError(Exception):
    """A problem with the user's input or config: printed as one plain line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ul2lab", description="UL2 / T5 pretraining, evaluation and Hugging Face interop on JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # subcommand not built yet in this checkout
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    # TensorFlow (the data pipeline) logs its C++ start-up chatter unless told otherwise
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"ul2lab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # under `python -m ul2lab.cli` this file is __main__; use the importable module so that
    # subcommands' `ul2lab.cli.UserError` is the class caught here
    from ul2lab.cli import main as _main
    sys.exit(_main())

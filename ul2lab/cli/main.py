"""The `ul2lab` command: one subcommand per concern, each a parser of flags that makes one library call.

Each subcommand module exposes `add_parser(subparsers)`, which builds its argparse parser and sets
`func=<callable(args) -> exit code>`. Those modules import the library only inside `func`, so
`ul2lab --help` starts fast. A UserError (bad input, config or files) is printed as one line, exit 2.
"""
import argparse
import os
import signal
import sys
import threading

from ul2lab.cli import cache, hf, infer, t5x, train, vocab
from ul2lab.errors import UserError

# in the order `ul2lab --help` lists them
SUBCOMMAND_MODULES = (train, cache, hf, t5x, vocab, infer)
# commands that run the seqio data pipeline, so import TensorFlow anyway
DATA_PIPELINE_COMMANDS = ("train", "anneal", "demo", "eval", "infer", "cache")
# commands that write only inside ul2lab.files.interrupts_held blocks (a folder beside the output, moved in):
# a Ctrl-C anywhere else has nothing to clean up and exits at once -- raised as a KeyboardInterrupt inside
# JAX's C++ import or callbacks it can abort the process or be swallowed
WRITES_ONLY_WHILE_HOLDING_INTERRUPTS = ("export-hf", "export-t5x", "import-t5x", "import-mtf")


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
    argv_is_the_command = argv is None  # `ul2lab ...` (the console script), not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), "")
    # Ctrl-C is recorded as well as raised: a KeyboardInterrupt raised inside a callback that swallows it (JAX's
    # garbage-collection hook) or re-raised as another error (an extension's ImportError) still ends in exit 130
    interrupts = []

    def on_interrupt(signum, frame):
        interrupts.append(signum)
        if command in WRITES_ONLY_WHILE_HOLDING_INTERRUPTS:
            _exit_interrupted(command)(signum, frame)
        raise KeyboardInterrupt

    def report_unless_interrupt(report, exc_type, *details):  # what C code prints of an error it cannot raise
        if not issubclass(exc_type, KeyboardInterrupt):
            report(exc_type, *details)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    hooks = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda *error: report_unless_interrupt(hooks[0], *error)
    sys.unraisablehook = lambda unraisable: report_unless_interrupt(lambda *_: hooks[1](unraisable),
                                                                    unraisable.exc_type)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.command in DATA_PIPELINE_COMMANDS:
            import_tensorflow_quietly()
        code = int(args.func(args) or 0)
        return _interrupted(command) if interrupts else code
    except UserError as e:
        if interrupts:
            return _interrupted(command)
        print(f"ul2lab {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or Ctrl-C where nothing needs saving
        return _interrupted(command)
    except BaseException:
        if interrupts:
            return _interrupted(command)
        raise
    finally:
        if not argv_is_the_command:
            sys.excepthook, sys.unraisablehook = hooks
        if in_main_thread:
            # run as the `ul2lab` command, the work is done (or undone) here; a Ctrl-C while the interpreter
            # exits (JAX's and orbax's exit hooks) has nothing left to stop: exit 130 without a traceback
            signal.signal(signal.SIGINT, _exit_interrupted(command) if argv_is_the_command
                          else previous if previous is not None else signal.default_int_handler)


def _interrupted(command: str) -> int:
    print(f"ul2lab {command}: interrupted (Ctrl-C)", file=sys.stderr)
    return 130


def _exit_interrupted(command: str):
    def handler(signum, frame):
        sys.stdout.flush()
        os.write(2, f"ul2lab {command}: interrupted (Ctrl-C)\n".encode())
        os._exit(130)
    return handler


if __name__ == "__main__":
    sys.exit(main())

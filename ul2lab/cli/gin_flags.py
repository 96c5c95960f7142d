"""gin on the command line, as t5x's scripts (its `rewrite_gin_args`): `--gin_file=F` (repeatable),
`--gin.NAME=VALUE`, `--gin_search_paths`. Shared by every command that takes gin.

`--gin.NAME=VALUE` becomes the gin binding `NAME = VALUE`; a value that is not a Python/gin literal
(a bare path or word) is taken as a string, so `--gin.MODEL_DIR=/tmp/run` needs no quotes. Parsing
the files and bindings is ul2lab.runs.gin_config's work.
"""
import argparse
import ast
import sys

from ul2lab.errors import UserError


class GinArgumentParser(argparse.ArgumentParser):
    """Collects `--gin.NAME=VALUE` arguments (which argparse cannot declare) into args.gin_bindings."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        gin_args = [a for a in args if a.startswith("--gin.")]
        namespace, extras = super().parse_known_args([a for a in args if not a.startswith("--gin.")], namespace)
        namespace.gin_bindings = [gin_binding(a) for a in gin_args]
        return namespace, extras


def add_gin_arguments(parser: argparse.ArgumentParser, example: str):
    """--gin_file, --gin_search_paths and --gin.NAME=VALUE on a subcommand's parser."""
    parser.__class__ = GinArgumentParser
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; later files override earlier ones); relative paths are "
                             "looked up in the current folder, the gin files that ship with ul2lab (models/..., "
                             "runs/..., schedules/..., partitioning/...; gin/models/... also works from any "
                             "folder) and --gin_search_paths")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders to look up gin files in")
    parser.epilog = f"Gin bindings: --gin.NAME=VALUE (repeatable), e.g. {example}."


def gin_binding(arg: str) -> str:
    """'--gin.NAME=VALUE' -> 'NAME = VALUE' (VALUE quoted when it is a bare word or path)."""
    name, sep, value = arg[len("--gin."):].partition("=")
    if not sep or not name:
        raise UserError(f"{arg!r} is not a gin binding; write --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=1000")
    return f"{name} = {_gin_value(value)}"


def _gin_value(value: str) -> str:
    if value[:1] in ("@", "%", "[", "{", "(", "'", '"'):
        return value
    try:
        ast.literal_eval(value)
        return value
    except (ValueError, SyntaxError):
        return repr(value)

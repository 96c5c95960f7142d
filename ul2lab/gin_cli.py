"""gin on the command line, as t5x's scripts: `--gin_file=F` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths`.

Shared by `ul2lab train/anneal/demo` (TrainConfig) and `ul2lab eval/infer` (EvalConfig, InferConfig).
`--gin.NAME=VALUE` adds the gin binding `NAME = VALUE`; a value that is not a Python/gin literal
(a bare path or word) is taken as a string, so `--gin.MODEL_DIR=/tmp/run` needs no quotes.
Every misspelled name fails before any work, as one line with the closest registered names suggested.
"""
import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
from typing import Mapping, Optional, Sequence

from ul2lab.cli import UserError

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


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
                             "looked up in the current folder, --gin_search_paths and the repository's gin/")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders to look up gin files in")
    parser.epilog = f"Gin bindings: --gin.NAME=VALUE (repeatable), e.g. {example}."


def gin_binding(arg: str) -> str:
    """'--gin.NAME=VALUE' -> 'NAME = VALUE' (VALUE quoted when it is a bare word or path)."""
    name, sep, value = arg[len("--gin."):].partition("=")
    if not sep or not name:
        raise UserError(f"{arg!r} is not a gin binding; write --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=1000")
    return f"{name} = {_gin_value(value)}"


def _gin_value(value: str) -> str:
    import ast
    if value[:1] in ("@", "%", "[", "{", "(", "'", '"'):
        return value
    try:
        ast.literal_eval(value)
        return value
    except (ValueError, SyntaxError):
        return repr(value)


def load_config(name: str, gin_files: Sequence[str], bindings: Sequence[str], search_paths: str = "", *,
                start_from: str, missing_hint: str, overrides: Optional[Mapping] = None,
                flags: Optional[Mapping[str, str]] = None):
    """Parse gin files + bindings and build the registered config class `name` (a UserError for any mistake).

    start_from: the run file to suggest when no --gin_file is given. missing_hint: what to include when
    fields have no value. overrides: {field: value} applied after gin (explicit command-line flags win).
    flags: {field: flag} so a %gin.REQUIRED message can also name the flag that sets it.
    """
    import gin
    from ul2lab import gin_registry

    registered = gin_registry.register()
    gin.clear_config()
    paths = [os.getcwd(), GIN_DIR] + [p for p in search_paths.split(",") if p]
    for path in paths:
        gin.add_config_file_search_path(path)
    for gin_file in gin_files:
        if not any(os.path.exists(os.path.join(path, gin_file)) for path in paths):
            raise UserError(f"gin file {gin_file!r} not found in {', '.join(paths)}; check the path "
                            "(or add its folder with --gin_search_paths)")
    if not gin_files:
        raise UserError(f"no --gin_file given; start from a run file such as {start_from}")
    logging.disable(logging.ERROR)  # gin logs an error for every search path a file is not in
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, IOError) as e:
        raise UserError(explain_gin_error(e)) from None
    finally:
        logging.disable(logging.NOTSET)
    check_macros_used(bindings, gin.config_str())
    try:
        config = registered[name]()
    except TypeError as e:
        unexpected = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
        if unexpected:
            owner, field = unexpected.groups()
            close = difflib.get_close_matches(field, gin_registry.parameter_names(owner), n=3, cutoff=0.6)
            raise UserError(f"gin: {owner} has no field {field!r}"
                            + (f"; did you mean {' or '.join(close)}?" if close else "")) from None
        undefined = re.search(r"In call to configurable 'macro' .* in scope '(\w+)'", str(e))
        if undefined:
            macro = undefined.group(1)
            hint = " (a model gin file, e.g. --gin_file=gin/models/t5_1_1_small.gin)" if macro == "MODEL" else ""
            raise UserError(f"gin: the macro {macro} is used but never set; set it{hint} or pass "
                            f"--gin.{macro}=...") from None
        missing = re.findall(r"arguments?: \[([^\]]*)\]", str(e))
        names = missing[0] if missing else str(e).splitlines()[0]
        raise UserError(f"the run has no value for {name} {names}: {missing_hint}") from None
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    if overrides:
        config = dataclasses.replace(config, **overrides)
    required = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is gin.REQUIRED]
    if required:
        operative = gin.config_str()
        macros = []
        for field in required:  # the macro the gin files bind the field to, else the field's own name
            bound = re.search(rf"^{name}\.{field} = %(\w+)", operative, re.M)
            macros.append(bound.group(1) if bound else field.upper())
        also = [flags[f] for f in required if flags and f in flags]
        raise UserError(f"required settings {', '.join(macros)} are not set; pass "
                        + " ".join(f"--gin.{m}=..." for m in macros)
                        + (f" or {' '.join(f + ' ...' for f in also)}" if also else "")
                        + " (or bind them in a gin file)")
    return config


def explain_gin_error(error: Exception) -> str:
    from ul2lab import gin_registry

    message = str(error)
    first = message.splitlines()[0]
    where = " ".join(line.strip() for line in message.splitlines()[1:3])
    unknown = re.search(r"No configurable matching '([^']+)'", message)
    if unknown:
        name = unknown.group(1)
        close = difflib.get_close_matches(name.split(".")[-1], gin_registry.configurable_names(), n=3, cutoff=0.6)
        return f"gin: unknown name {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else
                                                 f"; configurables: {', '.join(gin_registry.configurable_names())}") \
            + (f" ({where})" if where else "")
    param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if param:
        configurable, name = param.groups()
        known = gin_registry.parameter_names(configurable)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        return (f"gin: {configurable} has no parameter {name!r}"
                + (f"; did you mean {' or '.join(close)}?" if close else f"; its parameters: {', '.join(known)}")
                + (f" ({where})" if where else ""))
    return f"gin: {first}" + (f" ({where})" if where else "")


def check_macros_used(bindings: Sequence[str], config_str: str):
    """A --gin.NAME=... macro that no gin file uses is almost always a typo (TRAIN_STEP for TRAIN_STEPS)."""
    used = set(re.findall(r"%([A-Za-z_][\w.]*)", config_str))
    for binding in bindings:
        name = binding.split("=")[0].strip()
        if "." in name or "/" in name or name in used:
            continue
        close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
        raise UserError(f"gin: the macro {name} is not used by any gin file"
                        + (f"; did you mean {' or '.join(close)}?" if close else
                           f"; macros in use: {', '.join(sorted(used))}"))

"""gin for ul2lab's configs, as t5x uses it: which names are configurable, and gin files +
bindings -> a config object, every mistake reported as one line before any work.

Each configurable is registered under its defining module, so gin files may use the full name
(`ul2lab.train.schedules.infinite_schedule.peak_value`) or the short one
(`infinite_schedule.peak_value`). The models and train floors never import gin: this is the one
place that makes their functions and dataclasses configurable.
"""
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import logging
import os
import re
import tokenize
from typing import Callable, Dict, Mapping, Optional, Sequence

import gin

from ul2lab.errors import UserError
from ul2lab.runs import settings, t5x_names, task_modules

GIN_PACKAGE = "ul2lab_gin"  # the repository's gin/ folder, installed under this name (setup.py)
REPOSITORY_GIN_PREFIX = "gin"  # how README commands typed from the repository root name the shipped files


@functools.lru_cache(maxsize=None)
def shipped_gin_dir() -> str:
    """The folder of the gin files that ship with ul2lab (models/, runs/, schedules/, partitioning/), found
    through the import system: site-packages/ul2lab_gin in a wheel, the checkout's gin/ in an editable install.

    Not importlib.resources.files(): ul2lab_gin is a namespace package (gin/ has no __init__.py, which would
    shadow gin-config), and on Python 3.11 files() fails on a namespace package of a setuptools editable
    install (its __path__ holds a placeholder that is not a folder). Its spec's folders are what files() reads.
    """
    spec = importlib.util.find_spec(GIN_PACKAGE)
    folders = [p for p in (spec.submodule_search_locations or []) if os.path.isdir(os.path.join(p, "models"))] \
        if spec else []
    if not folders:
        raise UserError(f"the gin files that ship with ul2lab (package {GIN_PACKAGE}) are not installed; "
                        "reinstall ul2lab (`pip install .`, or `pip install -e .` in a checkout)")
    return folders[0]


def resolve_gin_files(gin_files: Sequence[str], paths: Sequence[str]) -> list:
    """Each --gin_file as gin will look it up in `paths`. A `gin/models/...` path typed as the README does from
    the repository root, and not found as such, is the shipped file `models/...` (so it works from any folder)."""
    resolved = []
    for gin_file in gin_files:
        if not any(os.path.exists(os.path.join(path, gin_file)) for path in paths):
            parts = os.path.normpath(gin_file).split(os.sep)
            shipped = os.path.join(*parts[1:]) if len(parts) > 1 and parts[0] == REPOSITORY_GIN_PREFIX else None
            if shipped and os.path.isfile(os.path.join(shipped_gin_dir(), shipped)):
                gin_file = shipped
        resolved.append(gin_file)
    return resolved

_REGISTERED: Dict[str, Callable] = {}
_ORIGINALS: Dict[str, Callable] = {}


def register() -> Dict[str, Callable]:
    """Register everything (idempotent); returns {name: gin-wrapped callable}."""
    if _REGISTERED:
        return _REGISTERED
    from ul2lab.models import config
    from ul2lab.train import optimizers, schedules
    from ul2lab.train.config import TrainConfig

    for fn in (config.T5Config, config.preset,
               TrainConfig, settings.EvalConfig, settings.InferConfig,
               schedules.constant_schedule, schedules.rsqrt_schedule, schedules.cosine_schedule,
               schedules.wsd_schedule, schedules.infinite_schedule,
               optimizers.make_optimizer):
        _ORIGINALS[fn.__name__] = fn
        _REGISTERED[fn.__name__] = gin.external_configurable(fn, fn.__name__, module=fn.__module__)
    return _REGISTERED


def configurable_names() -> list:
    return sorted(register())


def parameter_names(name: str) -> list:
    """The parameters a registered configurable accepts (for close-match suggestions)."""
    register()
    name = name.split(".")[-1]
    fn = _ORIGINALS.get(name)
    if fn is None:
        return []
    names = [p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs", "overrides")]
    if name == "preset":  # preset(name, **overrides): any T5Config field may be overridden
        names += [p for p in parameter_names("T5Config") if p != "name"]
    return names


def load_config(name: str, gin_files: Sequence[str], bindings: Sequence[str], search_paths: str = "", *,
                start_from: str, missing_hint: str, overrides: Optional[Mapping] = None,
                flags: Optional[Mapping[str, str]] = None):
    """Parse gin files + bindings and build the registered config class `name` (a UserError for any mistake).

    start_from: the run file to suggest when no --gin_file is given. missing_hint: what to include when
    fields have no value. overrides: {field: value} applied after gin (explicit command-line flags win).
    flags: {field: flag} so a %gin.REQUIRED message can also name the flag that sets it.
    """
    import gin
    registered = register()
    # the data side's configurables (ul2lab.mixture_of_denoisers.rates, ul2lab.table_data_dir.path,
    # ...) exist for gin only once the modules that define them are imported
    task_modules.import_task_modules()
    gin.clear_config()
    paths = [os.getcwd(), shipped_gin_dir()] + [p for p in search_paths.split(",") if p]
    for path in paths:
        gin.add_config_file_search_path(path)
    gin_files = resolve_gin_files(gin_files, paths)
    for gin_file in gin_files:
        if not any(os.path.exists(os.path.join(path, gin_file)) for path in paths):
            raise UserError(f"gin file {gin_file!r} not found in {', '.join(paths)} (the current folder, the gin "
                            "files that ship with ul2lab, --gin_search_paths); check the path (or add its folder "
                            "with --gin_search_paths)")
    if not gin_files:
        raise UserError(f"no --gin_file given; start from a run file such as {start_from}")
    t5x_names.check_gin_inputs(gin_files, bindings, paths)  # t5x's names: say what they are here
    logging.disable(logging.ERROR)  # gin logs an error for every search path a file is not in
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
    except ImportError as e:  # `import some.module` in a gin file
        where = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"gin: a gin file imports a module that cannot be imported ({str(e).splitlines()[0]})"
                        + (f" ({where})" if where else "") + "; install it or add its folder to PYTHONPATH, or "
                        "remove the import") from None
    except tokenize.TokenError:
        raise UserError(f"gin: a bracket or string is never closed in {', '.join(gin_files)} or the --gin. "
                        "bindings (the parser reached the end of a file inside it); close every ( [ { and quote")
    except (ValueError, SyntaxError, IOError) as e:
        raise UserError(explain_gin_error(e)) from None
    except Exception as e:  # noqa: BLE001  e.g. a module a gin file imports fails on import: the user's code
        raise UserError(f"gin: the gin files could not be read ({type(e).__name__}: {explain_gin_error(e)[5:]})") from None
    finally:
        logging.disable(logging.NOTSET)
    check_macros_used(bindings, gin.config_str())
    try:
        config = registered[name]()
    except TypeError as e:
        unexpected = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
        if unexpected:
            owner, field = unexpected.groups()
            close = difflib.get_close_matches(field, parameter_names(owner), n=3, cutoff=0.6)
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
    message = str(error)
    first = message.splitlines()[0]
    where = " ".join(line.strip() for line in message.splitlines()[1:3])
    unknown = re.search(r"No configurable matching '([^']+)'", message)
    if unknown:
        name = unknown.group(1)
        close = difflib.get_close_matches(name.split(".")[-1], configurable_names(), n=3, cutoff=0.6)
        return f"gin: unknown name {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else
                                                 f"; configurables: {', '.join(configurable_names())}") \
            + (f" ({where})" if where else "")
    param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if param:
        configurable, name = param.groups()
        known = parameter_names(configurable)
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


RUN_FILES = {"EvalConfig": "gin/runs/eval.gin", "InferConfig": "gin/runs/infer.gin"}


def load_settings(cls, given: Mapping, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
                  search_paths: str = ""):
    """EvalConfig / InferConfig from gin (when gin files or bindings are given) with the settings the user
    gave as flags (`given`: {field: value}) on top; checked, every mistake a one-line UserError."""
    run_file = RUN_FILES[cls.__name__]
    given = dict(given)
    if isinstance(given.get("task_feature_lengths"), str):
        given["task_feature_lengths"] = settings.parse_feature_lengths(given["task_feature_lengths"])
    required = settings.required_fields(cls)
    if gin_files or bindings:
        if cls is settings.EvalConfig:  # eval gin files may call the task modules' configurables
            task_modules.import_task_modules()
        config = load_config(
            cls.__name__, gin_files, bindings, search_paths, start_from=run_file,
            missing_hint=f"include {run_file}, or pass " + ", ".join(settings.flag(f) for f in required),
            overrides=given, flags={f.name: settings.flag(f.name) for f in dataclasses.fields(cls)})
    else:
        missing = [f for f in required if f not in given]
        if missing:
            raise UserError(f"{', '.join(settings.flag(m) for m in missing)} required: pass "
                            f"{' '.join(settings.flag(m) + ' ...' for m in missing)}, or use a gin run file: "
                            f"--gin_file={run_file} " + " ".join(f"--gin.{m.upper()}=..." for m in missing))
        config = cls(**given)
    if hasattr(config, "mixture_or_task_name"):  # a Task or Mixture stands for its name, as in t5x
        config = dataclasses.replace(config, mixture_or_task_name=task_modules.task_name(config.mixture_or_task_name))
    settings.check_settings(config)
    return config

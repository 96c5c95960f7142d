"""Names quoted in docstrings, the README and gin files exist: a module, function or class path
(`ul2lab.train.schedules.infinite_schedule`), or a gin configurable and one of its parameters
(`ul2lab.local_text_task.file_patterns`). A rename that leaves a stale reference fails here."""
import glob
import importlib
import inspect
import os
import re

import gin

import ul2lab_tasks  # noqa: F401  registers the task configurables
from ul2lab.runs import gin_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = re.compile(r"\b(ul2lab(?:_tasks)?(?:\.[A-Za-z_]\w*)+)")
FILE_NAME_ENDINGS = (".py", ".gin", ".md", ".json", ".model", ".txt", ".jsonl")


def python_object(name):
    """The object `name` names, or None; the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                return None
            obj = getattr(obj, attribute)
        return obj
    return None


def gin_reference_exists(name):
    """`name` is a gin configurable, or a configurable followed by one of its parameters."""
    candidates = [(name, None)]
    if "." in name:
        candidates.append(tuple(name.rsplit(".", 1)))
    for configurable, parameter in candidates:
        try:
            fn = gin.get_configurable(configurable)
        except ValueError:
            continue
        if parameter is None:
            return True
        target = getattr(fn, "__wrapped__", fn)
        target = target.__init__ if inspect.isclass(target) else target
        if parameter in inspect.signature(target).parameters:
            return True
    return False


def references():
    files = (glob.glob(os.path.join(ROOT, "ul2lab", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(ROOT, "tasks", "*.py"))
             + glob.glob(os.path.join(ROOT, "gin", "**", "*.gin"), recursive=True)
             + [os.path.join(ROOT, "README.md")])
    for path in files:
        with open(path) as f:
            for match in REFERENCE.finditer(f.read()):
                name = match.group(1)
                if not name.endswith(FILE_NAME_ENDINGS):
                    yield os.path.relpath(path, ROOT), name


def test_every_quoted_ul2lab_name_exists():
    gin_config.register()
    found = list(references())
    assert len(found) > 50  # the scan reads the files at all
    stale = sorted({f"{path}: {name}" for path, name in found
                    if python_object(name) is None and not gin_reference_exists(name)})
    assert not stale, "names that no longer exist:\n" + "\n".join(stale)

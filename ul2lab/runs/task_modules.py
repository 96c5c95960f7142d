"""Which seqio tasks and mixtures exist: ul2lab's own (the `ul2lab_tasks` package) plus the user's
modules (t5x's MIXTURE_OR_TASK_MODULE, or --mixture_or_task_module), imported before a task or
mixture name is looked up."""
import importlib
from typing import List, Sequence, Union

from ul2lab.errors import UserError

Modules = Union[None, str, Sequence[str]]


def module_names(*modules: Modules) -> List[str]:
    """Module names from any mix of None, "a.tasks", "a.tasks,b.tasks" and lists of those, in order, once each."""
    names = []
    for value in modules:
        if value is None:
            continue
        if isinstance(value, str):
            value = value.split(",")
        elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"MIXTURE_OR_TASK_MODULE {value!r} is not a module name; write "
                            "MIXTURE_OR_TASK_MODULE = 'my.tasks' or ['my.tasks', 'other.tasks']")
        for name in value:
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def import_task_modules(*modules: Modules):
    """Register ul2lab's tasks and mixtures, then import each of `modules` (their import registers
    the user's tasks); a module that fails to import is a one-line error naming it."""
    import ul2lab_tasks  # noqa: F401  registers the project's tasks and mixtures

    for module in module_names(*modules):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  any failure of the user's module is theirs to see in one line
            raise UserError(f"task module {module!r} (MIXTURE_OR_TASK_MODULE) could not be imported "
                            f"({type(e).__name__}: {' '.join(str(e).split())}); check the module name and that "
                            "its folder is on PYTHONPATH") from None


def task_name(mixture_or_task) -> str:
    """A seqio Task or Mixture given where a name is expected (t5x accepts both): its name."""
    return getattr(mixture_or_task, "name", mixture_or_task)

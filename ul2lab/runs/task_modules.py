"""Which seqio tasks and mixtures exist: ul2lab's own (the `ul2lab_tasks` package) plus the user's
modules, imported before a task or mixture name is looked up."""
import importlib
from typing import Sequence

from ul2lab.errors import UserError


def import_task_modules(modules: Sequence[str] = ()):
    """Register ul2lab's tasks and mixtures, then import each of `modules` (their import registers
    the user's tasks); a module that fails to import is a one-line error naming it."""
    import ul2lab_tasks  # noqa: F401  registers the project's tasks and mixtures

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  any failure of the user's module is theirs to see in one line
            raise UserError(f"task module {module!r} could not be imported ({type(e).__name__}: "
                            f"{' '.join(str(e).split())}); check the module name and that it is on PYTHONPATH") from None


def task_name(mixture_or_task) -> str:
    """A seqio Task or Mixture given where a name is expected (t5x accepts both): its name."""
    return getattr(mixture_or_task, "name", mixture_or_task)

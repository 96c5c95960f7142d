"""Every package the code imports is declared in setup.py: a module imported by ul2lab/, tasks/ (ul2lab_tasks)
or launch/ comes from a distribution setup.py names (install_requires or an extra). One that only arrives
with another dependency would vanish from a fresh install the day that dependency stops bringing it."""
import ast
import importlib.metadata
import os
import re
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("ul2lab", "tasks", "launch")
OURS = {"ul2lab", "ul2lab_tasks", "ul2lab_gin"}


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): PyYAML == pyyaml, ml_dtypes == ml-dtypes."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(monkeypatch) -> set:
    """The distributions setup.py declares: setup()'s install_requires and every extra."""
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    requirements = list(captured["install_requires"])
    for extra in captured.get("extras_require", {}).values():
        requirements += extra
    return {normalized(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def imported_modules() -> dict:
    """{top-level module: [file:line, ...]} of every absolute import in the scanned folders."""
    found = {}
    for top in SCANNED:
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        modules = [node.module]
                    else:
                        continue
                    for module in modules:
                        found.setdefault(module.split(".")[0], []).append(
                            f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


def test_every_imported_package_is_declared_in_setup_py(monkeypatch):
    declared = declared_distributions(monkeypatch)
    providers = importlib.metadata.packages_distributions()
    undeclared, unknown = [], []
    for module, where in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in OURS or module == "__future__":
            continue
        distributions = {normalized(d) for d in providers.get(module, [])}
        if not distributions:
            unknown.append(f"{module} ({where[0]})")
        elif not distributions & declared:
            undeclared.append(f"{module} from {'/'.join(sorted(distributions))} ({where[0]})")
    assert not unknown, f"imported but installed by no distribution: {', '.join(unknown)}"
    assert not undeclared, ("imported but not declared in setup.py (add it, pinned to the installed version): "
                            + ", ".join(undeclared))


def test_the_check_sees_imports_inside_functions():
    """The lazy imports (torch, transformers, apache_beam, tensorstore) count as much as the top-level ones."""
    found = imported_modules()
    assert {"jax", "seqio", "gin", "tensorstore", "transformers", "yaml"} <= set(found)

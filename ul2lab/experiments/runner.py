"""Run an experiment over seeds, write one results JSON per seed, regenerate its README section and plot."""
import os
import shutil
import time
from typing import Optional, Sequence

import jax

from ul2lab.errors import UserError
from ul2lab.experiments import continual_tables, harness, objectives, report, schedules

EXPERIMENTS = {m.NAME: m for m in (continual_tables, schedules, objectives)}


def module(name: str):
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def regenerate(name: str, results_dir: Optional[str] = None, readme_path: Optional[str] = None,
               scale: Optional[str] = None) -> dict:
    """The README results section and plot of `name` from its results JSON."""
    experiment = module(name)
    return report.regenerate(harness.experiment_dir(name), experiment.SECTIONS, experiment.COMPARISONS,
                             experiment.plot, results_dir=results_dir, scale=scale, readme_path=readme_path)


def run(name: str, s: harness.Scale, seeds: Sequence[int], work_dir: str, results_dir: Optional[str] = None,
        readme_path: Optional[str] = None, data_dir: Optional[str] = None, keep_runs: bool = False) -> dict:
    """Every seed of experiment `name` at scale `s` (checkpoints under work_dir/<name>/<scale>-seed<N>,
    started afresh), then the report. Returns regenerate()'s result."""
    experiment = module(name)
    if data_dir:
        os.environ["UL2LAB_DATA_DIR"] = os.path.abspath(data_dir)
    results_dir = results_dir or os.path.join(harness.experiment_dir(name), "results")
    if hasattr(experiment, "check"):
        experiment.check(s)
    if hasattr(experiment, "check_data"):
        experiment.check_data()
    if not jax.config.jax_compilation_cache_dir:  # every phase compiles the same programs again: cache them
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(work_dir, "jax_cache")))
    for seed in seeds:
        seed_dir = os.path.abspath(os.path.join(work_dir, name, f"{s.name}-seed{seed}"))
        if os.path.exists(seed_dir):  # a run directory that exists would be resumed, not started afresh
            shutil.rmtree(seed_dir)
        started = time.time()
        measurements, extra = experiment.run_seed(s, seed, seed_dir)
        path = harness.write_result(results_dir, name, s, seed, measurements, extra, time.time() - started)
        print(f"{name} seed {seed}: {len(measurements)} measurements in {time.time() - started:.0f}s -> {path}",
              flush=True)
        if not keep_runs:
            shutil.rmtree(seed_dir, ignore_errors=True)
    return regenerate(name, results_dir=results_dir, readme_path=readme_path, scale=s.name)

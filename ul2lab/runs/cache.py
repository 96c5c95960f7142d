"""What `ul2lab cache` does: register the tasks, then run seqio's Apache Beam cache job on a task or
mixture (ul2lab.data.task_cache), as t5x users run seqio's cache_tasks_main."""
from typing import Sequence

from ul2lab.data import pipeline, task_cache
from ul2lab.errors import UserError
from ul2lab.runs import task_modules


def cache(mixture_or_task_name: str, output_dir: str, pipeline_args: Sequence[str] = (), *, min_shards: int = 16,
          overwrite: bool = False, modules: Sequence[str] = ()) -> int:
    """Cache the task (or every cacheable task of the mixture) under output_dir; returns the exit code."""
    task_modules.import_task_modules(modules)
    try:
        pipeline.get_mixture_or_task(mixture_or_task_name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if min_shards <= 0:
        raise UserError(f"--min_shards {min_shards} must be positive: the cache is read as that many files or more")
    args = list(pipeline_args)
    if not any(a.startswith("--runner") for a in args):
        args.insert(0, "--runner=DirectRunner")
    written = task_cache.cache_tasks(mixture_or_task_name, output_dir, args, min_shards=min_shards,
                                     overwrite=overwrite, modules_to_import=["ul2lab_tasks", *modules])
    print(f"cached {len(written)} task(s) of {mixture_or_task_name} under {output_dir}; train from them with "
          f"--gin.USE_CACHED_TASKS=True --gin.SEQIO_CACHE_DIRS=\"['{output_dir}']\"", flush=True)
    return 0

"""Flags of `ul2lab cache`: seqio's Apache Beam cache job on a task or mixture (ul2lab.runs.cache).

    ul2lab cache --mixture_or_task embedded_text_ul2 --output_dir /data/seqio_cache
    ul2lab cache --mixture_or_task c4_ul2 --output_dir gs://bucket/cache -- --runner=DataflowRunner \\
        --project=P --region=R --temp_location=gs://bucket/tmp

Everything after `--` is a Beam pipeline option (default --runner=DirectRunner).
"""


def add_parser(subparsers):
    helptext = "preprocess a seqio task or mixture once with Apache Beam (seqio's cache format)"
    p = subparsers.add_parser(
        "cache", help=helptext, description=helptext + "; train from it with --gin.USE_CACHED_TASKS=True "
        "--gin.SEQIO_CACHE_DIRS=\"['DIR']\". Beam pipeline options go after --, e.g. -- --runner=DataflowRunner "
        "--project=P --region=R --temp_location=gs://B/tmp (default DirectRunner). Needs pip install -e \".[beam]\".")
    p.add_argument("--mixture_or_task", required=True, help="registered seqio task or mixture")
    p.add_argument("--output_dir", required=True, help="cache root (one folder per task, seqio's layout)")
    p.add_argument("--min_shards", type=int, default=16, help="files per split at least (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another task version or vocabulary")
    p.add_argument("--module_import", action="append", default=[],
                   help="a module that registers more tasks (repeatable)")
    p.add_argument("beam_options", nargs="*", help="Beam pipeline options, after --")
    p.set_defaults(func=run_cache)


def run_cache(args) -> int:
    from ul2lab.runs import cache
    return cache.cache(args.mixture_or_task, args.output_dir, args.beam_options, min_shards=args.min_shards,
                       overwrite=args.overwrite, modules=args.module_import)

"""`python -m ul2lab.experiments NAME [--scale smoke|reduced|full] [--seeds 0,1,2]`: run an experiment and
regenerate experiments/NAME/README.md's results and plot; `--report_only` regenerates them from the
committed results/*.json without training."""
import argparse
import sys

from ul2lab.errors import UserError


def parse(argv):
    from ul2lab.experiments import harness, runner
    parser = argparse.ArgumentParser(prog="python -m ul2lab.experiments", description=__doc__)
    parser.add_argument("name", choices=sorted(runner.EXPERIMENTS))
    parser.add_argument("--scale", default=None, choices=sorted(harness.SCALES),
                        help="run sizes (ul2lab/experiments/harness.py SCALES); default: the experiment's "
                             "DEFAULT_SCALE, the one its README reports (<= 45 minutes on 2 CPU cores)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one field of the scale, e.g. --set steps_per_phase=100 (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for intervals)")
    parser.add_argument("--work_dir", default="ul2lab_experiments", help="checkpoints of the runs go here")
    parser.add_argument("--results_dir", default=None, help="default: experiments/NAME/results")
    parser.add_argument("--readme", default=None, help="default: experiments/NAME/README.md")
    parser.add_argument("--data_dir", default=None,
                        help="folder holding wikitq/ and tabfact/ (default: $UL2LAB_DATA_DIR)")
    parser.add_argument("--keep_runs", action="store_true", help="keep each seed's checkpoints")
    parser.add_argument("--report_only", action="store_true", help="only regenerate the README and plot")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        from ul2lab.experiments import harness, runner
        if args.report_only:
            out = runner.regenerate(args.name, results_dir=args.results_dir, readme_path=args.readme)
        else:
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers") from None
            scale_name = args.scale or runner.module(args.name).DEFAULT_SCALE
            out = runner.run(args.name, harness.scale(scale_name, **harness.parse_overrides(args.set)), seeds, args.work_dir, args.results_dir,
                             args.readme, args.data_dir, args.keep_runs)
        print(out["section"])
        print(f"wrote {out['readme']}" + (f" and {out['plot']}" if out["plot"] else ""))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Train and evaluate every arm of an experiment at equal tokens and seed -> one JSON, one table, plots.

    python tools/run_experiment.py configs/experiments/seesaw_gpu_small.yaml [--arms a,b] [--parallel 4]
    python tools/run_experiment.py EXP --report-only        # rebuild results.{json,md} and the plots
    python tools/run_experiment.py EXP --import docs/results/EXP/results.json --arms x,y   # a later session

Resumable: finished arms (a result.json from the same config) are skipped, trained arms are only
evaluated, a stopped trainer resumes from its checkpoint. See mtpd_megatron/experiment/ for the file format
and what is measured. A bad experiment file prints one line and exits with 2 before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "run_experiment"


def _main(argv=None) -> int:
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment YAML (configs/experiments/*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default runs/experiments/<name>)")
    p.add_argument(
        "--arms", default=None, help="comma list of arms to run (default: all; extensions bring their parent)"
    )
    p.add_argument("--parallel", type=int, default=1, help="arms trained at the same time (they share the device)")
    p.add_argument("--train-only", action="store_true", help="train, do not evaluate")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the arms' result files")
    p.add_argument("--commit", default=None, help="commit recorded in the results (default: git rev-parse)")
    p.add_argument(
        "--import",
        dest="import_from",
        default=None,
        help="results.json of an earlier run (e.g. docs/results/<name>/results.json): its arms count as done",
    )
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    if args.train_only and args.report_only:
        p.error("--train-only and --report-only exclude each other")

    from mtpd_megatron.cli import source_commit
    from mtpd_megatron.experiment import runner
    from mtpd_megatron.experiment.report import write_report
    from mtpd_megatron.experiment.spec import load_experiment, parse_arm_list

    experiment = load_experiment(args.experiment, args.out)
    names = parse_arm_list(args.arms, experiment)
    if args.import_from:
        imported = runner.import_results(experiment, args.import_from)
        print(f"{PROG}: imported {len(imported)} finished arms from {args.import_from}")
    if args.report_only:
        written = write_report(experiment)
        print("\n".join(str(w) for w in written) if written else f"{PROG}: no finished arms in {experiment.out}")
        return 0
    return runner.run(
        experiment,
        names,
        parallel=args.parallel,
        evaluate=not args.train_only,
        commit=args.commit or source_commit() or "unknown",
    )


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())

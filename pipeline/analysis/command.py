"""The `sdi report` command: its arguments and how it opens the run to report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.analysis.results import RunResults


REPORT_NAME = "report.html"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        help="the run folder <store>/<run_name> (for example sdi-store/demo or "
        "s3://bucket/prefix/demo), or a YAML configuration whose run to report",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides when RUN is a configuration file"
    )
    parser.add_argument("--output", help=f"local HTML file (default: <run>/{REPORT_NAME})")
    parser.add_argument(
        "--tests", type=int, default=3, help="test examples to show in detail (default: 3)"
    )
    parser.add_argument(
        "--test-id",
        type=int,
        action="append",
        dest="test_ids",
        help="a test example to show in detail; repeat for several (overrides --tests)",
    )
    parser.add_argument(
        "--top", type=int, default=10, help="proponents and opponents per table (default: 10)"
    )
    parser.add_argument(
        "--weight",
        default="abs",
        help="influence mass for peak steps: abs (sum of |I_t|, the default) or positive "
        "(sum of max(I_t, 0))",
    )
    parser.add_argument(
        "--endpoint-url", help="S3-compatible endpoint of the store (credentials from AWS_*)"
    )


def open_report_run(args: argparse.Namespace) -> RunResults:
    """Open the run named on the command line, by folder URL or by configuration file."""
    from pipeline.analysis.results import RunResults, open_results

    if args.run.endswith((".yaml", ".yml")) and Path(args.run).is_file():
        from pipeline.config import load_config
        from pipeline.runner import open_run

        return RunResults(open_run(load_config(args.run, list(args.overrides))))
    if args.overrides:
        raise ValueError(
            f"overrides {args.overrides} need a configuration file, but {args.run!r} is a run "
            "folder; pass CONFIG key=value ... or drop the overrides"
        )
    storage = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    return open_results(args.run, storage)


def report_command(args: argparse.Namespace) -> str:
    """Run `sdi report` and return where the page was written."""
    if args.tests < 1 or args.top < 1:
        raise ValueError(f"--tests and --top must be at least 1, got {args.tests} and {args.top}")
    from pipeline.analysis.report import write_report

    results = open_report_run(args)
    return write_report(
        results,
        args.output,
        test_ids=args.test_ids,
        count=args.tests,
        k=args.top,
        weight=args.weight,
    )

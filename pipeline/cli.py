"""The `sdi` command line: run the pipeline or one of its stages."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import pandas as pd

from pipeline.analysis.command import add_report_arguments, report_command
from pipeline.config import STAGES, ConfigError, load_config
from pipeline.submit import JOB_COMMANDS, add_job_commands, run_job_command

logger = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdi",
        description="Step-resolved training-data attribution (SDI and TracIn) for looped transformers on Ray.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide progress bars (also SDI_PROGRESS=0)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every stage: prepare, train, sketch, reduce")
    run.add_argument("config", help="YAML configuration file, for example configs/demo.yaml")
    run.add_argument(
        "overrides", nargs="*", help="key=value overrides, for example sketch.dim=1024"
    )
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"run only the {stage} stage")
        sub.add_argument("config")
        sub.add_argument("overrides", nargs="*")
    add_report_arguments(
        commands.add_parser("report", help="write an HTML report of a finished run")
    )
    add_job_commands(commands)
    validate = commands.add_parser(
        "validate", help="compare sketched SDI with exact SDI on a sample of a run's examples"
    )
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")
    return parser


def print_summary(summary: dict[str, Any], run_url: str, examples: int = 3) -> None:
    """Print where the outputs are and the top proponents of a few test examples per step."""
    print(f"\nRun: {run_url}")
    train = summary.get("train")
    if train:
        for split in ("train", "test"):
            metrics = train.get(split, {})
            print(
                f"  {split} accuracy: {metrics.get('sequence_accuracy', float('nan')):.1%} of sequences, "
                f"{metrics.get('token_accuracy', float('nan')):.1%} of target tokens"
            )
    timings = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in summary["timings"].items())
    print(f"  timings: {timings}")

    counts = summary.get("counts")
    if counts:
        print(
            f"  counts: {counts['train_examples']} train and {counts['test_examples']} test "
            f"examples, {counts['checkpoints']} checkpoints, {counts['sketch_units']} sketch "
            f"units, {counts['score_rows']} score rows"
        )

    if "reduce" not in summary:
        return
    for name in ("scores", "tracin", "topk"):
        print(f"  {name}: {run_url}/{name}")
    topk = pd.read_parquet(
        f"{run_url}/topk", storage_options=summary.get("storage_options") or None
    )
    proponents = topk[(topk["direction"] == "proponent") & (topk["rank"] <= 3)]
    for test_id in sorted(proponents["test_id"].unique())[:examples]:
        print(f"\n  Top proponents of test example {test_id} (train_id:score):")
        rows = proponents[proponents["test_id"] == test_id]
        for step, group in rows.groupby("step"):
            label = "TracIn" if step == 0 else f"step {step}"
            pairs = "  ".join(f"{int(r.train_id)}:{r.score:.3g}" for r in group.itertuples())
            print(f"    {label:>8}: {pairs}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`sdi submit CONFIG --wait run_name=x`), which plain
    # parse_args rejects once the positional list has ended.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.no_progress:
        from pipeline.progress import set_enabled

        set_enabled(False)
    if args.command == "report":
        try:
            print(f"Report: {report_command(args)}")
        except (ConfigError, ValueError, KeyError, FileNotFoundError) as error:
            message = error.args[0] if isinstance(error, KeyError) else error
            print(f"sdi report: {message}", file=sys.stderr)
            return 2
        return 0
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    try:
        overrides = list(args.overrides)
        if args.command in STAGES:
            overrides.append(f"stages=[{args.command}]")
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"sdi: {error}", file=sys.stderr)
        return 2

    try:
        return run_command(args.command, config)
    except user_errors() as error:
        # Errors raised in Ray workers arrive wrapped; show the original message only.
        cause = getattr(error, "cause", None) or error
        print(f"sdi: {cause}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types that mean bad input or state, not a bug: no traceback."""
    from operators.capture import CaptureError
    from pipeline.checkpoints import CheckpointError
    from pipeline.data import DataError
    from pipeline.devices import PlacementError
    from pipeline.fingerprint import FingerprintMismatchError
    from pipeline.models import ModelSpecError
    from pipeline.reduce_stage import EtaError
    from pipeline.run import RunConfigMismatchError
    from pipeline.sketch_stage import SketchOverflowError
    from pipeline.step_matrix import StepMatrixError
    from pipeline.store import StoreError
    from pipeline.validate import ValidationError

    return (
        CaptureError,
        CheckpointError,
        DataError,
        PlacementError,
        FingerprintMismatchError,
        ModelSpecError,
        EtaError,
        RunConfigMismatchError,
        SketchOverflowError,
        StepMatrixError,
        StoreError,
        ValidationError,
    )


def run_command(command: str, config) -> int:
    """Run `validate`, the whole pipeline or one stage, and print the summary."""
    from pipeline.analysis.results import run_counts
    from pipeline.runner import open_run, run_pipeline

    if command == "validate":
        from pipeline.validate import format_summary, validate_run

        run = open_run(config)
        summary = validate_run(run, config)
        print(format_summary(summary))
        print(f"\nValidation: {run.url('validation')}")
        return 0
    summary = run_pipeline(config)
    run = open_run(config)
    summary["storage_options"] = run.store.options
    summary["counts"] = run_counts(run)
    print_summary(summary, run.url())
    return 0


if __name__ == "__main__":
    sys.exit(main())

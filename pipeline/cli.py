"""The `sdi` command line: run the pipeline or one of its stages."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import pandas as pd

from pipeline.config import STAGES, ConfigError, load_config

logger = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdi",
        description="Step-resolved training-data attribution (SDI and TracIn) for looped transformers on Ray.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        overrides = list(args.overrides)
        if args.command in STAGES:
            overrides.append(f"stages=[{args.command}]")
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"sdi: {error}", file=sys.stderr)
        return 2

    from pipeline.runner import open_run, run_pipeline

    if args.command == "validate":
        from pipeline.validate import format_summary, validate_run

        run = open_run(config)
        summary = validate_run(run, config)
        print(format_summary(summary))
        print(f"\nValidation: {run.url('validation')}")
        return 0
    summary = run_pipeline(config)
    run = open_run(config)
    summary["storage_options"] = run.store.options
    print_summary(summary, run.url())
    return 0


if __name__ == "__main__":
    sys.exit(main())

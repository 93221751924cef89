"""Run the benchmarks: `python -m benchmarks.run [--quick | --micro] [--out FILE.json]`.

Sections (all by default, or pick with --only): stage (sketch stage against a plain
forward and backward, the activation-only floor and the reference package), vmap
(materialised per-example gradients and a dense projection), memory (peak resident
memory per method, each in a fresh process), reduce, scaling. With --markdown the tables
are also written as Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from benchmarks import reduce as reduce_bench
from benchmarks import scaling
from benchmarks.common import Shape, machine, paired_timings, peak_rss_delta
from benchmarks.methods import METHODS, Infeasible
from benchmarks.report import render

logger = logging.getLogger("benchmarks")

SECTIONS = ("stage", "vmap", "memory", "reduce", "scaling")

PRESETS = {
    # widths, vmap widths, repeats, reduce sizes (n_train, n_test), scaling batches
    "full": {
        "widths": [64, 256, 512, 1024],
        "vmap_widths": [64, 128, 256, 512, 1024],
        "repeats": 7,
        "reduce": [(2048, 64), (4096, 256)],
        "actor_batches": 8,
        "sweep_repeats": 3,
    },
    "quick": {
        "widths": [64, 256, 512],
        "vmap_widths": [64, 128, 256],
        "repeats": 5,
        "reduce": [(2048, 64), (2048, 256)],
        "actor_batches": 4,
        "sweep_repeats": 2,
    },
    "micro": {
        "widths": [16],
        "vmap_widths": [16],
        "repeats": 1,
        "reduce": [(64, 4)],
        "actor_batches": 2,
        "sweep_repeats": 1,
        "shape": {"batch": 4, "tau": 2, "dim": 64, "seq": 6},
    },
}


def _build(name: str, shape: Shape) -> tuple:
    try:
        return METHODS[name](shape), None
    except Infeasible as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - a baseline failing is a result to record
        return None, f"{type(error).__name__}: {error}"


def stage_section(preset: dict, base: Shape, names: list[str]) -> list[dict]:
    rows = []
    for width in preset["widths"]:
        shape = Shape(**{**base.label(), "width": width})
        methods, notes = {}, {}
        for name in names:
            function, note = _build(name, shape)
            if function is None:
                notes[name] = note
            else:
                methods[name] = function
        logger.info("stage: width %d, methods %s", width, list(methods))
        timings = paired_timings(methods, preset["repeats"], baseline="plain")
        examples = 2 * shape.batch
        for timing in timings.values():
            timing["examples_per_s"] = examples / timing["median_s"]
        rows.append({"shape": shape.label(), "timings": timings, "not_run": notes})
    return rows


def memory_section(preset: dict, base: Shape) -> list[dict]:
    rows = []
    widths = sorted(set(preset["widths"]) | set(preset["vmap_widths"]))
    for width in widths:
        shape = Shape(**{**base.label(), "width": width})
        row = {"width": width}
        for name in ("plain", "stage", "reference", "vmap_projection", "vmap_only"):
            if name.startswith("vmap") and width not in preset["vmap_widths"]:
                continue
            logger.info("memory: width %d, %s", width, name)
            row[name] = peak_rss_delta("benchmarks.memory", [name, json.dumps(shape.label())])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    mode.add_argument("--micro", action="store_true", help="seconds; keeps the code running")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--markdown", help="write the tables as Markdown to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    preset_name = "full"
    if args.micro:
        preset_name = "micro"
    elif args.quick:
        preset_name = "quick"
    preset = PRESETS[preset_name]
    torch.set_num_threads(args.threads)
    base = Shape(**preset.get("shape", {}))
    started = time.time()
    results: dict = {
        "preset": preset_name,
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "base_shape": base.label(),
    }
    if "stage" in args.only:
        names = ["plain", "floor", "stage", "stage_fft", "stage_direct", "reference"]
        results["stage"] = stage_section(preset, base, names)
    if "vmap" in args.only:
        vmap_preset = {**preset, "widths": preset["vmap_widths"]}
        results["vmap"] = stage_section(vmap_preset, base, ["plain", "stage", "vmap_projection"])
    if "memory" in args.only:
        results["memory"] = memory_section(preset, base)
    if "reduce" in args.only:
        results["reduce"] = [
            reduce_bench.measure_reduce(
                n_train, n_test, base.tau, 3, dtype, max(1, preset["repeats"] // 2)
            )
            for n_train, n_test in preset["reduce"]
            for dtype in ("float32", "float16")
        ]
    if "scaling" in args.only:
        small = Shape(**{**base.label(), "width": min(64, base.width)})
        results["scaling"] = {
            "actors": scaling.actors(small, preset["actor_batches"]),
            "examples": scaling.sweep(
                small, "batch", [8, 32, 128][: 1 if args.micro else 3], preset["sweep_repeats"]
            ),
            "tau": scaling.sweep(
                small, "tau", [2, 8, 16][: 1 if args.micro else 3], preset["sweep_repeats"]
            ),
            "width": scaling.sweep(
                small,
                "width",
                [32, 64, 128, 256][: 1 if args.micro else 4],
                preset["sweep_repeats"],
            ),
            "dim": scaling.sweep(
                small, "dim", [512, 2048, 8192][: 1 if args.micro else 3], preset["sweep_repeats"]
            ),
        }
    results["seconds"] = time.time() - started
    with open("/proc/loadavg") as load:
        results["machine"]["loadavg_at_end"] = load.read().split()[:3]

    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(render(results))
    if not args.out and not args.markdown:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Markdown tables from the benchmark results (docs/benchmarks.md is built from these)."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def _stage_rows(section: list[dict]) -> list[list]:
    rows = []
    for entry in section:
        width = entry["shape"]["width"]
        for name, timing in entry["timings"].items():
            rows.append(
                [
                    width,
                    name,
                    timing["median_s"],
                    timing["examples_per_s"],
                    timing["ratio_to_plain"],
                ]
            )
        for name, note in entry["not_run"].items():
            rows.append([width, name, None, None, "not run: " + note])
    return rows


def render(results: dict) -> str:
    """Return the Markdown of every section present in `results`."""
    parts = [f"Command: `{results['command']}` (preset `{results['preset']}`).\n"]
    parts.append(
        _table(["key", "value"], [[key, value] for key, value in results["machine"].items()])
    )
    header = ["width", "method", "median s/batch", "examples/s", "x plain (paired median)"]
    if "stage" in results:
        parts.append("### Sketch stage against plain forward+backward and the reference\n")
        parts.append(_table(header, _stage_rows(results["stage"])))
    if "vmap" in results:
        parts.append("### Materialised per-example gradients (vmap) and a dense projection\n")
        parts.append(_table(header, _stage_rows(results["vmap"])))
    if "memory" in results:
        parts.append("### Peak resident memory per example (KiB, one batch, both sides)\n")
        names = ["plain", "stage", "reference", "vmap_projection", "vmap_only"]
        rows = []
        for row in results["memory"]:
            cells = [row["width"]]
            for name in names:
                value = row.get(name)
                if value is None:
                    cells.append(None)
                elif "per_example_kib" in value:
                    cells.append(value["per_example_kib"])
                else:
                    cells.append(value.get("infeasible") or value.get("error"))
            rows.append(cells)
        parts.append(_table(["width", *names], rows))
    if "reduce" in results:
        parts.append("### Reduce\n")
        keys = [
            "n_train",
            "n_test",
            "tau",
            "checkpoints",
            "dim",
            "dtype",
            "parquet_mib",
            "read_mib_per_s",
            "matmul_gflops",
            "kernel_vs_matmul",
            "read_and_kernel_vs_matmul",
            "end_to_end_s",
            "end_to_end_vs_matmul",
        ]
        parts.append(_table(keys, [[row[key] for key in keys] for row in results["reduce"]]))
    if "scaling" in results:
        scaling = results["scaling"]
        parts.append("### Scaling\n")
        parts.append(
            _table(["key", "value"], [[key, value] for key, value in scaling["actors"].items()])
        )
        for field in ("examples", "tau", "width", "dim"):
            rows = scaling[field]
            column = next(
                key for key in rows[0] if key not in ("seconds_per_batch", "examples_per_s")
            )
            parts.append(
                _table(
                    [column, "seconds per batch (both sides)", "examples/s"],
                    [
                        [row[column], row["seconds_per_batch"], row["examples_per_s"]]
                        for row in rows
                    ],
                )
            )
    return "\n".join(parts)

"""The benchmark command still runs (micro mode, seconds); timings are never asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import main


@pytest.mark.slow
def test_micro_benchmark_writes_every_requested_section(tmp_path) -> None:
    out = tmp_path / "bench.json"
    markdown = tmp_path / "bench.md"
    assert (
        main(
            ["--micro", "--only", "stage", "reduce", "--out", str(out), "--markdown", str(markdown)]
        )
        == 0
    )
    results = json.loads(out.read_text())
    timings = results["stage"][0]["timings"]
    assert {"plain", "floor", "stage", "stage_fft", "stage_direct"} <= set(timings)
    assert all(timing["median_s"] > 0 for timing in timings.values())
    # The reference package is optional: it either ran or records why not.
    assert "reference" in timings or "reference" in results["stage"][0]["not_run"]
    assert results["reduce"][0]["end_to_end_s"] > 0
    assert "### Reduce" in markdown.read_text()


def test_stage_paths_give_the_same_sketches() -> None:
    # The benchmark compares paths on speed; they must agree on the sketches themselves.
    import torch

    from benchmarks.common import Shape, make_batch, make_model
    from operators.gradients import build_layout, sketch_batch

    shape = Shape(width=16, tau=3, batch=5, seq=7, dim=64)
    model, batch = make_model(shape), make_batch(shape)
    for per_step in (False, True):
        sketches = [
            sketch_batch(
                model,
                model.body,
                model.tau,
                batch,
                build_layout(model.body, "tensorsketch", shape.dim, 0, path),
                per_step,
            ).sketches
            for path in ("fft", "direct", "auto")
        ]
        scale = sketches[0].abs().max()
        assert torch.allclose(sketches[0], sketches[1], atol=1e-5 * scale)
        assert torch.allclose(sketches[0], sketches[2], atol=1e-5 * scale)

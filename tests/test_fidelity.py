"""Estimator fidelity: unbiasedness per tensor, shape-free scale, and `sdi validate`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from operators.capture import ModuleUse, ParameterSpec
from operators.sketch import SketchAccumulator, SketchLayout
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.prepare import run_prepare
from pipeline.runner import open_run
from pipeline.train import train_model
from pipeline.validate import (
    ALL_SKETCHED,
    AllSketchedLayout,
    ValidationError,
    spearman,
    validate_run,
)

SHAPES = {"square": (32, 32), "wide": (64, 16)}
METHODS = ("tensorsketch", "pooled", ALL_SKETCHED)
DIM = 64  # below every module's numel, so no estimator stores them exactly


def make_layout(method: str, seed: int) -> tuple[SketchLayout, dict[str, list[int]]]:
    specs = [
        ParameterSpec(f"{module}.weight", "linear.weight", shape)
        for module, shape in SHAPES.items()
    ]
    if method == ALL_SKETCHED:
        layout = AllSketchedLayout(specs, DIM, seed)
    else:
        layout = SketchLayout(specs, method, DIM, seed)
    return layout, {module: [i] for i, module in enumerate(SHAPES)}


def factor_pair(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related examples' factors (a, d), shape (2, tokens, features)."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 6, in_features, generator=generator, dtype=torch.float64)
    d = torch.randn(1, 6, out_features, generator=generator, dtype=torch.float64)
    a = torch.cat([a, a + 0.7 * torch.randn(a.shape, generator=generator, dtype=torch.float64)])
    d = torch.cat([d, d + 0.7 * torch.randn(d.shape, generator=generator, dtype=torch.float64)])
    return a, d


def sketch_module(method: str, seed: int, module: str, a, d) -> torch.Tensor:
    """Sketch one module's gradient alone (the other module contributes nothing)."""
    layout, module_specs = make_layout(method, seed)
    accumulator = SketchAccumulator(
        layout, {module: module_specs[module]}, 2, 1, False, torch.device("cpu"), torch.float64
    )
    accumulator(ModuleUse(module, 1, a, d))
    return accumulator.result()[:, 0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("module", list(SHAPES))
def test_estimator_is_unbiased_per_tensor(method: str, module: str) -> None:
    a, d = factor_pair(SHAPES[module], seed=5)
    gradients = torch.einsum("bto,bti->boi", d, a)
    exact = float((gradients[0] * gradients[1]).sum())
    ratios = []
    for seed in range(300):
        sketch = sketch_module(method, seed, module, a, d)
        ratios.append(float(sketch[0] @ sketch[1]) / exact)
    mean = sum(ratios) / len(ratios)
    assert abs(mean - 1.0) < 0.05, f"{method} on {module}: mean ratio {mean:.3f}"


@pytest.mark.parametrize("method", METHODS)
def test_sketch_scale_does_not_depend_on_module_shape(method: str) -> None:
    # E||S(g)||^2 = ||g||^2 for both shapes: the same gradient norm gives the same sketch norm.
    means = {}
    for module, shape in SHAPES.items():
        a, d = factor_pair(shape, seed=9)
        gradient = torch.einsum("bto,bti->boi", d, a)[0]
        ratios = []
        for seed in range(300):
            sketch = sketch_module(method, seed, module, a, d)[0]
            ratios.append(float(sketch @ sketch) / float((gradient * gradient).sum()))
        means[module] = sum(ratios) / len(ratios)
    assert abs(means["square"] - 1.0) < 0.05, means
    assert abs(means["wide"] - 1.0) < 0.05, means


def test_pooled_cross_tensor_terms_vanish_on_average() -> None:
    # Both modules share the pooled block; the sketch of their sum must still be unbiased.
    a1, d1 = factor_pair(SHAPES["square"], seed=1)
    a2, d2 = factor_pair(SHAPES["wide"], seed=2)
    g1 = torch.einsum("bto,bti->boi", d1, a1)
    g2 = torch.einsum("bto,bti->boi", d2, a2)
    exact = float((g1[0] * g1[1]).sum() + (g2[0] * g2[1]).sum())
    ratios = []
    for seed in range(300):
        layout, module_specs = make_layout("pooled", seed)
        assert layout.total_dim == DIM
        accumulator = SketchAccumulator(
            layout, module_specs, 2, 1, False, torch.device("cpu"), torch.float64
        )
        accumulator(ModuleUse("square", 1, a1, d1))
        accumulator(ModuleUse("wide", 1, a2, d2))
        sketch = accumulator.result()[:, 0]
        ratios.append(float(sketch[0] @ sketch[1]) / exact)
    assert abs(sum(ratios) / len(ratios) - 1.0) < 0.05


def test_pooled_layout_small_tensors_exact() -> None:
    specs = [
        ParameterSpec("fc.weight", "linear.weight", (64, 16)),
        ParameterSpec("fc.bias", "linear.bias", (64,)),
    ]
    layout = SketchLayout(specs, "pooled", 1024, 3)
    again = SketchLayout(specs, "pooled", 1024, 3)
    assert [slot.method for slot in layout.slots] == ["pooled", "identity"]
    assert layout.total_dim == 1024 + 64
    assert layout.by_name["fc.weight"].offset == 64  # the pool follows the exact tensors
    assert layout.hash_digest() == again.hash_digest()
    assert layout.hash_digest() != SketchLayout(specs, "pooled", 1024, 4).hash_digest()


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = np.random.default_rng(0)
    x = generator.normal(size=200)
    y = x + generator.normal(size=200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


TINY = [
    "run_name=tiny",
    "task.n_train=12",
    "task.n_test=6",
    "task.n_bits=5",
    "task.shard_size=8",
    "model.d_model=16",
    "model.n_heads=2",
    "model.tau=3",
    "train.steps=6",
    "train.num_checkpoints=2",
    "train.warmup_steps=1",
    "validate.n_train=8",
    "validate.n_test=4",
    "validate.dims=[64,256]",
    "validate.seeds=[0]",
    "validate.reference=false",
]


def test_validate_writes_metrics_summary_and_plot(tmp_path, capsys) -> None:
    config = load_config("configs/demo.yaml", [f"store={tmp_path}", *TINY])
    run = open_run(config)
    shards = run_prepare(run, config)
    train_model(run, config, shards, torch.device("cpu"))

    assert main(["validate", "configs/demo.yaml", f"store={tmp_path}", *TINY]) == 0
    assert "tensorsketch" in capsys.readouterr().out

    folder = tmp_path / "tiny" / "validation"
    metrics = pd.read_parquet(folder / "metrics.parquet")
    summary = json.loads((folder / "summary.json").read_text())
    assert (folder / "error_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert set(metrics["estimator"]) == {"tensorsketch", "pooled", ALL_SKETCHED}
    assert set(metrics["step"]) == {0, 1, 2, 3}
    # Exact SDI summed over steps equals autograd TracIn, and the step matrix sums to SDI.
    assert summary["checks"]["exact_conservation_error"] < 1e-5
    assert summary["checks"]["exact_step_matrix_error"] < 1e-10
    conservation = metrics[metrics["metric"] == "conservation_error"]["value"]
    assert (conservation < 1e-6).all()


def test_validate_refuses_a_run_without_checkpoints(tmp_path) -> None:
    config = load_config("configs/demo.yaml", [f"store={tmp_path}", *TINY])
    with pytest.raises(ValidationError, match="no checkpoints"):
        validate_run(open_run(config), config)


@pytest.mark.parametrize("method", ["tensorsketch", "pooled", "exact"])
def test_step_matrix_summed_over_train_steps_equals_sdi(method: str) -> None:
    from operators.batching import collate
    from operators.gradients import build_layout, sketch_batch
    from tests.test_capture import make_model, random_examples

    model = make_model()
    batch = collate(*random_examples(4, 6, seed=3), pad_id=5)
    layout = build_layout(model.body, method, 256, 0)
    train_steps = sketch_batch(model, model.body, model.tau, batch, layout, True).sketches
    train_total = sketch_batch(model, model.body, model.tau, batch, layout, False)
    train_total = train_total.sketches[:, 0]
    test_steps = train_steps.flip(0)  # any per-step test sketches of the same layout
    matrix = torch.einsum("nsd,mtd->nmst", train_steps.double(), test_steps.double())
    sdi = torch.einsum("nd,mtd->nmt", train_total.double(), test_steps.double())
    assert torch.allclose(matrix.sum(dim=2), sdi, rtol=1e-5, atol=1e-6 * sdi.abs().max())


def test_step_matrix_table_arranges_and_checks_conservation() -> None:
    from pipeline.step_matrix import (
        StepMatrixError,
        collapse_steps,
        step_matrix_table,
        step_products,
    )

    rng = np.random.default_rng(0)
    tau, dim = 3, 5
    train_ids = np.array([7, 3])
    # Rows in shuffled order: collapse_steps must sort them by (example_id, step).
    ids = np.repeat(train_ids, tau)
    steps = np.tile(np.arange(1, tau + 1), 2)
    values = rng.normal(size=(2 * tau, dim)).astype(np.float32)
    shuffle = rng.permutation(len(ids))
    unique, totals, per_step = collapse_steps(ids[shuffle], steps[shuffle], values[shuffle])
    assert unique.tolist() == [3, 7]
    test_ids = np.array([100, 101])
    test_values = rng.normal(size=(2 * tau, dim)).astype(np.float32)  # rows (test, step)
    order = np.arange(2 * tau)
    matrix = step_products(per_step, test_values, 0.5)
    scores = 0.5 * np.einsum("nd,md->nm", totals.astype(np.float64), test_values)
    scores = scores.reshape(2, 2, tau)
    table = step_matrix_table(matrix, order, unique, test_ids, scores).to_pandas()
    row = table[
        (table.train_id == 7)
        & (table.test_id == 101)
        & (table.train_step == 2)
        & (table.test_step == 3)
    ]
    expected = 0.5 * float(values[(ids == 7) & (steps == 2)][0] @ test_values[1 * tau + 2])
    assert row.score.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(StepMatrixError, match="differs from SDI"):
        step_matrix_table(matrix, order, unique, test_ids, scores + 1.0)

"""`sdi validate`: sketched SDI against the exact (full-gradient) SDI of the same run.

On a fixed sample of a run's train and test examples, and over all its checkpoints
(weighted by eta_k), this computes

- exact SDI from unsketched per-example, per-step gradients (identity layout), and
  TracIn from plain autograd gradients of the whole body (an independent check of
  conservation: summed over steps, exact SDI must equal it);
- sketched SDI for every configured estimator, dimension and seed, through the same
  operators the sketch stage uses (train side summed over steps, test side per step);
- optionally the reference package `step-decomposed-influence` (`pipeline.reference`).

It writes `<run>/validation/metrics.parquet` (tidy: one row per estimator, dim, seed,
metric and step), `summary.json` and `error_vs_bytes.png`. No Ray is needed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import DictConfig

from operators.batching import collate, iter_batches
from operators.capture import body_parameter_specs
from operators.gradients import sketch_batch
from operators.model import LoopedGPT, per_example_loss
from operators.sketch import SketchLayout, TensorSlot
from operators.tasks import make_task
from pipeline.checkpoints import list_checkpoints, load_checkpoint
from pipeline.data import read_shard
from pipeline.reduce_stage import checkpoint_eta
from pipeline.run import Run

logger = logging.getLogger(__name__)

BYTES_PER_FLOAT = {"float32": 4, "float16": 2}
ALL_SKETCHED = "tensorsketch-all"  # TensorSketch/CountSketch on every tensor, no identity


class ValidationError(RuntimeError):
    """A run cannot be validated (missing checkpoints or data, bad settings)."""


class AllSketchedLayout(SketchLayout):
    """A tensorsketch layout that sketches every tensor, however small (as the reference does)."""

    def __init__(self, specs, dim: int, seed: int) -> None:
        super().__init__(specs, "tensorsketch", dim, seed)
        self.method = ALL_SKETCHED

    def _make_slot(self, spec, offset: int) -> TensorSlot:
        return self._hashed_slot(spec, offset)


@dataclass
class Sample:
    """Examples of one split, in a fixed order."""

    example_ids: list[int]
    input_ids: list[list[int]]
    targets: list[list[int]]


def sample_split(run: Run, split: str, count: int, model: LoopedGPT) -> Sample:
    """Return `count` examples of a split, evenly spread over its ids (deterministic)."""
    paths = run.store.list(run.rel("data", split), suffix=".parquet")
    if not paths:
        raise ValidationError(f"run {run.url()} has no {split} data; run the prepare stage first")
    ids, inputs, targets = [], [], []
    for path in paths:
        shard = read_shard(run.store, path, model.config.vocab_size, model.config.context_length)
        ids += shard.example_ids
        inputs += shard.input_ids
        targets += shard.targets
    order = np.argsort(ids, kind="stable")
    count = min(count, len(order))
    pick = order[np.linspace(0, len(order) - 1, count).round().astype(int)]
    return Sample([ids[i] for i in pick], [inputs[i] for i in pick], [targets[i] for i in pick])


def sample_sketches(
    model: LoopedGPT,
    layout: SketchLayout,
    sample: Sample,
    per_step: bool,
    pad_id: int,
    loss_reduction: str,
    batch_size: int,
) -> torch.Tensor:
    """Sketch a sample with the stage's operator; returns float64 (n, tau or 1, D)."""
    parts = []
    for batch in iter_batches(sample.input_ids, sample.targets, pad_id, batch_size):
        result = sketch_batch(model, model.body, model.tau, batch, layout, per_step, loss_reduction)
        parts.append(result.sketches.double())
    return torch.cat(parts)


def autograd_body_gradients(
    model: LoopedGPT, sample: Sample, pad_id: int, loss_reduction: str
) -> torch.Tensor:
    """Return each example's whole body gradient by plain autograd, in layout order (n, D)."""
    specs, _ = body_parameter_specs(model.body)
    parameters = dict(model.body.named_parameters())
    rows = []
    for ids, targets in zip(sample.input_ids, sample.targets, strict=True):
        batch = collate([ids], [targets], pad_id)
        loss = per_example_loss(
            model(batch.input_ids, batch.attention_mask), batch.targets, loss_reduction
        )
        grads = torch.autograd.grad(loss.sum(), [parameters[spec.name] for spec in specs])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def rank(values: np.ndarray) -> np.ndarray:
    """Return ranks 0..n-1 (ties broken by position; scores are continuous)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank(x), rank(y))


def relative_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def topk_overlap(estimate: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over test examples of |top-k proponents(estimate) & top-k(exact)| / k.

    Both arrays are (n_train, n_test); proponents are the largest scores.
    """
    k = min(k, exact.shape[0])
    top_estimate = np.argsort(-estimate, axis=0, kind="stable")[:k]
    top_exact = np.argsort(-exact, axis=0, kind="stable")[:k]
    shared = [
        len(set(top_estimate[:, j]) & set(top_exact[:, j])) / k for j in range(exact.shape[1])
    ]
    return float(np.mean(shared))


def compare(
    sketched_sdi: np.ndarray, exact_sdi: np.ndarray, sketched_tracin: np.ndarray, k: int
) -> list[tuple[str, int, float]]:
    """Return (metric, step, value) rows; step 0 is the whole trajectory or TracIn.

    `sketched_tracin` is computed from the summed sketches independently of the step
    scores, so `conservation_error` measures sum_t I_t against TracIn in sketch space.
    """
    rows = [("sdi_rel_error", 0, relative_error(sketched_sdi, exact_sdi))]
    exact_tracin = exact_sdi.sum(axis=2)
    rows.append(("tracin_rel_error", 0, relative_error(sketched_tracin, exact_tracin)))
    rows.append(("sdi_pearson", 0, pearson(sketched_sdi.ravel(), exact_sdi.ravel())))
    rows.append(("sdi_spearman", 0, spearman(sketched_sdi.ravel(), exact_sdi.ravel())))
    rows.append(("tracin_pearson", 0, pearson(sketched_tracin.ravel(), exact_tracin.ravel())))
    rows.append(("tracin_spearman", 0, spearman(sketched_tracin.ravel(), exact_tracin.ravel())))
    rows.append(("topk_overlap", 0, topk_overlap(sketched_tracin, exact_tracin, k)))
    conservation = relative_error(sketched_sdi.sum(axis=2), sketched_tracin)
    rows.append(("conservation_error", 0, conservation))
    for step in range(exact_sdi.shape[2]):
        estimate, exact = sketched_sdi[:, :, step], exact_sdi[:, :, step]
        rows.append(("sdi_rel_error", step + 1, relative_error(estimate, exact)))
        rows.append(("topk_overlap", step + 1, topk_overlap(estimate, exact, k)))
    return rows


def estimator_layouts(specs, config: DictConfig) -> list[tuple[str, int, int, SketchLayout]]:
    """List (estimator, dim, seed, layout) for every configured combination."""
    methods = list(config.validate.methods)
    if config.validate.all_sketched and ALL_SKETCHED not in methods:
        methods.append(ALL_SKETCHED)
    layouts = []
    for method in methods:
        for dim in config.validate.dims:
            for seed in config.validate.seeds:
                if method == ALL_SKETCHED:
                    layout = AllSketchedLayout(specs, int(dim), int(seed))
                else:
                    layout = SketchLayout(specs, method, int(dim), int(seed))
                layouts.append((method, int(dim), int(seed), layout))
    return layouts


def validate_run(run: Run, config: DictConfig) -> dict[str, Any]:
    """Compute every estimator's errors against exact SDI and write them into the run."""
    started = time.perf_counter()
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise ValidationError(
            f"run {run.url()} has no checkpoints; run `sdi run` (or the train stage) first"
        )
    settings = config.validate
    if settings.n_train < 1 or settings.n_test < 1:
        raise ValidationError("validate.n_train and validate.n_test must be at least 1")
    task = make_task(config.task)
    reduction = config.sketch.loss_reduction
    bytes_per_float = BYTES_PER_FLOAT[config.sketch.dtype]
    use_reference = _reference_wanted(settings.reference)

    exact_sdi = exact_matrix = autograd_tracin = None
    sketched: dict[tuple, dict[str, Any]] = {}
    reference: dict[tuple, np.ndarray] = {}
    for info in checkpoints:
        eta = checkpoint_eta(info, config.reduce.get("eta"))
        model = load_checkpoint(run, info)
        train = sample_split(run, "train", settings.n_train, model)
        test = sample_split(run, "test", settings.n_test, model)
        specs, _ = body_parameter_specs(model.body)

        exact_layout = SketchLayout(specs, "exact", 0, 0)
        args = (task.pad_id, reduction, settings.batch_size)
        train_steps = sample_sketches(model, exact_layout, train, True, *args)
        test_steps = sample_sketches(model, exact_layout, test, True, *args)
        train_total = train_steps.sum(dim=1)
        sdi = eta * torch.einsum("nd,mtd->nmt", train_total, test_steps)
        matrix = eta * torch.einsum("nsd,mtd->nmst", train_steps, test_steps)
        test_autograd = autograd_body_gradients(model, test, task.pad_id, reduction)
        tracin = eta * train_total @ test_autograd.T
        exact_sdi = sdi if exact_sdi is None else exact_sdi + sdi
        exact_matrix = matrix if exact_matrix is None else exact_matrix + matrix
        autograd_tracin = tracin if autograd_tracin is None else autograd_tracin + tracin

        for method, dim, seed, layout in estimator_layouts(specs, config):
            train_sketch = sample_sketches(model, layout, train, False, *args)[:, 0]
            test_sketch = sample_sketches(model, layout, test, True, *args)
            entry = sketched.setdefault(
                (method, dim, seed), {"total_dim": layout.total_dim, "sdi": 0.0, "tracin": 0.0}
            )
            entry["sdi"] = entry["sdi"] + eta * torch.einsum(
                "nd,mtd->nmt", train_sketch, test_sketch
            )
            entry["tracin"] = entry["tracin"] + eta * train_sketch @ test_sketch.sum(dim=1).T

        if use_reference:
            from pipeline.reference import reference_sdi

            for key, value in reference_sdi(
                model, train, test, task.pad_id, reduction, settings
            ).items():
                reference[key] = value * eta + reference.get(key, 0.0)
        logger.info("run %s: validated checkpoint %d (eta=%.3g)", run.name, info.step, eta)

    exact = exact_sdi.numpy()
    rows = []
    for (method, dim, seed), entry in sketched.items():
        for metric, step, value in compare(
            entry["sdi"].numpy(), exact, entry["tracin"].numpy(), settings.topk
        ):
            rows.append((method, dim, seed, entry["total_dim"], metric, step, value))
    checks = exact_checks(exact, exact_matrix.numpy(), autograd_tracin.numpy())
    if reference:
        rows += reference_rows(reference, exact, settings.topk, len(specs), checks)

    frame = pd.DataFrame(
        rows, columns=["estimator", "dim", "seed", "total_dim", "metric", "step", "value"]
    )
    frame["bytes_per_example"] = frame["total_dim"] * bytes_per_float
    summary = summarise(frame, checks, run, config, time.perf_counter() - started)
    write_outputs(run, frame, summary)
    return summary


def exact_checks(exact: np.ndarray, matrix: np.ndarray, autograd_tracin: np.ndarray) -> dict:
    """Conservation of the exact baseline: steps against autograd TracIn, step matrix against SDI."""
    return {
        "exact_conservation_error": relative_error(exact.sum(axis=2), autograd_tracin),
        "exact_step_matrix_error": relative_error(matrix.sum(axis=2), exact),
        "exact_sdi_norm": float(np.linalg.norm(exact)),
    }


def reference_rows(
    reference: dict[tuple, np.ndarray], exact: np.ndarray, k: int, tensors: int, checks: dict
) -> list[tuple]:
    """Metrics of the reference package's estimators; its exact baseline goes into `checks`."""
    rows = []
    full = reference.pop(("reference-exact", 0, 0), None)
    if full is not None:
        checks["reference_exact_max_abs_diff"] = float(np.abs(full - exact).max())
        checks["reference_exact_rel_error"] = relative_error(full, exact)
    for (method, dim, seed), sdi in reference.items():
        for metric, step, value in compare(sdi, exact, sdi.sum(axis=2), k):
            rows.append((method, dim, seed, dim * tensors, metric, step, value))
    return rows


def summarise(
    frame: pd.DataFrame, checks: dict, run: Run, config: DictConfig, seconds: float
) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every overall metric."""
    overall = frame[frame["step"] == 0]
    grouped = overall.groupby(["estimator", "dim", "bytes_per_example", "metric"])["value"]
    table = grouped.agg(["mean", "std"]).reset_index()
    records = []
    for (estimator, dim, nbytes), group in table.groupby(["estimator", "dim", "bytes_per_example"]):
        record = {"estimator": estimator, "dim": int(dim), "bytes_per_example": int(nbytes)}
        for row in group.itertuples():
            record[row.metric] = row.mean
            record[f"{row.metric}_std"] = None if np.isnan(row.std) else row.std
        records.append(record)
    return {
        "run": run.url(),
        "checkpoints": [info.step for info in list_checkpoints(run)],
        "n_train": int(config.validate.n_train),
        "n_test": int(config.validate.n_test),
        "seeds": list(config.validate.seeds),
        "storage_dtype": config.sketch.dtype,
        "seconds": seconds,
        "checks": checks,
        "estimators": records,
    }


def write_outputs(run: Run, frame: pd.DataFrame, summary: dict[str, Any]) -> None:
    """Write metrics.parquet, summary.json and the error-versus-bytes plot under validation/."""
    run.store.write_table(
        run.rel("validation", "metrics.parquet"), pa.Table.from_pandas(frame, preserve_index=False)
    )
    run.store.write_json(run.rel("validation", "summary.json"), summary)
    run.store.write_bytes(run.rel("validation", "error_vs_bytes.png"), plot_error(frame))
    logger.info("run %s: validation written to %s", run.name, run.url("validation"))


def plot_error(frame: pd.DataFrame) -> bytes:
    """Return a PNG of SDI relative error against stored bytes per example, one line per estimator."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = frame[(frame["metric"] == "sdi_rel_error") & (frame["step"] == 0)]
    figure, axes = plt.subplots(figsize=(6, 4))
    for estimator, group in data.groupby("estimator"):
        stats = group.groupby("bytes_per_example")["value"].agg(["mean", "std"]).fillna(0.0)
        axes.errorbar(
            stats.index, stats["mean"], yerr=stats["std"], marker="o", label=estimator, capsize=3
        )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("stored bytes per example and row")
    axes.set_ylabel("relative error of SDI")
    axes.axhline(0.04, color="grey", linestyle=":", label="target 0.04")
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _reference_wanted(setting: str) -> bool:
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise ValidationError(f"validate.reference={setting!r} is invalid; use auto, true or false")
    if setting == "false":
        return False
    try:
        import sdi  # noqa: F401
    except ImportError as error:
        if setting == "true":
            raise ValidationError(
                "validate.reference=true needs the reference package: "
                'pip install -e ".[reference]" (step-decomposed-influence 0.1.1)'
            ) from error
        logger.info("reference package step-decomposed-influence not installed; skipping it")
        return False
    return True


def format_summary(summary: dict[str, Any]) -> str:
    """Return the summary as a fixed-width table for the terminal."""
    lines = [
        f"{'estimator':<22}{'dim':>6}{'bytes':>8}{'SDI err':>10}{'TracIn err':>11}"
        f"{'Spearman':>10}{'top-k':>7}{'conserv.':>10}"
    ]
    for record in summary["estimators"]:
        lines.append(
            f"{record['estimator']:<22}{record['dim']:>6}{record['bytes_per_example']:>8}"
            f"{record.get('sdi_rel_error', float('nan')):>10.4f}"
            f"{record.get('tracin_rel_error', float('nan')):>11.4f}"
            f"{record.get('sdi_spearman', float('nan')):>10.4f}"
            f"{record.get('topk_overlap', float('nan')):>7.2f}"
            f"{record.get('conservation_error', float('nan')):>10.1e}"
        )
    lines.append(json.dumps(summary["checks"], indent=None))
    return "\n".join(lines)

"""A tiny configuration through every stage on a local Ray instance, checked with pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.checkpoints import list_checkpoints, load_checkpoint
from pipeline.config import load_config
from pipeline.fingerprint import FINGERPRINT_KEY
from pipeline.runner import open_run, run_pipeline
from tests.oracle import unrolled_step_gradients

pytestmark = pytest.mark.ray

TINY = [
    "task.n_bits=4",
    "task.n_train=10",
    "task.n_test=4",
    "task.shard_size=4",
    "model.d_model=16",
    "model.n_heads=2",
    "model.tau=3",
    "train.steps=20",
    "train.warmup_steps=2",
    "train.num_checkpoints=2",
    "train.lr=0.01",
    "sketch.dim=64",
    "sketch.batch_size=3",
    "reduce.topk=3",
    "ray.num_actors=2",
]


def as_long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def tiny_config(tmp_path, *extra: str):
    return load_config("configs/demo.yaml", [f"store={tmp_path}", *TINY, *extra])


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, ray_session):
    config = tiny_config(tmp_path_factory.mktemp("store"), "run_name=exact", "sketch.method=exact")
    summary = run_pipeline(config)
    return config, summary


def test_scores_contract(exact_run) -> None:
    config, _ = exact_run
    run = open_run(config)
    scores = pd.read_parquet(run.url("scores"))
    assert list(scores.columns) == ["test_id", "train_id", "step", "score"]
    assert scores["test_id"].dtype == np.int64
    assert scores["train_id"].dtype == np.int64
    assert pd.api.types.is_integer_dtype(scores["step"])
    assert len(scores) == 4 * 10 * 3
    assert not scores.duplicated(["test_id", "train_id", "step"]).any()
    assert sorted(scores["step"].unique()) == [1, 2, 3]


def test_tracin_is_sum_of_steps(exact_run) -> None:
    config, _ = exact_run
    run = open_run(config)
    scores = pd.read_parquet(run.url("scores"))
    tracin = pd.read_parquet(run.url("tracin"))
    assert list(tracin.columns) == ["test_id", "train_id", "score"]
    assert len(tracin) == 40
    summed = scores.groupby(["test_id", "train_id"], as_index=False)["score"].sum()
    merged = tracin.merge(summed, on=["test_id", "train_id"], suffixes=("", "_steps"))
    assert len(merged) == 40
    np.testing.assert_allclose(merged["score"], merged["score_steps"], rtol=1e-12, atol=1e-12)


def test_exact_scores_match_unrolled_oracle(exact_run) -> None:
    config, _ = exact_run
    run = open_run(config)
    data = {split: pd.read_parquet(run.url("data", split)) for split in ("train", "test")}
    expected: dict[tuple[int, int, int], float] = {}
    for info in list_checkpoints(run):
        model = load_checkpoint(run, info).double()
        train_grads = {}
        for row in data["train"].itertuples():
            steps = unrolled_step_gradients(model, as_long(row.input_ids), as_long(row.targets))
            train_grads[row.example_id] = torch.cat(
                [sum(step[name] for step in steps).reshape(-1) for name in steps[0]]
            )
        for row in data["test"].itertuples():
            steps = unrolled_step_gradients(model, as_long(row.input_ids), as_long(row.targets))
            for t, step in enumerate(steps, 1):
                phi = torch.cat([step[name].reshape(-1) for name in step])
                for train_id, grad in train_grads.items():
                    key = (row.example_id, train_id, t)
                    expected[key] = expected.get(key, 0.0) + info.lr * float(grad @ phi)

    scores = pd.read_parquet(run.url("scores")).set_index(["test_id", "train_id", "step"])["score"]
    keys = list(expected)
    oracle = np.array([expected[key] for key in keys])
    computed = scores.loc[keys].to_numpy()
    scale = np.abs(oracle).max()
    np.testing.assert_allclose(computed, oracle, rtol=1e-4, atol=1e-5 * scale)


def test_sketch_files_carry_fingerprint(exact_run) -> None:
    config, _ = exact_run
    run = open_run(config)
    sketches = run.store.list(run.rel("sketches"), suffix=".parquet")
    assert len(sketches) == 2 * (3 + 1)  # 2 checkpoints x (3 train + 1 test shards)
    for path in sketches:
        metadata = pq.read_schema(run.store.path(path)).metadata
        assert FINGERPRINT_KEY in metadata
    score_metadata = pq.read_schema(
        run.store.path(run.rel("scores", "part-00000.parquet"))
    ).metadata
    assert FINGERPRINT_KEY in score_metadata


def test_topk_contract(exact_run) -> None:
    config, _ = exact_run
    run = open_run(config)
    topk = pd.read_parquet(run.url("topk"))
    tracin = pd.read_parquet(run.url("tracin"))
    assert set(topk["step"].unique()) == {0, 1, 2, 3}
    counts = topk.groupby(["test_id", "step", "direction"]).size()
    assert (counts == 3).all()
    best = topk[(topk["step"] == 0) & (topk["direction"] == "proponent") & (topk["rank"] == 1)]
    for row in best.itertuples():
        pair_scores = tracin[tracin["test_id"] == row.test_id]["score"]
        assert row.score == pytest.approx(pair_scores.max())


def test_sketched_run_conserves_tracin(tmp_path, ray_session) -> None:
    config = tiny_config(tmp_path, "run_name=sketched")
    run_pipeline(config)
    run = open_run(config)
    scores = pd.read_parquet(run.url("scores"))
    tracin = pd.read_parquet(run.url("tracin"))
    summed = scores.groupby(["test_id", "train_id"])["score"].sum()
    joined = tracin.set_index(["test_id", "train_id"])["score"]
    np.testing.assert_allclose(joined.loc[summed.index], summed, rtol=1e-10)


def test_step_matrix_sums_to_sdi(tmp_path, ray_session) -> None:
    config = tiny_config(tmp_path, "run_name=steps", "sketch.step_matrix=true")
    run_pipeline(config)
    run = open_run(config)
    matrix = pd.read_parquet(run.url("step_matrix"))
    scores = pd.read_parquet(run.url("scores"))
    assert len(matrix) == 4 * 10 * 3 * 3
    assert not matrix.duplicated(["test_id", "train_id", "train_step", "test_step"]).any()
    summed = matrix.groupby(["test_id", "train_id", "test_step"])["score"].sum()
    summed.index = summed.index.set_names("step", level="test_step")
    expected = scores.set_index(["test_id", "train_id", "step"])["score"]
    np.testing.assert_allclose(summed.loc[expected.index], expected, rtol=1e-5, atol=1e-9)

"""Guards and bad inputs: each fails with a clear error naming the value or file, or is flagged."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators.batching import collate
from operators.gradients import build_layout, sketch_batch
from operators.model import LoopedGPT, LoopedGPTConfig
from pipeline import fingerprint as fp
from pipeline.checkpoints import CheckpointError, CheckpointInfo, load_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, read_shard
from pipeline.prepare import DATA_SCHEMA
from pipeline.reduce_stage import (
    EtaError,
    checkpoint_eta,
    read_sketches,
    reduce_train_shard,
    write_flagged,
)
from pipeline.run import Run, RunConfigMismatchError
from pipeline.sketch_stage import SketchOverflowError, sketch_table, warn_duplicate_checkpoints
from pipeline.store import Store, StoreError

VOCAB, CONTEXT = 4, 8


def fingerprint(**changes) -> dict:
    base = {
        "sketch_method": "tensorsketch",
        "sketch_seed": 0,
        "sketch_dim": 8,
        "total_dim": 16,
        "hash_digest": "abc",
        "parameters": ["w"],
        "loss_reduction": "sum",
        "dtype": "float32",
        "checkpoint_hash": "c1",
        "model_fingerprint": "m1",
        "code_version": "0.1.0",
        "tau": 2,
    }
    return base | changes


def write_sketches(store, path, ids, values, per_step, dtype="float32", **changes) -> None:
    sketches = torch.tensor(values, dtype=torch.float32)
    table = sketch_table(
        ids,
        sketches,
        torch.zeros(len(ids)),
        torch.ones(len(ids), dtype=torch.bool),
        per_step,
        dtype,
        fingerprint(dtype=dtype, total_dim=sketches.shape[-1], **changes),
    )
    store.write_table(path, table)


def write_data(store, path, ids, input_ids, targets) -> None:
    table = pa.table(
        {"example_id": ids, "input_ids": input_ids, "targets": targets}, schema=DATA_SCHEMA
    )
    store.write_table(path, table)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path))


# Guards


def test_fingerprint_mismatch_names_the_field(store) -> None:
    write_sketches(store, "r/a.parquet", [1], np.ones((1, 1, 16)), False)
    write_sketches(store, "r/b.parquet", [2], np.ones((1, 1, 16)), False, sketch_seed=1)
    with pytest.raises(fp.FingerprintMismatchError, match="'sketch_seed'.*a.parquet.*b.parquet"):
        read_sketches(store, ["r/a.parquet", "r/b.parquet"])


def test_mixed_dtypes_in_one_prefix_are_refused(store) -> None:
    write_sketches(store, "r/a.parquet", [1], np.ones((1, 1, 16)), False)
    write_sketches(store, "r/b.parquet", [2], np.ones((1, 1, 16)), False, dtype="float16")
    with pytest.raises(fp.FingerprintMismatchError, match="'dtype'"):
        read_sketches(store, store.list("r", ".parquet"))


def test_mixed_dimensions_in_one_prefix_are_refused(store) -> None:
    write_sketches(store, "r/a.parquet", [1], np.ones((1, 1, 16)), False)
    write_sketches(store, "r/b.parquet", [2], np.ones((1, 1, 32)), False, sketch_dim=16)
    with pytest.raises(fp.FingerprintMismatchError, match="'sketch_dim'"):
        read_sketches(store, store.list("r", ".parquet"))


def test_sketch_width_disagreeing_with_its_fingerprint_is_refused(store) -> None:
    table = sketch_table(
        [1],
        torch.ones(1, 1, 16),
        torch.zeros(1),
        torch.ones(1, dtype=torch.bool),
        False,
        "float32",
        fingerprint(total_dim=32),
    )
    store.write_table("r/a.parquet", table)
    with pytest.raises(fp.FingerprintMismatchError, match="dimension 16.*dimension 32"):
        read_sketches(store, ["r/a.parquet"])


def test_different_config_needs_overwrite_and_keeps_old_results(store) -> None:
    run = Run(store, "nightly")
    run.claim(load_config("configs/demo.yaml", ["run_name=nightly"]))
    store.write_bytes(run.rel("scores", "part-00000.parquet"), b"old results")
    changed = load_config("configs/demo.yaml", ["run_name=nightly", "sketch.dim=512"])

    with pytest.raises(RunConfigMismatchError, match=r"sketch\.dim: recorded 2048, requested 512"):
        run.claim(changed)
    assert store.read_bytes(run.rel("scores", "part-00000.parquet")) == b"old results"

    overwrite = load_config(
        "configs/demo.yaml", ["run_name=nightly", "sketch.dim=512", "overwrite=true"]
    )
    run.claim(overwrite)
    assert not store.exists(run.rel("scores", "part-00000.parquet"))


def test_execution_keys_skip_config_check(store) -> None:
    run = Run(store, "nightly")
    run.claim(load_config("configs/demo.yaml", ["run_name=nightly"]))
    run.claim(load_config("configs/demo.yaml", ["run_name=nightly", "ray.num_actors=7"]))


# Bad inputs


def test_empty_dataset_is_refused(store) -> None:
    with pytest.raises(ConfigError, match="task.n_train must be at least 1"):
        load_config("configs/demo.yaml", ["task.n_train=0"])
    write_data(store, "r/data/part-00000.parquet", [], [], [])
    with pytest.raises(DataError, match=r"part-00000\.parquet has no examples"):
        read_shard(store, "r/data/part-00000.parquet", VOCAB, CONTEXT)


def test_zero_length_example_is_refused(store) -> None:
    write_data(store, "r/d.parquet", [5, 6], [[1, 2], []], [[1, 2], []])
    with pytest.raises(DataError, match=r"example_id=6 in .*d\.parquet has no tokens"):
        read_shard(store, "r/d.parquet", VOCAB, CONTEXT)


def test_one_token_example_gets_a_finite_sketch() -> None:
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(VOCAB, CONTEXT, d_model=16, n_heads=2, tau=2)).eval()
    layout = build_layout(model.body, "tensorsketch", 16, 0)
    batch = collate([[1], [1, 2, 1]], [[2], [2, 1, 3]], pad_id=0)
    result = sketch_batch(model, model.body, 2, batch, layout, True)
    assert result.finite.all()
    assert torch.isfinite(result.sketches).all()
    assert result.sketches[0].abs().sum() > 0


def test_token_ids_outside_the_vocabulary_are_refused(store) -> None:
    write_data(store, "r/d.parquet", [5], [[1, 9]], [[1, 2]])
    with pytest.raises(DataError, match=r"example_id=5 .* token ids \[9\] outside .*\[0, 4\)"):
        read_shard(store, "r/d.parquet", VOCAB, CONTEXT)


def test_sequences_longer_than_the_context_are_refused(store) -> None:
    write_data(store, "r/d.parquet", [5], [[1] * 9], [[1] * 9])
    with pytest.raises(
        DataError, match=r"example_id=5 .* 9 tokens, more than the context length 8"
    ):
        read_shard(store, "r/d.parquet", VOCAB, CONTEXT)


def test_truncated_parquet_shard_is_named(store) -> None:
    write_data(store, "r/data/part-00003.parquet", [5], [[1, 2]], [[1, 2]])
    data = store.read_bytes("r/data/part-00003.parquet")
    store.write_bytes("r/data/part-00003.parquet", data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"r/data/part-00003\.parquet is corrupt or truncated"):
        read_shard(store, "r/data/part-00003.parquet", VOCAB, CONTEXT)


def test_missing_checkpoint_is_named(store) -> None:
    run = Run(store, "r")
    info = CheckpointInfo(100, 1e-3, "h", run.checkpoint_dir(100), {})
    with pytest.raises(CheckpointError, match=r"checkpoints/step=0000100 has no model.safetensors"):
        load_checkpoint(run, info)


def test_checkpoint_without_learning_rate() -> None:
    info = CheckpointInfo(100, None, "h", "r/checkpoints/step=0000100", {})
    with pytest.raises(EtaError, match=r"step=0000100 has no valid learning rate.*reduce\.eta"):
        checkpoint_eta(info, None)
    assert checkpoint_eta(info, 0.25) == 0.25


def test_identical_checkpoints_warn(store, caplog) -> None:
    run = Run(store, "r")
    infos = [CheckpointInfo(step, 1e-3, "same-hash", f"c{step}", {}) for step in (10, 20)]
    with caplog.at_level(logging.WARNING, logger="pipeline.sketch_stage"):
        warn_duplicate_checkpoints(run, infos)
    assert "step=10 and step=20 have identical content" in caplog.text


def test_non_finite_loss_is_flagged_and_others_unaffected(store) -> None:
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(VOCAB, CONTEXT, d_model=16, n_heads=2, tau=2)).eval()
    with torch.no_grad():
        model.token_embedding.weight[3] = float("inf")  # only example 2 uses token 3
    layout = build_layout(model.body, "tensorsketch", 16, 0)
    inputs, targets = [[1, 2, 1], [2, 3, 1], [1, 1, 2]], [[2, 1, 1], [1, 1, 2], [1, 2, 1]]
    together = sketch_batch(model, model.body, 2, collate(inputs, targets, 0), layout, False)
    alone = sketch_batch(model, model.body, 2, collate(inputs[::2], targets[::2], 0), layout, False)

    assert together.finite.tolist() == [True, False, True]
    assert torch.isfinite(together.sketches).all()
    torch.testing.assert_close(together.sketches[[0, 2]], alone.sketches)

    run = Run(store, "r")
    run.mark_done("sketch", "checkpoint=7.split=train.part=00000", {"non_finite": [11]})
    info = CheckpointInfo(7, 1e-3, "h", "c7", {})
    assert write_flagged(run, [info], {"train": ["x"], "test": []}) == 1
    flagged = store.read_table(run.rel("flagged", "part-00000.parquet")).to_pylist()
    assert flagged == [{"example_id": 11, "split": "train", "checkpoint": 7}]


def test_float16_products_above_65504_accumulate_in_float32(store) -> None:
    rng = np.random.default_rng(0)
    dim, tau = 64, 2
    train = rng.uniform(150, 250, (3, 1, dim))
    test = rng.uniform(150, 250, (2, tau, dim))
    run = Run(store, "r")
    write_sketches(store, "r/train.parquet", [0, 1, 2], train, False, dtype="float16")
    write_sketches(store, "r/test.parquet", [10, 11], test, True, dtype="float16")
    tests = read_sketches(store, ["r/test.parquet"])

    reduce_train_shard(store.spec(), "r", 0, ["r/train.parquet"], [0.5], 2, 2, "in", tests)

    scores = store.read_table(run.rel("scores", "part-00000.parquet")).to_pandas()
    train16 = train.astype(np.float16).astype(np.float64)[:, 0]
    test16 = test.astype(np.float16).astype(np.float64)
    expected = 0.5 * np.einsum("id,jtd->ijt", train16, test16)
    assert expected.max() > 65504 * 20
    got = scores.sort_values(["train_id", "test_id", "step"])["score"].to_numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-6)


def test_float16_sketch_value_overflow_raises(store) -> None:
    sketches = torch.full((2, 1, 8), 1.0)
    sketches[1, 0, 3] = 7e4
    with pytest.raises(SketchOverflowError, match="exceeds float16.*sketch.dtype=float32"):
        sketch_table(
            [5, 6], sketches, torch.zeros(2), torch.ones(2, dtype=torch.bool), False, "float16", {}
        )
    # The same values are stored exactly in float32.
    table = sketch_table(
        [5, 6], sketches, torch.zeros(2), torch.ones(2, dtype=torch.bool), False, "float32", {}
    )
    assert table.column("sketch").combine_chunks().flatten().to_numpy().max() == 7e4


def test_corrupt_parquet_metadata_is_named(store) -> None:
    store.write_bytes("r/x.parquet", b"PAR1 not a parquet file")
    with pytest.raises(StoreError, match=r"r/x\.parquet is corrupt"):
        store.read_metadata("r/x.parquet")

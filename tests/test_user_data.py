"""Your own examples as Parquet (`task.name=parquet`): prepare, guards, and a full run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.tasks import ParityTask
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.prepare import TEST_ID_OFFSET, examples_table, run_prepare
from pipeline.runner import open_run, run_pipeline
from tests.test_pipeline_e2e import TINY


def write_parity_files(folder, with_test_ids: bool = True) -> tuple[str, str]:
    """Write the tiny parity split as user files: train in two files, test in one."""
    train, test = ParityTask(n_bits=4).generate_disjoint([10, 4], seed=0)
    (folder / "train").mkdir()
    table = examples_table(train, 0)
    pq.write_table(table.slice(0, 6), folder / "train" / "a.parquet")
    pq.write_table(table.slice(6), folder / "train" / "b.parquet")
    test_table = examples_table(test, TEST_ID_OFFSET)
    if not with_test_ids:
        test_table = test_table.drop_columns(["example_id"])
    pq.write_table(test_table, folder / "test.parquet")
    return str(folder / "train"), str(folder / "test.parquet")


def user_config(tmp_path, train_path, test_path, *extra):
    return load_config(
        "configs/demo.yaml",
        [
            f"store={tmp_path / 'store'}",
            *TINY,
            "task.name=parquet",
            f"task.train_path={train_path}",
            f"task.test_path={test_path}",
            "task.vocab_size=4",
            "task.context_length=5",
            "task.pad_id=3",
            *extra,
        ],
    )


def test_prepare_reads_user_files(tmp_path) -> None:
    train_path, test_path = write_parity_files(tmp_path, with_test_ids=False)
    config = user_config(tmp_path, train_path, test_path)
    shards = run_prepare(open_run(config), config)
    run = open_run(config)
    train = pd.read_parquet(run.url("data", "train"))
    test = pd.read_parquet(run.url("data", "test"))
    assert len(shards["train"]) == 3  # 10 examples, shard_size 4
    assert sorted(train["example_id"]) == list(range(10))
    assert sorted(test["example_id"]) == list(range(TEST_ID_OFFSET, TEST_ID_OFFSET + 4))


def test_user_run_matches_generated_run(tmp_path, ray_session) -> None:
    train_path, test_path = write_parity_files(tmp_path)
    user = user_config(tmp_path, train_path, test_path, "run_name=user")
    generated = load_config(
        "configs/demo.yaml", [f"store={tmp_path / 'store'}", *TINY, "run_name=generated"]
    )
    run_pipeline(user)
    run_pipeline(generated)

    keys = ["test_id", "train_id", "step"]
    user_scores = pd.read_parquet(open_run(user).url("scores")).sort_values(keys)
    generated_scores = pd.read_parquet(open_run(generated).url("scores")).sort_values(keys)
    assert len(user_scores) == 4 * 10 * 3
    np.testing.assert_array_equal(user_scores[keys].to_numpy(), generated_scores[keys].to_numpy())
    np.testing.assert_allclose(user_scores["score"], generated_scores["score"], rtol=1e-6)


def test_missing_paths_rejected() -> None:
    with pytest.raises(ConfigError, match="task.train_path and task.test_path"):
        load_config("configs/demo.yaml", ["task.name=parquet", "task.vocab_size=4"])


def test_missing_vocab_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task.vocab_size and task.context_length"):
        load_config(
            "configs/demo.yaml",
            ["task.name=parquet", f"task.train_path={tmp_path}", f"task.test_path={tmp_path}"],
        )


def test_token_outside_vocab_names_file(tmp_path) -> None:
    train_path, test_path = write_parity_files(tmp_path)
    config = user_config(tmp_path, train_path, test_path, "task.vocab_size=2", "task.pad_id=0")
    with pytest.raises(DataError, match=r"outside the vocabulary \[0, 2\)") as raised:
        run_prepare(open_run(config), config)
    assert train_path in str(raised.value)
    assert not open_run(config).store.exists(open_run(config).manifest("prepare"))


def test_shared_ids_between_splits_rejected(tmp_path) -> None:
    train_path, _ = write_parity_files(tmp_path)
    config = user_config(tmp_path, train_path, train_path)
    with pytest.raises(DataError, match="appear in both"):
        run_prepare(open_run(config), config)


def test_missing_column_names_file(tmp_path) -> None:
    train_path, test_path = write_parity_files(tmp_path)
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"input_ids": [[0, 1]]}), broken)
    config = user_config(tmp_path, train_path, str(broken))
    with pytest.raises(DataError, match=r"broken\.parquet lacks columns \['targets'\]"):
        run_prepare(open_run(config), config)


def test_empty_folder_rejected(tmp_path) -> None:
    train_path, _ = write_parity_files(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    config = user_config(tmp_path, train_path, str(empty))
    with pytest.raises(DataError, match="no Parquet files"):
        run_prepare(open_run(config), config)

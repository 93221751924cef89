"""Killed, finished and extended runs, each compared with one uninterrupted run.

One tiny run is trained and scored once (the reference). The other runs copy its data
and checkpoints, so that every comparison is of the same weights, and differ only in
how they were interrupted or extended.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from pipeline.checkpoints import list_checkpoints
from pipeline.executor import SketchPool
from pipeline.incremental import add_examples
from pipeline.prepare import TEST_ID_OFFSET
from pipeline.reduce_stage import run_reduce
from pipeline.runner import open_run, run_pipeline
from pipeline.sketch_stage import SketchWorker, run_sketch
from tests.test_pipeline_e2e import tiny_config

pytestmark = pytest.mark.ray

UNITS = 2 * (3 + 1)  # 2 checkpoints x (3 train shards + 1 test shard)


def sorted_scores(run, name: str = "scores") -> pd.DataFrame:
    frame = pd.read_parquet(run.url(name))
    keys = [c for c in ("test_id", "train_id", "step") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def copy_prepared(reference, store: Path, run_name: str, checkpoints: int | None = None):
    """Copy the reference run's data, checkpoints and prepare/train manifests to a new run."""
    source = Path(reference.store.root) / reference.name
    target = store / run_name
    shutil.copytree(source / "data", target / "data")
    kept = sorted((source / "checkpoints").iterdir())[:checkpoints]
    for folder in kept:
        shutil.copytree(folder, target / "checkpoints" / folder.name)
    (target / "_manifests").mkdir(parents=True)
    for stage in ("prepare", "train"):
        text = (source / "_manifests" / f"{stage}.json").read_text()
        text = text.replace(f'"{reference.name}/', f'"{run_name}/')
        (target / "_manifests" / f"{stage}.json").write_text(text)
    (target / "train").mkdir()
    shutil.copy(source / "train" / "metrics.json", target / "train")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    config = tiny_config(tmp_path_factory.mktemp("reference"), "run_name=reference")
    summary = run_pipeline(config)
    return config, open_run(config), summary


class DyingSketchWorker(SketchWorker):
    """A sketch actor whose process exits right after writing its first sketch file.

    It dies between the sketch file's put and the unit's marker, the worst moment for
    idempotency. A flag file (created atomically) makes exactly one process die.
    """

    def __init__(self, store_spec, config, use_gpu, threads) -> None:
        super().__init__(store_spec, config, use_gpu, threads)
        flag = self.config.kill_flag
        write_table = self.store.write_table

        def write_then_die(relative, table) -> None:
            write_table(relative, table)
            if "/sketches/" in relative:
                try:
                    os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
                os._exit(1)

        self.store.write_table = write_then_die


def test_finished_run_recomputes_nothing(reference, ray_session) -> None:
    config, run, first = reference
    assert first["sketch"]["computed"] == UNITS
    markers = run.store.list(run.rel("_manifests"), suffix=".json")
    before = {path: run.store.read_bytes(path) for path in markers}
    outputs = run.store.list(run.rel("scores")) + run.store.list(run.rel("sketches"))
    stamps = {path: os.stat(run.store.path(path)).st_mtime_ns for path in outputs}

    summary = run_pipeline(config)

    assert summary["sketch"] == {"units": UNITS, "computed": 0, "reused": 0}
    assert summary["reduce"]["computed"] == 0
    after = {path: run.store.read_bytes(path) for path in markers}
    assert after == before
    assert {path: os.stat(run.store.path(path)).st_mtime_ns for path in outputs} == stamps


def test_run_survives_a_killed_sketch_actor(reference, tmp_path, ray_session) -> None:
    config, run, _ = reference
    copy_prepared(run, tmp_path, "killed")
    killed = tiny_config(tmp_path, "run_name=killed")
    killed_run = open_run(killed)
    killed_run.claim(killed)
    container = OmegaConf.to_container(killed, resolve=True)
    container["kill_flag"] = str(tmp_path / "killed.flag")
    shards = killed_run.store.read_json(killed_run.manifest("prepare"))["shards"]

    # pytest imports this file under a name Ray workers cannot import; ship the class by value.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = SketchPool(DyingSketchWorker, killed_run.store.spec(), container, killed.ray)
    try:
        summary = run_sketch(killed_run, killed, shards, pool)
    finally:
        pool.shutdown()
    run_reduce(killed_run, killed, shards, ray_session)

    assert (tmp_path / "killed.flag").exists()  # one actor process did die mid-unit
    assert summary["computed"] == UNITS
    sketches = killed_run.store.list(killed_run.rel("sketches"), suffix=".parquet")
    assert len(sketches) == UNITS
    scores = sorted_scores(killed_run)
    assert not scores.duplicated(["test_id", "train_id", "step"]).any()
    pd.testing.assert_frame_equal(scores, sorted_scores(run))
    pd.testing.assert_frame_equal(sorted_scores(killed_run, "tracin"), sorted_scores(run, "tracin"))


def test_killed_driver_resumes(reference, tmp_path, ray_session) -> None:
    config, run, _ = reference
    copy_prepared(run, tmp_path, "driver")
    overrides = [f"store={tmp_path}", "run_name=driver", "ray.num_actors=1"]
    overrides += [item for item in tiny_overrides() if not item.startswith("ray.num_actors")]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_ADDRESS": address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "sketch", "configs/demo.yaml", *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    markers = tmp_path / "driver" / "_manifests" / "sketch"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if markers.is_dir() and len(list(markers.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed"
        driver.send_signal(signal.SIGKILL)
        # Ray ends a dead driver's actors only after it notices; kill them now so that no
        # unit finishes after the driver died.
        kill_sketch_actors()
    finally:
        driver.kill()
        driver.wait(timeout=30)
    done_before = len(list(markers.glob("*.json")))
    assert 2 <= done_before < UNITS
    assert not (tmp_path / "driver" / "_manifests" / "sketch.json").exists()

    resumed = tiny_config(tmp_path, "run_name=driver")
    summary = run_pipeline(resumed)

    resumed_run = open_run(resumed)
    assert summary["sketch"]["computed"] + summary["sketch"]["reused"] <= UNITS - done_before + 1
    assert len(resumed_run.store.list(resumed_run.rel("sketches"), suffix=".parquet")) == UNITS
    pd.testing.assert_frame_equal(sorted_scores(resumed_run), sorted_scores(run))


def kill_sketch_actors() -> None:
    """Kill the processes of every live SketchWorker actor of this Ray session."""
    # The public state API needs the dashboard, which the test session does not start;
    # this GCS table is Ray's own (ray 2.60 is pinned).
    from ray._private.state import actors

    for actor in actors().values():
        if actor["ActorClassName"] == "SketchWorker" and actor["State"] == "ALIVE":
            with contextlib.suppress(ProcessLookupError):
                os.kill(actor["Pid"], signal.SIGKILL)


def tiny_overrides() -> list[str]:
    from tests.test_pipeline_e2e import TINY

    return list(TINY)


def test_new_checkpoint_computes_only_its_sketches(reference, tmp_path, ray_session) -> None:
    config, run, _ = reference
    copy_prepared(run, tmp_path, "grow", checkpoints=1)
    grow = tiny_config(tmp_path, "run_name=grow")
    first = run_pipeline(grow)
    assert first["sketch"]["computed"] == UNITS // 2

    last = sorted((Path(run.store.root) / run.name / "checkpoints").iterdir())[-1]
    shutil.copytree(last, tmp_path / "grow" / "checkpoints" / last.name)
    second = run_pipeline(grow)

    assert second["sketch"]["computed"] == UNITS // 2
    assert second["reduce"]["computed"] == 3  # every train shard, now over two checkpoints
    grow_run = open_run(grow)
    assert len(list_checkpoints(grow_run)) == 2
    pd.testing.assert_frame_equal(sorted_scores(grow_run), sorted_scores(run))


def test_new_test_examples_compute_only_their_sketches(reference, tmp_path, ray_session) -> None:
    config, run, _ = reference
    copy_prepared(run, tmp_path, "more")
    more = tiny_config(tmp_path, "run_name=more")
    run_pipeline(more)
    more_run = open_run(more)
    train = pd.read_parquet(more_run.url("data", "train")).head(2)
    new = pa.table(
        {
            "example_id": [TEST_ID_OFFSET + 500, TEST_ID_OFFSET + 501],
            "input_ids": list(train["input_ids"].map(list)),
            "targets": list(train["targets"].map(list)),
        }
    )
    add_examples(more_run, "test", new)

    summary = run_pipeline(more)

    assert summary["sketch"]["computed"] == 2  # the new test shard, once per checkpoint
    scores = sorted_scores(more_run)
    old = scores[scores.test_id < TEST_ID_OFFSET + 500].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, sorted_scores(run))
    assert set(scores.test_id) >= {TEST_ID_OFFSET + 500, TEST_ID_OFFSET + 501}


def test_another_run_reuses_train_sketches(reference, ray_session) -> None:
    config, run, _ = reference
    store = Path(run.store.root)
    copy_prepared(run, store, "sibling")
    sibling = tiny_config(store, "run_name=sibling")

    summary = run_pipeline(sibling)

    assert summary["sketch"] == {"units": UNITS, "computed": 2, "reused": UNITS - 2}
    pd.testing.assert_frame_equal(sorted_scores(open_run(sibling)), sorted_scores(run))


def test_corrupt_shard_keeps_finished_units(reference, tmp_path, ray_session):
    config, run, _ = reference
    copy_prepared(run, tmp_path, "corrupt")
    shard = tmp_path / "corrupt" / "data" / "train" / "part-00002.parquet"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    corrupt = tiny_config(tmp_path, "run_name=corrupt", "ray.num_actors=1")

    with pytest.raises(Exception, match=r"train/part-00002\.parquet is corrupt or truncated"):
        run_pipeline(corrupt)

    markers = tmp_path / "corrupt" / "_manifests" / "sketch"
    finished = {path.name: path.read_bytes() for path in markers.glob("*.json")}
    assert finished  # units before the bad shard are kept
    shard.write_bytes(intact)
    summary = run_pipeline(corrupt)

    assert summary["sketch"]["computed"] == UNITS - len(finished)
    for name, data in finished.items():
        assert (markers / name).read_bytes() == data
    pd.testing.assert_frame_equal(sorted_scores(open_run(corrupt)), sorted_scores(run))

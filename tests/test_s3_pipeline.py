"""The tiny demo configuration end to end on a moto S3 store, against the local-folder run."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import pandas as pd
import pytest

from pipeline.runner import open_run, run_pipeline
from tests.test_pipeline_e2e import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def sorted_table(run, name: str) -> pd.DataFrame:
    frame = pd.read_parquet(run.url(name), storage_options=run.store.options or None)
    keys = [c for c in ("test_id", "train_id", "step", "direction", "rank") if c in frame]
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session, s3_endpoint):
    local = tiny_config(tmp_path_factory.mktemp("local"), "run_name=tiny")
    bucket = "sdi-e2e"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    s3 = tiny_config(
        "unused",
        f"store=s3://{bucket}/nightly",
        "run_name=tiny",
        f"storage.endpoint_url={s3_endpoint}",
        "storage.region=us-east-1",
    )
    root = logging.getLogger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        s3_summary = run_pipeline(s3)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    run_pipeline(local)
    return open_run(local), open_run(s3), s3_summary, bucket, records


@pytest.mark.parametrize("name", ["scores", "tracin", "topk"])
def test_s3_outputs_equal_local_outputs(runs, name) -> None:
    local, s3, _, _, _ = runs
    pd.testing.assert_frame_equal(sorted_table(s3, name), sorted_table(local, name))


def test_s3_rerun_recomputes_nothing(runs) -> None:
    _, s3, _, _, _ = runs
    config = tiny_config(
        "unused",
        f"store={s3.store.url}",
        "run_name=tiny",
        f"storage.endpoint_url={s3.store.storage['endpoint_url']}",
    )
    summary = run_pipeline(config)
    assert summary["sketch"]["computed"] == 0
    assert summary["reduce"]["computed"] == 0


def test_credentials_are_never_stored_or_logged(runs, s3_endpoint, aws_test_env) -> None:
    _, s3, _, bucket, records = runs
    secrets = [
        aws_test_env[name]
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    ]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(key.endswith("config.yaml") for key in keys)
    assert any("/_manifests/sketch/" in key for key in keys)
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for secret in secrets:
            assert secret.encode() not in body, f"{secret!r} stored in {key}"

    messages = [record.getMessage() for record in records if record.name.startswith("pipeline")]
    assert messages, "the pipeline logged nothing"
    for secret in secrets:
        assert not any(secret in message for message in messages)

    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            text = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in text, f"{secret!r} in Ray log {path.name}"

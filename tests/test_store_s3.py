"""The Store against a real moto S3 server: large objects, retries, permanent errors, secrets."""

from __future__ import annotations

import errno
import io
import logging

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

from pipeline.retry import is_transient
from pipeline.store import MULTIPART_CHUNK, Store, StoreError

pytestmark = pytest.mark.s3


def s3_store(endpoint: str, bucket: str, **storage) -> Store:
    return Store(f"s3://{bucket}/prefix", {"endpoint_url": endpoint, **storage})


class FlakyFileSystem:
    """Delegates to a real filesystem; the first `failures` calls of `methods` raise `error`.

    Used only to test retries: moto has no fault injection, so the transient error that
    s3fs or botocore would raise is raised here in front of the real server.
    """

    def __init__(self, fs, failures: int, error: Exception, methods=("pipe_file", "cat_file")):
        self._fs = fs
        self.remaining = failures
        self.error = error
        self.methods = set(methods)
        self.calls = 0

    def __getattr__(self, name):
        attribute = getattr(self._fs, name)
        if name not in self.methods:
            return attribute

        def call(*args, **kwargs):
            self.calls += 1
            if self.remaining > 0:
                self.remaining -= 1
                raise self.error
            return attribute(*args, **kwargs)

        return call


def test_large_sketch_file_round_trips_through_multipart(s3_endpoint, s3_bucket) -> None:
    store = s3_store(s3_endpoint, s3_bucket)
    rng = np.random.default_rng(0)
    rows, dim = 1200, 4096  # float32 sketches: about 19 MiB, incompressible
    values = rng.standard_normal(rows * dim).astype(np.float32)
    table = pa.table(
        {
            "example_id": np.arange(rows, dtype=np.int64),
            "sketch": pa.FixedSizeListArray.from_arrays(pa.array(values), dim),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    assert len(data) > 2 * MULTIPART_CHUNK

    store.write_bytes("run/sketches/part-00000.parquet", data)

    assert store.read_bytes("run/sketches/part-00000.parquet") == data
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    head = client.head_object(Bucket=s3_bucket, Key="prefix/run/sketches/part-00000.parquet")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    back = store.read_table("run/sketches/part-00000.parquet")
    flat = back.column("sketch").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(flat, values)


def test_object_above_8_mib_single_put_round_trips(s3_endpoint, s3_bucket) -> None:
    store = s3_store(s3_endpoint, s3_bucket)
    data = np.random.default_rng(1).bytes(9 * 2**20 + 17)
    store.write_bytes("run/scores/part-00000.parquet", data)
    assert store.read_bytes("run/scores/part-00000.parquet") == data


@pytest.mark.parametrize(
    "error",
    [
        ConnectionClosedError(endpoint_url="http://127.0.0.1"),
        OSError(errno.EBUSY, "SlowDown: please reduce your request rate"),
        TimeoutError("read timed out"),
    ],
    ids=["connection-closed", "slow-down", "timeout"],
)
def test_transient_errors_are_retried_and_logged(s3_endpoint, s3_bucket, caplog, error) -> None:
    store = s3_store(s3_endpoint, s3_bucket, retry_backoff=0.01)
    flaky = FlakyFileSystem(store.fs, failures=2, error=error)
    store.fs = flaky

    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        store.write_bytes("run/a.bin", b"payload")
        flaky.remaining = 2
        assert store.read_bytes("run/a.bin") == b"payload"

    assert flaky.calls == 6  # two failures and one success per call
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 4
    assert all("run/a.bin" in message for message in retries)


def test_retries_give_up_after_the_configured_attempts(s3_endpoint, s3_bucket) -> None:
    store = s3_store(s3_endpoint, s3_bucket, retries=3, retry_backoff=0.01)
    flaky = FlakyFileSystem(store.fs, failures=10, error=TimeoutError("read timed out"))
    store.fs = flaky
    with pytest.raises(StoreError, match=r"writing s3://.*/prefix/run/b\.bin failed"):
        store.write_bytes("run/b.bin", b"payload")
    assert flaky.calls == 3


def test_permanent_error_fails_at_once_naming_the_key(s3_endpoint, s3_bucket) -> None:
    store = s3_store(s3_endpoint, s3_bucket, retry_backoff=0.01)
    flaky = FlakyFileSystem(store.fs, failures=10, error=PermissionError("Access Denied"))
    store.fs = flaky
    with pytest.raises(StoreError, match=r"run/sketches/part-00003\.parquet.*Access Denied"):
        store.write_bytes("run/sketches/part-00003.parquet", b"x")
    assert flaky.calls == 1


def test_missing_key_is_named(s3_endpoint, s3_bucket) -> None:
    store = s3_store(s3_endpoint, s3_bucket)
    with pytest.raises(StoreError, match=r"prefix/run/missing\.json not found"):
        store.read_json("run/missing.json")


def test_error_classes() -> None:
    def client_error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("AccessDenied", 403))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(ValueError("bad"))


def test_custom_endpoint_uses_when_required_checksums_and_no_credentials(
    s3_endpoint, s3_bucket, aws_test_env
) -> None:
    store = s3_store(s3_endpoint, s3_bucket, region="us-east-1")
    assert store.options["config_kwargs"] == {
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    text = repr(store.spec()) + repr(store.options)
    for secret in aws_test_env.values():
        if secret != "us-east-1":
            assert secret not in text

"""A real moto S3 server on 127.0.0.1 for the tests, with dummy credentials in the environment.

The server runs in a thread of the test process (moto's ThreadedMotoServer) on a free port
and is stopped when the test session ends. The credentials are dummies set only for the
test session, so no test can reach a real AWS account by accident.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id-4f2a9c",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-9d81e7b3c6",
    "AWS_SESSION_TOKEN": "testing-session-token-51ab",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point botocore at a real account or endpoint; cleared for the tests.
CLEARED = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN")


@contextmanager
def dummy_aws_environment() -> Iterator[dict[str, str]]:
    """Set dummy AWS credentials in os.environ and restore the previous values afterwards."""
    saved = {name: os.environ.get(name) for name in (*DUMMY_CREDENTIALS, *CLEARED)}
    for name in CLEARED:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_CREDENTIALS)
    try:
        yield dict(DUMMY_CREDENTIALS)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and yield its endpoint URL; stop it on exit."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)

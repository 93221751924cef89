"""Shared fixtures: one local Ray instance and one moto S3 server for the whole test session."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.s3_server import dummy_aws_environment, make_bucket, moto_server

# Workers of the local Ray instance import the project from this checkout.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def aws_test_env():
    """Dummy AWS credentials for the session; set before Ray starts so its workers inherit them."""
    with dummy_aws_environment() as credentials:
        yield credentials


@pytest.fixture(scope="session")
def ray_session(aws_test_env):
    """Start one local Ray instance (2 CPUs) for every test that needs Ray, and stop it at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(aws_test_env):
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the moto server; yields its name."""
    name = f"sdi-test-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_endpoint, name)
    return name

"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import os

import pytest

# Workers of the local Ray instance import the project from this checkout.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray instance (2 CPUs) for every test that needs Ray, and stop it at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()

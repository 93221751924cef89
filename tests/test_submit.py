"""`sdi submit` against a real `ray start --head` cluster on this machine, with token auth on.

The head gets its own ports, its own --temp-dir and its own token file, so it never meets
the shared local Ray instance of tests/conftest.py. The teardown kills only the processes
that this head started (its session, and anything running in its temp dir); it never
runs `ray stop`, which would stop every Ray process on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.submit import (
    Decision,
    SubmitError,
    base_submission_id,
    configure_auth,
    connect,
    decide,
    exit_status,
    list_run_jobs,
    run_job_command,
    submit_run,
    wait_for_job,
)

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120
JOB_TIMEOUT = 240
TINY = [
    "task.n_bits=4",
    "task.n_train=8",
    "task.n_test=3",
    "task.shard_size=4",
    "model.d_model=16",
    "model.n_heads=2",
    "model.tau=3",
    "train.steps=10",
    "train.warmup_steps=2",
    "train.num_checkpoints=2",
    "sketch.dim=64",
    "reduce.topk=2",
    "ray.num_actors=1",
]


# -- decisions and auth, no cluster ------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ({}, ("submit", "sdi-night")),
        ({"sdi-other": "RUNNING"}, ("submit", "sdi-night")),
        ({"sdi-night-2": "RUNNING"}, ("submit", "sdi-night")),
        ({"sdi-night": "PENDING"}, ("join", "sdi-night")),
        ({"sdi-night": "RUNNING"}, ("join", "sdi-night")),
        ({"sdi-night": "SUCCEEDED"}, ("done", "sdi-night")),
        ({"sdi-night": "FAILED"}, ("submit", "sdi-night-retry-1")),
        ({"sdi-night": "STOPPED"}, ("submit", "sdi-night-retry-1")),
        ({"sdi-night": "FAILED", "sdi-night-retry-1": "RUNNING"}, ("join", "sdi-night-retry-1")),
        ({"sdi-night": "FAILED", "sdi-night-retry-1": "FAILED"}, ("submit", "sdi-night-retry-2")),
        ({"sdi-night": "FAILED", "sdi-night-retry-1": "SUCCEEDED"}, ("done", "sdi-night-retry-1")),
        # Numeric order, not string order: retry-10 is the latest.
        (
            {f"sdi-night-retry-{n}": "FAILED" for n in (1, 2, 10)} | {"sdi-night": "FAILED"},
            ("submit", "sdi-night-retry-11"),
        ),
    ],
)
def test_decide(jobs, expected) -> None:
    decision = decide("sdi-night", jobs)
    assert (decision.action, decision.submission_id) == expected


def test_decide_unknown_status() -> None:
    with pytest.raises(SubmitError, match="unknown status 'LOST'"):
        decide("sdi-night", {"sdi-night": "LOST"})


def test_auth_token_file_turns_token_mode_on(tmp_path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc123\n")
    environ: dict[str, str] = {}
    assert configure_auth(environ, home=tmp_path) == {"Authorization": "Bearer abc123"}
    assert environ["RAY_AUTH_MODE"] == "token"


def test_auth_respects_user_choice(tmp_path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc123")
    environ = {"RAY_AUTH_MODE": "disabled"}
    assert configure_auth(environ, home=tmp_path) == {}
    assert environ["RAY_AUTH_MODE"] == "disabled"


def test_auth_token_sources(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    environ = {"RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert configure_auth(environ, home=tmp_path) == {"Authorization": "Bearer from-file"}
    environ = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert configure_auth(environ, home=tmp_path) == {"Authorization": "Bearer from-env"}
    assert configure_auth({}, home=tmp_path) == {}


def test_auth_token_mode_without_token(tmp_path) -> None:
    with pytest.raises(SubmitError, match="no Ray token was found"):
        configure_auth({"RAY_AUTH_MODE": "token"}, home=tmp_path)


def test_connect_needs_address() -> None:
    with pytest.raises(SubmitError, match="pass --address"):
        connect(None, environ={})


# -- a real head ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def head_processes(session_id: int, temp_dir: str) -> list[int]:
    """Return the live pids this head started: its session, or a working dir in its temp dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, waiting for its parent to reap it
            if os.getsid(pid) == session_id or os.readlink(f"/proc/{pid}/cwd").startswith(temp_dir):
                pids.append(pid)
        except OSError:
            continue
    return pids


def stop_head(process: subprocess.Popen, temp_dir: str) -> None:
    """Kill the head's processes (a test cluster needs no graceful drain), bounded wait."""
    deadline = time.monotonic() + 20
    while (pids := head_processes(process.pid, temp_dir)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()


def dashboard_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # 401 without a token: the server is up
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_head():
    """Start `ray start --head` with token auth on free ports; yield (url, client environ)."""
    temp_dir = tempfile.mkdtemp(prefix="sdi-head-", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    dashboard_port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start",
        "--head",
        "--block",
        f"--port={free_port()}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in the finalizer
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not dashboard_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (Path(temp_dir) / "head.log").read_text()[-3000:]
                pytest.fail(f"ray start --head did not come up on {url}:\n{tail}")
            time.sleep(0.5)
        client_env = {"RAY_AUTH_TOKEN_PATH": str(token_path)}
        yield url, client_env
    finally:
        stop_head(process, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def client_environ(ray_head, monkeypatch):
    """Point this process's Ray client settings at the test head's token."""
    _, client_env = ray_head
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    # Set (not deleted) so that monkeypatch restores it: connect() writes RAY_AUTH_MODE.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    return client_env


def cli_env(client_env: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(client_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def job_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("job-store")


@pytest.mark.slow
def test_submit_wait_runs_pipeline(ray_head, job_store) -> None:
    url, client_env = ray_head
    store = job_store
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "submit",
        "configs/demo.yaml",
        "--address",
        url,
        "--wait",
        "--timeout",
        str(JOB_TIMEOUT),
        f"store={store}",
        "run_name=jobs-e2e",
        *TINY,
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=cli_env(client_env),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT + 60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert result.stdout.splitlines()[0] == "sdi-jobs-e2e"
    assert "Run: " in result.stdout  # the job's own summary, streamed back

    scores = pd.read_parquet(store / "jobs-e2e" / "scores")
    tracin = pd.read_parquet(store / "jobs-e2e" / "tracin")
    assert len(scores) == 3 * 8 * 3
    assert sorted(scores["step"].unique()) == [1, 2, 3]
    summed = scores.groupby(["test_id", "train_id"])["score"].sum()
    joined = tracin.set_index(["test_id", "train_id"])["score"]
    np.testing.assert_allclose(joined.loc[summed.index], summed, rtol=1e-10)


@pytest.mark.slow
def test_resubmit_after_success_does_nothing(ray_head, client_environ, job_store) -> None:
    url, _ = ray_head
    client = connect(url)
    before = list_run_jobs(client, base_submission_id("jobs-e2e"))
    if before.get("sdi-jobs-e2e") is None:
        pytest.skip("needs the job of test_submit_wait_runs_pipeline")
    store = job_store
    decision = submit_run(
        client, ROOT / "configs/demo.yaml", [f"store={store}", "run_name=jobs-e2e", *TINY], ROOT
    )
    assert decision == Decision("done", "sdi-jobs-e2e", "job sdi-jobs-e2e already SUCCEEDED")
    assert list_run_jobs(client, base_submission_id("jobs-e2e")).keys() == before.keys()


@pytest.mark.slow
def test_duplicate_joins_then_retry_after_failure(ray_head, client_environ, tmp_path) -> None:
    url, _ = ray_head
    client = connect(url)
    # Sketching without a train stage fails fast: the run has no checkpoints.
    overrides = [f"store={tmp_path}", "run_name=jobs-fail", "stages=[prepare,sketch]", *TINY]
    config = ROOT / "configs/demo.yaml"

    first = submit_run(client, config, overrides, ROOT)
    assert first.action == "submit"
    assert first.submission_id == "sdi-jobs-fail"
    second = submit_run(client, config, overrides, ROOT)
    assert second.action == "join"
    assert second.submission_id == "sdi-jobs-fail"
    with pytest.raises(SubmitError, match="different configuration"):
        submit_run(client, config, [*overrides, "sketch.dim=32"], ROOT)
    assert list(list_run_jobs(client, "sdi-jobs-fail")) == ["sdi-jobs-fail"]

    info = wait_for_job(client, "sdi-jobs-fail", None, timeout=JOB_TIMEOUT)
    assert str(info.status) == "FAILED"
    assert exit_status(info) != 0

    status = io.StringIO()
    args = argparse.Namespace(command="status", job_id="sdi-jobs-fail", address=url)
    assert run_job_command(args, status) == 0
    assert "status: FAILED" in status.getvalue()
    logs = io.StringIO()
    args = argparse.Namespace(command="logs", job_id="sdi-jobs-fail", address=url, follow=False)
    assert run_job_command(args, logs) == 0
    assert "no checkpoints" in logs.getvalue()

    retry = submit_run(client, config, overrides, ROOT)
    assert retry.action == "submit"
    assert retry.submission_id == "sdi-jobs-fail-retry-1"
    client.stop_job(retry.submission_id)
    info = wait_for_job(client, retry.submission_id, None, timeout=JOB_TIMEOUT)
    assert str(info.status) in ("STOPPED", "FAILED")


def test_unknown_job_id(ray_head, client_environ) -> None:
    url, _ = ray_head
    args = argparse.Namespace(command="status", job_id="sdi-no-such-run", address=url)
    assert run_job_command(args, io.StringIO()) == 2


def test_wrong_token_rejected(ray_head, monkeypatch) -> None:
    url, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(SubmitError, match="rejected the request: .*Invalid authentication token"):
        connect(url)


def test_relative_store_rejected(ray_head, client_environ) -> None:
    url, _ = ray_head
    with pytest.raises(SubmitError, match="is a relative path"):
        submit_run(connect(url), ROOT / "configs/demo.yaml", ["store=./sdi-store"], ROOT)


def test_config_outside_working_dir_rejected(ray_head, client_environ, tmp_path) -> None:
    url, _ = ray_head
    outside = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "configs/demo.yaml", outside)
    with pytest.raises(SubmitError, match="outside the working directory"):
        submit_run(connect(url), outside, [f"store={tmp_path}"], ROOT)

"""`sdi submit`, `sdi status` and `sdi logs`: the pipeline as a Ray job on an existing cluster.

A submission uploads a working directory (by default the current one) and, unless they
are inside it, the `pipeline` and `operators` packages, then runs
`python -m pipeline.cli run CONFIG overrides...` on the cluster. The job's driver joins
the cluster through the RAY_ADDRESS that Ray sets for every job.

Submissions are idempotent per run name because the submission id is `sdi-<run_name>`.
A nightly retry of the same run joins the job that is still pending or running, and
does nothing after a success. After a failure it submits `sdi-<run_name>-retry-N`,
which resumes the run from its finished work units.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

from pipeline.config import ConfigError, load_config, semantic_config
from pipeline.run import config_hash

logger = logging.getLogger(__name__)

JOB_COMMANDS = ("submit", "status", "logs")
ACTIVE_STATES = ("PENDING", "RUNNING")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
RETRY_SEPARATOR = "-retry-"
# Never uploaded with the working directory: results, caches and version control.
# Ray also skips whatever the working directory's .gitignore files list.
UPLOAD_EXCLUDES = [
    ".git",
    "sdi-store",
    ".sdi-store",
    "**/__pycache__",
    "*.egg-info",
    ".venv",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    "build",
    "dist",
]
METADATA_RUN = "sdi_run_name"
METADATA_CONFIG = "sdi_config_hash"


class SubmitError(RuntimeError):
    """A job cannot be submitted, found or followed."""


@dataclass(frozen=True)
class Decision:
    """Outcome of a submission: `submit` a new job, `join` a live one, or nothing (`done`)."""

    action: str
    submission_id: str
    reason: str


def base_submission_id(run_name: str) -> str:
    """Return the submission id of a run's first attempt."""
    return f"sdi-{run_name}"


def attempt_number(base_id: str, submission_id: str) -> int | None:
    """Return 0 for the first attempt, N for `<base>-retry-N`, None for another run's job."""
    if submission_id == base_id:
        return 0
    prefix = base_id + RETRY_SEPARATOR
    if submission_id.startswith(prefix) and submission_id[len(prefix) :].isdigit():
        return int(submission_id[len(prefix) :])
    return None


def decide(base_id: str, jobs: Mapping[str, str]) -> Decision:
    """Decide what submitting a run does, given the cluster's jobs (submission id -> status).

    A pending or running attempt is joined. Otherwise the latest attempt decides: none
    means submit the first, SUCCEEDED means nothing to do, FAILED or STOPPED means submit
    the next retry.
    """
    attempts = sorted(
        (number, submission_id, status)
        for submission_id, status in jobs.items()
        if (number := attempt_number(base_id, submission_id)) is not None
    )
    if not attempts:
        return Decision("submit", base_id, "no earlier job for this run")
    active = [attempt for attempt in attempts if attempt[2] in ACTIVE_STATES]
    if active:
        _, submission_id, status = active[-1]
        return Decision("join", submission_id, f"job {submission_id} is {status}")
    number, submission_id, status = attempts[-1]
    if status == "SUCCEEDED":
        return Decision("done", submission_id, f"job {submission_id} already SUCCEEDED")
    if status not in TERMINAL_STATES:
        raise SubmitError(f"job {submission_id} has the unknown status {status!r}")
    retry_id = f"{base_id}{RETRY_SEPARATOR}{number + 1}"
    return Decision("submit", retry_id, f"job {submission_id} ended {status}; retrying")


def configure_auth(environ: MutableMapping[str, str], home: Path | None = None) -> dict[str, str]:
    """Return the HTTP headers that authenticate to a Ray 2.60 dashboard with token auth.

    Ray clients send a token only when RAY_AUTH_MODE=token. When the user has not set
    RAY_AUTH_MODE and a token exists (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token), this sets RAY_AUTH_MODE=token in `environ` and sends that token.
    RAY_AUTH_MODE=disabled sends nothing.
    """
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    token_path = Path(
        environ.get("RAY_AUTH_TOKEN_PATH") or (home or Path.home()) / ".ray" / "auth_token"
    )
    if not token and token_path.is_file():
        token = token_path.read_text().strip()

    mode = environ.get("RAY_AUTH_MODE")
    if mode is None and token:
        environ["RAY_AUTH_MODE"] = mode = "token"
        logger.info("found a Ray token, so RAY_AUTH_MODE=token is set for this client")
    if (mode or "disabled").lower() != "token":
        return {}
    if not token:
        raise SubmitError(
            f"RAY_AUTH_MODE=token but no Ray token was found in RAY_AUTH_TOKEN or {token_path}; "
            "copy the cluster's token there (`ray get-auth-token` on the head node prints it)"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(address: str | None, environ: MutableMapping[str, str] | None = None) -> Any:
    """Return a JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HOST:8265 (the Ray dashboard) or set "
            "RAY_ADDRESS"
        )
    headers = configure_auth(environ)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        sent = "a token" if headers else "no token"
        raise SubmitError(
            f"the Ray job API at {address} rejected the request: {str(error).splitlines()[0]}\n"
            f"This client sent {sent}. Set RAY_AUTH_MODE=token and put the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        ) from error
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(
            f"cannot reach the Ray job API at {address}: {error}\nCheck --address (the "
            "dashboard, port 8265 by default) and, for a token-authenticated cluster, the token"
        ) from error


def runtime_env(config_path: Path, working_dir: Path) -> tuple[dict[str, Any], str]:
    """Return the job's runtime environment and the config path relative to the working dir."""
    import operators
    import pipeline

    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise SubmitError(f"working directory {working_dir} does not exist")
    config_path = config_path.resolve()
    try:
        relative = config_path.relative_to(working_dir)
    except ValueError as error:
        raise SubmitError(
            f"config {config_path} is outside the working directory {working_dir}, which is "
            "what gets uploaded; move the config under it or pass --working-dir"
        ) from error

    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    modules = []
    for package in (pipeline, operators):
        folder = Path(package.__file__).resolve().parent
        if not folder.is_relative_to(working_dir):
            modules.append(str(folder))
    if modules:
        env["py_modules"] = modules
    return env, relative.as_posix()


def check_store(config: DictConfig) -> None:
    """Reject a relative local store: a job runs in a temporary copy of the working dir."""
    store = str(config.store)
    if "://" not in store and not os.path.isabs(store):
        raise SubmitError(
            f"store={store!r} is a relative path, which a job would resolve inside its "
            "temporary working directory on the cluster; pass store=s3://bucket/prefix or an "
            "absolute path that the cluster's head node can write"
        )


def entrypoint(config_relative: str, overrides: list[str], log_level: str) -> str:
    """Return the shell command the job runs."""
    words = ["python", "-m", "pipeline.cli", "--log-level", log_level, "run", config_relative]
    return shlex.join([*words, *overrides])


def list_run_jobs(client: Any, base_id: str) -> dict[str, Any]:
    """Return the cluster's jobs that are attempts of one run, by submission id."""
    return {
        job.submission_id: job
        for job in client.list_jobs()
        if job.submission_id and attempt_number(base_id, job.submission_id) is not None
    }


def submit_run(
    client: Any,
    config_path: str | Path,
    overrides: list[str],
    working_dir: str | Path = ".",
    log_level: str = "INFO",
    entrypoint_num_cpus: float | None = None,
) -> Decision:
    """Submit a run as a Ray job, or join or skip the run's existing job (see `decide`)."""
    config = load_config(config_path, overrides)
    check_store(config)
    env, config_relative = runtime_env(Path(config_path), Path(working_dir))
    base_id = base_submission_id(config.run_name)
    digest = config_hash(semantic_config(config))

    for _ in range(2):
        jobs = list_run_jobs(client, base_id)
        decision = decide(base_id, {sid: str(job.status) for sid, job in jobs.items()})
        if decision.action != "submit":
            recorded = (jobs[decision.submission_id].metadata or {}).get(METADATA_CONFIG)
            if recorded and recorded != digest:
                raise SubmitError(
                    f"{decision.reason}, but it runs run_name={config.run_name} with a "
                    f"different configuration (hash {recorded}, this one {digest}); pick "
                    "another run_name"
                )
            logger.info("run %s: %s", config.run_name, decision.reason)
            return decision
        try:
            client.submit_job(
                entrypoint=entrypoint(config_relative, overrides, log_level),
                submission_id=decision.submission_id,
                runtime_env=env,
                metadata={METADATA_RUN: config.run_name, METADATA_CONFIG: digest},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except RuntimeError as error:
            # Another client submitted the same id in between: decide again, which joins it.
            if "already exists" in str(error) or decision.submission_id in str(error):
                logger.warning(
                    "job %s was submitted concurrently; joining it", decision.submission_id
                )
                continue
            raise SubmitError(f"submitting job {decision.submission_id} failed: {error}") from error
        logger.info(
            "run %s: submitted job %s (%s)",
            config.run_name,
            decision.submission_id,
            decision.reason,
        )
        return decision
    raise SubmitError(f"job {decision.submission_id} keeps changing; list it with `ray job list`")


def job_info(client: Any, submission_id: str) -> Any:
    """Return a job's details, with a clear error when the cluster does not know the id."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise SubmitError(
                f"job {submission_id} not found on this cluster; `sdi submit` prints the id, "
                "and `ray job list` lists all jobs"
            ) from error
        raise SubmitError(f"reading job {submission_id} failed: {error}") from error


def follow_logs(client: Any, submission_id: str, stream: TextIO) -> None:
    """Copy a job's log to `stream` until the job ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            stream.write(lines)
            stream.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as error:
        logger.warning("job %s: log stream ended early (%s)", submission_id, error)


def wait_for_job(
    client: Any, submission_id: str, stream: TextIO | None, timeout: float | None = None
) -> Any:
    """Stream the job's log (when `stream` is given), then wait for a terminal status.

    Raises SubmitError when the job is still running after `timeout` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if stream is not None:
        follow_logs(client, submission_id, stream)
    while True:
        info = job_info(client, submission_id)
        if str(info.status) in TERMINAL_STATES:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(
                f"job {submission_id} is still {info.status} after {timeout:.0f}s; it keeps "
                f"running on the cluster (stop it with `ray job stop {submission_id}`)"
            )
        time.sleep(1.0)


def exit_status(info: Any) -> int:
    """Return the command's exit status for a finished job: 0 only when it SUCCEEDED."""
    if str(info.status) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def add_job_commands(commands: Any) -> None:
    """Add the submit, status and logs subcommands to the `sdi` parser."""
    address_help = "Ray dashboard address, for example http://127.0.0.1:8265 (default: RAY_ADDRESS)"
    submit = commands.add_parser("submit", help="run the pipeline as a Ray job on a cluster")
    submit.add_argument("config", help="YAML configuration file inside the working directory")
    submit.add_argument("overrides", nargs="*", help="key=value overrides, as for `sdi run`")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--wait", action="store_true", help="stream the log and wait for the end")
    submit.add_argument(
        "--working-dir",
        default=".",
        help="folder uploaded with the job; it must contain the config (default: .)",
    )
    submit.add_argument(
        "--timeout", type=float, help="with --wait: give up waiting after this many seconds"
    )
    submit.add_argument(
        "--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver"
    )
    for name, text in (("status", "show a job's status"), ("logs", "print a job's log")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_id", help="submission id that `sdi submit` printed")
        sub.add_argument("--address", help=address_help)
        if name == "logs":
            sub.add_argument("--follow", action="store_true", help="keep streaming until it ends")


def run_job_command(args: argparse.Namespace, stdout: TextIO = sys.stdout) -> int:
    """Run `sdi submit`, `sdi status` or `sdi logs`; return the process exit status."""
    try:
        client = connect(args.address)
        if args.command == "submit":
            return _submit_command(client, args, stdout)
        if args.command == "status":
            info = job_info(client, args.job_id)
            print_job(info, stdout)
            return 0
        job_info(client, args.job_id)
        if args.follow:
            follow_logs(client, args.job_id, stdout)
        else:
            stdout.write(client.get_job_logs(args.job_id))
        return 0
    except (SubmitError, ConfigError) as error:
        print(f"sdi: {error}", file=sys.stderr)
        return 2


def _submit_command(client: Any, args: argparse.Namespace, stdout: TextIO) -> int:
    decision = submit_run(
        client,
        args.config,
        list(args.overrides),
        args.working_dir,
        args.log_level,
        args.entrypoint_num_cpus,
    )
    print(decision.submission_id, file=stdout, flush=True)
    print(f"sdi: {decision.action}: {decision.reason}", file=sys.stderr)
    if decision.action == "done" or not args.wait:
        return 0
    info = wait_for_job(client, decision.submission_id, stdout, args.timeout)
    print(f"sdi: job {decision.submission_id} {info.status}", file=sys.stderr)
    return exit_status(info)


def print_job(info: Any, stdout: TextIO) -> None:
    """Print the fields of a job that a user checks first."""
    fields = {
        "submission_id": info.submission_id,
        "status": info.status,
        "message": info.message,
        "run_name": (info.metadata or {}).get(METADATA_RUN),
        "start_time": _format_time(info.start_time),
        "end_time": _format_time(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "entrypoint": info.entrypoint,
    }
    for key, value in fields.items():
        print(f"{key}: {value}", file=stdout)


def _format_time(milliseconds: int | None) -> str | None:
    if not milliseconds:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(milliseconds / 1000))

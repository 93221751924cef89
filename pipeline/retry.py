"""Retries with exponential backoff for storage calls that fail for a passing reason.

Object stores drop connections, time out and return 500/503 ("SlowDown") under load; those
calls are worth repeating. A missing key, a denied request or a corrupt file is not: it
fails at once so that the work unit that needs it fails with the key named.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# OSError numbers that s3fs uses for throttling and server-side errors (SlowDown,
# ServiceUnavailable -> EBUSY; InternalError -> EREMOTEIO) and that sockets use for
# dropped or stalled connections.
TRANSIENT_ERRNOS = {
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO),
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
}
# Error codes of an S3 response (botocore ClientError) that a retry can clear.
TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}
PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import (
            ConnectionClosedError,
            EndpointConnectionError,
            HTTPClientError,
            ReadTimeoutError,
        )

        types += [ConnectionClosedError, EndpointConnectionError, HTTPClientError, ReadTimeoutError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        from aiohttp import ClientPayloadError, ServerDisconnectedError

        types += [ClientPayloadError, ServerDisconnectedError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


TRANSIENT_TYPES = _transient_types()


def is_transient(error: BaseException) -> bool:
    """Return True when `error` is one a later attempt of the same call can clear."""
    if isinstance(error, PERMANENT_TYPES):
        return False
    if isinstance(error, TRANSIENT_TYPES):
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in TRANSIENT_CODES or status in TRANSIENT_CODES
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    cause = error.__cause__
    return cause is not None and cause is not error and is_transient(cause)


def with_retries(call: Callable[[], T], what: str, attempts: int = 5, backoff: float = 0.5) -> T:
    """Run `call`, repeating it after transient errors with jittered exponential backoff.

    `what` names the operation and key in log messages (never credentials). The last
    transient error, or the first permanent one, propagates to the caller.
    """
    attempt = 1
    while True:
        try:
            return call()
        except Exception as error:
            if attempt >= attempts or not is_transient(error):
                raise
            delay = backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
            logger.warning(
                "%s failed (attempt %d of %d: %s: %s); retrying in %.2fs",
                what,
                attempt,
                attempts,
                type(error).__name__,
                error,
                delay,
            )
            time.sleep(delay)
            attempt += 1

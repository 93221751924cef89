"""Progress bars for long loops on the driver (sketch units, reduce parts, analysis reads).

Bars go to stderr through tqdm. They are off when stderr is not a terminal (logs, CI,
Ray workers), when the environment sets SDI_PROGRESS=0, or after `set_enabled(False)`
(the CLI's `--no-progress`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled: bool | None = None  # None: decide from the terminal and SDI_PROGRESS


def set_enabled(enabled: bool | None) -> None:
    """Turn progress bars on or off for this process; None restores the automatic choice."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    """Return whether progress bars are shown."""
    if _enabled is not None:
        return _enabled
    if os.environ.get("SDI_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar labelled `description` when bars are enabled."""
    if not enabled():
        yield from items
        return
    with tqdm(items, desc=description, total=total, unit="unit", leave=False) as bar:
        yield from bar


def gather(ray_module: Any, futures: list[Any], description: str) -> list[Any]:
    """Wait for Ray futures with a progress bar and return their results in input order."""
    if not futures:
        return []
    pending = list(futures)
    with tqdm(
        total=len(futures), desc=description, unit="part", leave=False, disable=not enabled()
    ) as bar:
        while pending:
            done, pending = ray_module.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray_module.get(futures)

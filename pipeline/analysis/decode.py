"""Token ids back to task text, so that every table can show the example itself."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

from operators.tasks import IGNORE_INDEX, make_task

logger = logging.getLogger(__name__)

Decoder = Callable[[list[int], list[int]], str]


def token_text(input_ids: list[int], targets: list[int]) -> str:
    """Render an example of an unknown task as its token ids and its supervised targets."""
    supervised = " ".join(str(t) for t in targets if t != IGNORE_INDEX)
    return f"{' '.join(str(t) for t in input_ids)} -> {supervised}"


def make_decoder(task_config: Any) -> Decoder:
    """Return the task's own decode function, or `token_text` when the task cannot be built.

    Runs on user data, or tasks this checkout does not have, still get readable tables.
    """
    try:
        task = make_task(task_config)
    except (ValueError, ImportError, AttributeError, KeyError) as error:
        logger.warning(
            "task %r cannot be built here (%s); showing examples as token ids",
            getattr(task_config, "name", task_config),
            error,
        )
        return token_text
    return task.decode


def example_texts(table: pa.Table, task_config: Any) -> pd.Series:
    """Decode every row of a data table (`example_id`, `input_ids`, `targets`).

    Returns a string Series indexed by example_id.
    """
    decode = make_decoder(task_config)
    ids = table.column("example_id").to_pylist()
    inputs = table.column("input_ids").to_pylist()
    targets = table.column("targets").to_pylist()
    texts = [decode(list(i), list(t)) for i, t in zip(inputs, targets, strict=True)]
    return pd.Series(texts, index=pd.Index(ids, name="example_id"), name="text", dtype=object)

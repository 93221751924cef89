"""Algorithmic tasks that generate their own data: parity and Sudoku."""

from __future__ import annotations

from typing import Any

from operators.tasks.base import IGNORE_INDEX, Example, Task
from operators.tasks.parity import ParityTask

__all__ = ["IGNORE_INDEX", "Example", "Task", "ParityTask", "make_task"]


def make_task(config: Any) -> Task:
    """Build the task named by `config.name` from a task configuration."""
    if config.name == "parity":
        return ParityTask(n_bits=config.n_bits, targets=config.targets)
    if config.name == "sudoku":
        from operators.tasks.sudoku import SudokuTask

        return SudokuTask(size=config.size, min_givens=config.min_givens)
    if config.name == "parquet":
        from operators.tasks.tokens import TokenTask

        if config.vocab_size is None or config.context_length is None:
            raise ValueError(
                "task.name=parquet needs task.vocab_size and task.context_length "
                "(the longest sequence the model takes)"
            )
        return TokenTask(config.vocab_size, config.context_length, config.pad_id)
    raise ValueError(f"task.name={config.name!r} is unknown; use parity, sudoku or parquet")

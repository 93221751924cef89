"""Token sequences supplied by the user as Parquet, with no generator behind them."""

from __future__ import annotations

from dataclasses import dataclass

from operators.tasks.base import IGNORE_INDEX, Example


@dataclass
class TokenTask:
    """The vocabulary and context of user-supplied examples (`task.name=parquet`).

    The prepare stage reads the examples from the configured Parquet files; this object
    only carries what the model and the batching need. `pad_id` may be any token id:
    padded positions are masked out of attention and carry no target.
    """

    vocab_size: int
    context_length: int
    pad_id: int = 0
    name: str = "parquet"

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"task.vocab_size must be at least 1, got {self.vocab_size}")
        if self.context_length < 1:
            raise ValueError(f"task.context_length must be at least 1, got {self.context_length}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"task.pad_id={self.pad_id} lies outside the vocabulary [0, {self.vocab_size})"
            )

    def generate(self, count: int, seed: int) -> list[Example]:
        raise ValueError(
            "task.name=parquet reads its examples from task.train_path and task.test_path; "
            "it cannot generate any"
        )

    def decode(self, input_ids: list[int], targets: list[int]) -> str:
        """Render as the token ids, then the targets of the positions that have one."""
        labelled = [f"{i}:{t}" for i, t in enumerate(targets) if t != IGNORE_INDEX]
        return f"{' '.join(str(t) for t in input_ids)} | {' '.join(labelled)}"

"""The contract every task generator follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Target value for positions that carry no loss (prompt, givens, padding); the same value
# that torch.nn.functional.cross_entropy ignores by default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One sequence: the tokens fed to the model and one target per position.

    `targets[i]` is the token the model should output at position i, or IGNORE_INDEX.
    """

    input_ids: list[int]
    targets: list[int]


class Task(Protocol):
    """A generator of examples with a fixed vocabulary.

    `pad_id` is a token id used only for padding; it never appears in generated examples.
    `context_length` is the length of the longest example the task can produce.
    """

    name: str
    vocab_size: int
    pad_id: int
    context_length: int

    def generate(self, count: int, seed: int) -> list[Example]:
        """Return `count` examples, the same ones for the same seed on every machine."""
        ...

    def decode(self, input_ids: list[int], targets: list[int]) -> str:
        """Render an example as human-readable text."""
        ...

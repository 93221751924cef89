"""Parity of a bit string: the bits, a separator, and the answer predicted at the separator."""

from __future__ import annotations

import random
from dataclasses import dataclass

from operators.tasks.base import IGNORE_INDEX, Example

ZERO, ONE, SEP, PAD = 0, 1, 2, 3
TARGET_MODES = ("final", "running")


@dataclass
class ParityTask:
    """Bit strings of `n_bits` bits followed by a separator token.

    With `targets="final"` only the separator position carries a loss (the parity of all
    bits). With `targets="running"` every bit position i is also supervised with the parity
    of bits 1..i, which makes the task learnable in seconds instead of thousands of steps.
    """

    n_bits: int = 8
    targets: str = "running"
    name: str = "parity"
    vocab_size: int = 4
    pad_id: int = PAD

    def __post_init__(self) -> None:
        if self.n_bits < 1:
            raise ValueError(f"task.n_bits must be at least 1, got {self.n_bits}")
        if self.targets not in TARGET_MODES:
            raise ValueError(f"task.targets must be one of {TARGET_MODES}, got {self.targets!r}")

    @property
    def context_length(self) -> int:
        return self.n_bits + 1

    def make_example(self, bits: list[int]) -> Example:
        """Build the example for one bit string."""
        running = []
        parity = 0
        for bit in bits:
            parity ^= bit
            running.append(parity)
        if self.targets == "running":
            targets = running + [parity]
        else:
            targets = [IGNORE_INDEX] * len(bits) + [parity]
        return Example(input_ids=list(bits) + [SEP], targets=targets)

    def generate(self, count: int, seed: int) -> list[Example]:
        """Draw `count` bit strings uniformly at random (with replacement)."""
        rng = random.Random(seed)
        return [
            self.make_example([rng.randint(0, 1) for _ in range(self.n_bits)]) for _ in range(count)
        ]

    def generate_disjoint(self, counts: list[int], seed: int) -> list[list[Example]]:
        """Draw several sets of distinct bit strings with no string shared between sets.

        Raises ValueError when 2**n_bits strings are too few for the requested counts.
        """
        total = sum(counts)
        if total > 2**self.n_bits:
            raise ValueError(
                f"{total} distinct parity examples requested but only 2**{self.n_bits} = "
                f"{2**self.n_bits} bit strings exist; lower task.n_train/task.n_test or "
                "raise task.n_bits"
            )
        rng = random.Random(seed)
        codes = rng.sample(range(2**self.n_bits), total)
        sets = []
        start = 0
        for count in counts:
            chunk = codes[start : start + count]
            start += count
            sets.append([self.make_example(self._bits(code)) for code in chunk])
        return sets

    def _bits(self, code: int) -> list[int]:
        return [(code >> i) & 1 for i in range(self.n_bits)]

    def decode(self, input_ids: list[int], targets: list[int]) -> str:
        """Render as `10110|1`: the bits, then the answer at the separator."""
        bits = "".join(str(t) for t in input_ids if t in (ZERO, ONE))
        answer = targets[-1] if targets and targets[-1] != IGNORE_INDEX else "?"
        return f"{bits}|{answer}"

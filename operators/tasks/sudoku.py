"""Sudoku: a puzzle with blank cells in, the solution digit predicted at every blank out.

A grid of `size` x `size` cells (size = n*n, boxes of n x n) is one sequence of size*size
tokens in row-major order. Token 0 is a blank cell, tokens 1..size are digits and token
size+1 is padding. Every generated puzzle has exactly one solution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from operators.tasks.base import IGNORE_INDEX, Example

BLANK = 0

# generate() draws at most this many puzzles per requested puzzle (plus a fixed slack)
# before it gives up on finding enough distinct ones.
MAX_DRAWS_PER_PUZZLE = 20
EXTRA_DRAWS = 100


def box_side(size: int) -> int:
    """Return n for a Sudoku of size n*n, or raise ValueError when size is not such a square."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"sudoku size must be an integer such as 4 or 9, got {size!r}")
    side = math.isqrt(size) if size > 0 else 0
    if side < 2 or side * side != size:
        raise ValueError(
            f"sudoku size must be a square n*n with n >= 2 (4, 9, 16, ...), got {size}. Use 4 or 9"
        )
    return side


def shuffle(items: list, rng: random.Random) -> None:
    """Shuffle `items` in place (Fisher-Yates) drawing only from `rng.random()`.

    The Python docs ("Notes on Reproducibility" in the random module) guarantee only the
    sequence of random() for a given seed across Python versions, not that of shuffle().
    """
    for last in range(len(items) - 1, 0, -1):
        pick = int(rng.random() * (last + 1))
        items[last], items[pick] = items[pick], items[last]


def _search(
    grid: list[int], size: int, limit: int, rng: random.Random | None = None
) -> tuple[int, list[int] | None]:
    """Count solutions of `grid` up to `limit` by backtracking on bitmasks.

    Returns the count and the first solution found (None when there is none). With `rng`
    the candidate digits of each cell are tried in random order, so the first solution of
    an empty grid is a random complete grid.
    """
    side = box_side(size)
    full = (1 << size) - 1
    # Units are numbered rows 0..size-1, columns size..2*size-1, boxes 2*size..3*size-1.
    # used[unit] is the bitmask of digits placed in that unit (bit d-1 for digit d).
    used = [0] * (3 * size)
    solution = list(grid)
    # Each blank cell as (index, row unit, column unit, box unit). The search reorders this
    # list in place so that blanks[depth:] are the cells still empty.
    blanks: list[tuple[int, int, int, int]] = []
    for index, value in enumerate(grid):
        row, col = divmod(index, size)
        units = (row, size + col, 2 * size + (row // side) * side + col // side)
        if value == BLANK:
            blanks.append((index, *units))
            continue
        bit = 1 << (value - 1)
        if (used[units[0]] | used[units[1]] | used[units[2]]) & bit:
            return 0, None
        for unit in units:
            used[unit] |= bit

    count = 0
    first: list[int] | None = None

    def choose(depth: int) -> tuple[int, int] | None:
        """Pick the blank to branch on and its candidate bitmask, or None at a dead end.

        The pick is the blank with the fewest candidates, unless some digit fits in only one
        cell of a unit (a hidden single), in which case that cell gets that digit alone.
        """
        masks = []
        best = depth
        best_mask = 0
        best_count = size + 1
        for k in range(depth, len(blanks)):
            _, row, col, box = blanks[k]
            mask = full & ~(used[row] | used[col] | used[box])
            candidates = mask.bit_count()
            if candidates < best_count:
                best, best_mask, best_count = k, mask, candidates
                if candidates <= 1:
                    break
            masks.append(mask)
        if best_count == 0:
            return None
        if best_count == 1:
            return best, best_mask

        # Every blank was scanned, so masks is complete. For each unit, `once` contains the
        # digits that fit at least one of its blanks and `twice` those that fit two or more.
        once = [0] * (3 * size)
        twice = [0] * (3 * size)
        for k, mask in enumerate(masks, start=depth):
            for unit in blanks[k][1:]:
                twice[unit] |= once[unit] & mask
                once[unit] |= mask
        for unit in range(3 * size):
            if full & ~(used[unit] | once[unit]):
                return None  # a digit missing from this unit fits none of its blanks
            single = once[unit] & ~twice[unit]
            if single:
                bit = single & -single
                for k, mask in enumerate(masks, start=depth):
                    if unit in blanks[k][1:] and mask & bit:
                        return k, bit
        return best, best_mask

    def descend(depth: int) -> bool:
        """Fill blanks[depth:] and return True once `limit` solutions are found."""
        nonlocal count, first
        if depth == len(blanks):
            count += 1
            if first is None:
                first = list(solution)
            return count >= limit

        choice = choose(depth)
        if choice is None:
            return False
        best, mask = choice
        blanks[depth], blanks[best] = blanks[best], blanks[depth]
        index, row, col, box = blanks[depth]
        bits = []
        while mask:
            bit = mask & -mask
            bits.append(bit)
            mask ^= bit
        if rng is not None:
            shuffle(bits, rng)

        done = False
        for bit in bits:
            used[row] |= bit
            used[col] |= bit
            used[box] |= bit
            solution[index] = bit.bit_length()
            done = descend(depth + 1)
            used[row] ^= bit
            used[col] ^= bit
            used[box] ^= bit
            if done:
                break
        solution[index] = BLANK
        blanks[depth], blanks[best] = blanks[best], blanks[depth]
        return done

    descend(0)
    return count, first


def count_solutions(grid: list[int], size: int, limit: int = 2) -> int:
    """Count the solutions of a puzzle, stopping at `limit`.

    `grid` contains size*size cells in row-major order, 0 for a blank and 1..size for a digit.
    Returns 0 when the givens already break a rule. `limit=2` is enough to tell a unique
    puzzle (1) from an ambiguous one (2).
    """
    box_side(size)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if len(grid) != size * size:
        raise ValueError(f"a {size}x{size} sudoku grid has {size * size} cells, got {len(grid)}")
    for value in grid:
        if not 0 <= value <= size:
            raise ValueError(
                f"sudoku cell values must be 0 (blank) or a digit 1..{size}, got {value}"
            )
    count, _ = _search(list(grid), size, limit)
    return count


@dataclass
class SudokuTask:
    """Sudoku puzzles with a unique solution, supervised at the blank cells only.

    `input_ids` is the puzzle (digit tokens at givens, 0 at blanks) and `targets` contains the
    solution digit at each blank and IGNORE_INDEX at each given. Cells are removed from a
    random complete grid in random order while the solution stays unique, until no further
    cell can be removed or `min_givens` givens remain.

    On one CPU core with Python 3.11 a 4x4 puzzle took about 0.3 ms and a 9x9 one about 17 ms.
    NOTE: larger sizes work but are slow: one 16x16 puzzle took 6 to 14 s (3 seeds).
    """

    size: int = 4
    min_givens: int | None = None
    name: str = "sudoku"

    def __post_init__(self) -> None:
        box_side(self.size)
        if self.min_givens is not None:
            cells = self.size * self.size
            if (
                isinstance(self.min_givens, bool)
                or not isinstance(self.min_givens, int)
                or not 0 <= self.min_givens < cells
            ):
                raise ValueError(
                    f"task.min_givens must be an integer from 0 to {cells - 1} for a "
                    f"{self.size}x{self.size} sudoku (or None for as few givens as "
                    f"possible), got {self.min_givens!r}"
                )

    @property
    def vocab_size(self) -> int:
        return self.size + 2

    @property
    def pad_id(self) -> int:
        return self.size + 1

    @property
    def context_length(self) -> int:
        return self.size * self.size

    def random_solution(self, rng: random.Random) -> list[int]:
        """Draw a complete valid grid by backtracking with random digit order.

        Every valid grid can come out, though not with equal probability. Permuting one base
        pattern would reach only 192 of the 288 4x4 grids.
        """
        _, grid = _search([BLANK] * self.context_length, self.size, 1, rng)
        assert grid is not None, "an empty sudoku grid always has a solution"
        return grid

    def make_puzzle(self, solution: list[int], rng: random.Random) -> list[int]:
        """Blank cells of `solution` in random order while the solution stays unique.

        A blank that would allow a second solution is undone. Removal stops early once
        `min_givens` givens remain.
        """
        puzzle = list(solution)
        order = list(range(len(puzzle)))
        shuffle(order, rng)
        givens = len(puzzle)
        floor = 0 if self.min_givens is None else self.min_givens
        for index in order:
            if givens <= floor:
                break
            puzzle[index] = BLANK
            count, _ = _search(puzzle, self.size, 2)
            if count == 1:
                givens -= 1
            else:
                puzzle[index] = solution[index]
        return puzzle

    def make_example(self, puzzle: list[int], solution: list[int]) -> Example:
        """Build the example for one puzzle and its solution."""
        targets = [
            digit if given == BLANK else IGNORE_INDEX
            for given, digit in zip(puzzle, solution, strict=True)
        ]
        return Example(input_ids=list(puzzle), targets=targets)

    def generate(self, count: int, seed: int) -> list[Example]:
        """Draw `count` distinct puzzles, redrawing any puzzle already drawn.

        Two puzzles may share a solution grid with different givens (4x4 has only 288
        grids). Raises ValueError when too few distinct puzzles turn up.
        """
        if count < 0:
            raise ValueError(f"count must be at least 0, got {count}")
        rng = random.Random(seed)
        examples = []
        seen: set[tuple[int, ...]] = set()
        max_draws = MAX_DRAWS_PER_PUZZLE * count + EXTRA_DRAWS
        draws = 0
        while len(examples) < count:
            if draws == max_draws:
                raise ValueError(
                    f"found only {len(examples)} distinct {self.size}x{self.size} sudoku "
                    f"puzzles in {draws} draws but {count} were requested. Request fewer "
                    "puzzles or use a larger task.size"
                )
            draws += 1
            solution = self.random_solution(rng)
            puzzle = self.make_puzzle(solution, rng)
            key = tuple(puzzle)
            if key in seen:
                continue
            seen.add(key)
            examples.append(self.make_example(puzzle, solution))
        return examples

    def generate_disjoint(self, counts: list[int], seed: int) -> list[list[Example]]:
        """Draw several sets of puzzles with no puzzle shared within or between sets.

        The sets are consecutive slices of `generate(sum(counts), seed)`, so the first set
        equals `generate(counts[0], seed)`.
        """
        for count in counts:
            if count < 0:
                raise ValueError(f"every count must be at least 0, got {counts}")
        examples = self.generate(sum(counts), seed)
        sets = []
        start = 0
        for count in counts:
            sets.append(examples[start : start + count])
            start += count
        return sets

    def decode(self, input_ids: list[int], targets: list[int]) -> str:
        """Render one row per line as `puzzle | solution`, boxes split by spaces.

        The puzzle shows '.' for blanks. The solution shows the target at each blank and the
        given elsewhere, or '?' at a blank without a target. An empty line separates bands.
        """
        cells = self.context_length
        if len(input_ids) != cells or len(targets) != cells:
            raise ValueError(
                f"a {self.size}x{self.size} sudoku example has {cells} input ids and "
                f"{cells} targets, got {len(input_ids)} and {len(targets)}"
            )
        side = box_side(self.size)
        width = len(str(self.size))

        def render_row(values: list[str]) -> str:
            joiner = "" if width == 1 else " "
            boxes = [
                joiner.join(value.rjust(width) for value in values[start : start + side])
                for start in range(0, self.size, side)
            ]
            return "  ".join(boxes) if width > 1 else " ".join(boxes)

        lines = []
        for row in range(self.size):
            if row > 0 and row % side == 0:
                lines.append("")
            puzzle_cells = []
            solution_cells = []
            for index in range(row * self.size, (row + 1) * self.size):
                given = input_ids[index]
                target = targets[index]
                if given == BLANK:
                    puzzle_cells.append(".")
                    solution_cells.append("?" if target == IGNORE_INDEX else str(target))
                else:
                    puzzle_cells.append(str(given))
                    solution_cells.append(str(given))
            lines.append(f"{render_row(puzzle_cells)} | {render_row(solution_cells)}")
        return "\n".join(lines)

"""4x4 sudoku: all 288 valid grids, unique-solution puzzles, and a split by solution grid."""
import functools
import itertools

import torch

from .base import TEST_PERCENT, Task, check_option


@functools.lru_cache(maxsize=None)
def sudoku_grids() -> torch.Tensor:
    """All 288 valid 4x4 grids, (288, 16) int64, row-major, lexicographic order (cached: don't
    modify)."""
    rows, grids = list(itertools.permutations(range(1, 5))), []

    def extend(partial):
        if len(partial) == 4:
            return grids.append(sum(partial, ()))
        for row in rows:  # columns must differ; rows 1 and 3 complete the 2x2 boxes of rows 0 and 2
            if all(row[c] != prev[c] for prev in partial for c in range(4)) and \
                    not (len(partial) % 2 and set(row[:2]) & set(partial[-1][:2])):
                extend(partial + [row])

    extend([])
    return torch.tensor(grids)


@functools.lru_cache(maxsize=None)
def _cell_masks() -> dict[tuple[int, int], int]:
    """(cell, digit) -> a 288-bit mask of the grids holding `digit` in `cell` (bit g = grid g)."""
    cells = {}
    for index, grid in enumerate(sudoku_grids().tolist()):
        for cell, digit in enumerate(grid):
            cells[cell, digit] = cells.get((cell, digit), 0) | 1 << index
    return cells


@functools.lru_cache(maxsize=None)
def _test_grids() -> torch.Tensor:
    """(288,) bool: the test grids, a fixed 20% chosen with a local generator (no global RNG)."""
    order = torch.randperm(288, generator=torch.Generator().manual_seed(20250))
    test = order[: round(288 * TEST_PERCENT / 100)]
    return torch.zeros(288, dtype=torch.bool).index_fill(0, test, True)


@functools.lru_cache(maxsize=None)
def _grid_texts() -> tuple[str, ...]:
    """The 288 grids as 16-character strings, in sudoku_grids' order."""
    return tuple("".join(map(str, grid)) for grid in sudoku_grids().tolist())


@functools.lru_cache(maxsize=None)
def _grid_index() -> dict[str, int]:
    """Grid string -> its index in sudoku_grids."""
    return {text: index for index, text in enumerate(_grid_texts())}


def _bits(mask: int):
    """The indices of the set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class Sudoku(Task):
    """4x4 sudoku: every row, column and 2x2 box holds 1..4.

    Problem = the puzzle as 16 characters, row-major, '0' for a blank: "0430001040202001"; prompt =
    that string (P=16); answer = the solved grid, all 16 digits: "1432321441232341" (L=16);
    block_size 4. A puzzle blanks k cells of a grid (k uniform in [min_blanks, max_blanks], cells
    uniform) and is kept only if its solution is unique among all 288 grids. Reward = fraction of
    the blanks filled correctly, the best over the valid completions when a puzzle (from a file)
    has several (givens are ignored; 0 if the prompt has no completion); exact = a valid grid that
    keeps every given. Harder variant: more blanks, e.g. min_blanks=8, max_blanks=12 (12 blanks
    leave 4 givens, the fewest a unique 4x4 puzzle can have; only ~5% of such draws are unique, so
    sampling is slower).
    Split by solution grid: a fixed 20% of the 288 grids are test grids, never seen in training.
    """

    name, block_size, prompt_len, response_len, draws_split = "sudoku", 4, 16, 16, True

    def __init__(self, min_blanks: int = 4, max_blanks: int = 10):
        super().__init__(min_blanks=min_blanks, max_blanks=max_blanks)
        self.min_blanks = check_option("min_blanks", min_blanks, range(1, 13))
        self.max_blanks = check_option("max_blanks", max_blanks, range(self.min_blanks, 13))

    @staticmethod
    def completions(problem: str) -> int:
        """The valid grids that keep every given, as a 288-bit mask (bit g = grid g): the AND of the
        givens' (cell, digit) masks. 0 if `problem` is not 16 digits 0-4 or has no completion."""
        if len(problem) != 16 or not set(problem) <= set("01234"):
            return 0
        found = (1 << 288) - 1
        for cell, c in enumerate(problem):
            if c != "0":
                found &= _cell_masks()[cell, int(c)]
        return found

    @classmethod
    def _solution(cls, problem: str) -> int | None:
        """Index of the puzzle's solution grid, None unless there is exactly one."""
        found = cls.completions(problem)
        exactly_one = found and not found & (found - 1)  # exactly one bit set
        return found.bit_length() - 1 if exactly_one else None

    def _checked_solution(self, problem: str) -> int:
        index = self._solution(problem)
        if index is None:
            raise ValueError(f"{problem!r} is not a 4x4 sudoku puzzle (16 digits 0-4) "
                             "with one solution")
        return index

    def is_problem(self, problem):  # any puzzle with a completion, one or several
        return self.completions(problem) != 0

    def answer_text(self, problem):
        return _grid_texts()[self._checked_solution(problem)]

    def split_of(self, problem):
        return "test" if _test_grids()[self._checked_solution(problem)] else "train"

    def score(self, problem, response_text):
        """Best fraction of blanks right over the valid completions (one for our puzzles; d1's
        test file has puzzles with several)."""
        found, blanks = self.completions(problem), [i for i, c in enumerate(problem) if c == "0"]
        if not found:
            return 0.0
        if not blanks:
            return 1.0  # vacuously all filled correctly
        # r = max over completions g of |{i blank : y_i = g_i}| / |blanks|   (docs/math.md §7)
        best = 0
        for index in _bits(found):
            solution = _grid_texts()[index]
            best = max(best, sum(i < len(response_text) and response_text[i] == solution[i]
                                 for i in blanks))
        return best / len(blanks)

    def is_exact(self, problem, response_text):
        """A valid grid that keeps every given (all 16 cells checked)."""
        index = _grid_index().get(response_text[:16])
        return index is not None and bool(self.completions(problem) >> index & 1)

    def _candidates(self, m, split, generator):
        pool = (_test_grids() == (split == "test")).nonzero().flatten()  # grids of this split
        picks = pool[torch.randint(0, len(pool), (m,), generator=generator)]
        grids = sudoku_grids()[picks]  # (m, 16)
        k = torch.randint(self.min_blanks, self.max_blanks + 1, (m, 1), generator=generator)
        rank = torch.rand(m, 16, generator=generator).argsort(1).argsort(1)  # (m, 16) cell order
        blanked = grids.masked_fill(rank < k, 0).tolist()  # (m, 16): k blanks each
        puzzles = ["".join(map(str, p)) for p in blanked]
        return [p for p in puzzles if self._solution(p) is not None]  # keep unique-solution puzzles

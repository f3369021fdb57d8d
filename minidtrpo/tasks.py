"""Synthetic tasks with verifiable rewards for a masked-diffusion LM (SPEC §7).

Every task turns a *problem string* into a prompt of P tokens and a reference answer of L tokens, and
scores any response of L tokens with a reward in [0, 1] that never raises: RL feeds it raw model
output (masks, EOS in the middle, anything). No Python `eval` of model output anywhere.

Vocabulary (one, shared by all tasks; `Vocab`):
    CHARS = "0123456789+-*/=,:|()abcdefghijklmnopqrstuvwxyz"  -> ids 0..45 in that order (digit d = id d)
    EOS  = 46  end of text and padding (prompts and answers are right-padded with it), decoded as ""
    MASK = 47  the diffusion mask token, decoded as "_"; never part of a prompt or an answer

Tasks (details and P / L / block_size in each class docstring):
    addition   problem "1234+5678"     prompt "4321+8765="  answer "21960" (least-significant digit first)
    countdown  problem "30,100,93:23"  prompt the same      answer "30+93-100" or "30+93=123,123-100=23"
    sudoku     problem "0430001040202001" (4x4, 0 = blank)  answer "1432321441232341" (the solved grid)
    star       problem "cd,ab,bc,ae,ef,fg:ad" (edges:source goal)   answer "abcd" (the path)

Scorers read the response up to its first EOS (`Task.response_text`) and at most L characters.
Train and test never overlap: a problem's split is a deterministic function of the problem itself
(crc32 of a canonical string, or the solution grid for sudoku); `sample` keeps only the requested split.
Shapes: n examples, P prompt length, L response length.
"""
import functools
import inspect
import itertools
import re
import zlib

import torch

CHARS = "0123456789+-*/=,:|()abcdefghijklmnopqrstuvwxyz"
EOS_ID, MASK_ID = len(CHARS), len(CHARS) + 1  # 46, 47
SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of problems (by hash) or of sudoku grids that belong to the test split


class Vocab:
    """Character vocabulary: `encode` is strict (raises), `decode` is total (never raises)."""

    def __init__(self):
        self.chars, self.eos_id, self.mask_id, self.size = CHARS, EOS_ID, MASK_ID, len(CHARS) + 2
        self._index = {c: i for i, c in enumerate(CHARS)}
        self._render = tuple(CHARS) + ("", "_")  # EOS renders as "", MASK as "_"

    def encode(self, text: str) -> list[int]:
        bad = [c for c in text if c not in self._index]
        if bad:
            raise ValueError(f"character {bad[0]!r} is not in the vocabulary; valid characters: {CHARS!r}")
        return [self._index[c] for c in text]

    def decode(self, ids) -> str:
        """ids: a list or 1-D tensor of ints; ids outside [0, size) render as "?" (models emit anything)."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self._render[i] if 0 <= i < self.size else "?" for i in map(int, ids))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _hash_split(canonical: str) -> str:
    """Stable across runs and machines (crc32, unlike Python's salted hash())."""
    return "test" if zlib.crc32(canonical.encode()) % 100 < TEST_PERCENT else "train"


def _option(name: str, value, choices):
    """Validate one task option; `choices` is a range of ints or a tuple of allowed values."""
    if type(value) is not type(choices[0]) or value not in choices:
        valid = f"an int in [{choices[0]}, {choices[-1]}]" if isinstance(choices, range) else choices
        raise ValueError(f"option {name}={value!r} is invalid; valid: {valid}")
    return value


class Task:
    """Base class: attributes name, vocab, options, prompt_len (P), response_len (L) and block_size
    (the default decoding block; L is a multiple of it).

    A subclass implements `answer_text`, `score` and `split_of` on problem strings, plus `_candidates`
    (random problem strings); this class turns them into tensors (`sample`, `reward`, `exact`).
    """

    name, block_size, prompt_len, response_len = "task", 4, 0, 0
    draws_split = False  # True if `_candidates` returns only problems of the requested split

    def __init__(self, **options):
        self.vocab, self.options = Vocab(), options

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts}) P={self.prompt_len} L={self.response_len} block={self.block_size}"

    # ---- strings <-> tokens -------------------------------------------------------------------
    def prompt_text(self, problem: str) -> str:
        return problem  # addition overrides it: its prompt writes the operands reversed

    def encode_problem(self, problem: str) -> torch.Tensor:
        return self._pad_rows([self.prompt_text(problem)], self.prompt_len)[0]  # (P,)

    def decode_problem(self, prompt_ids) -> str:
        """Inverse of `encode_problem`; never raises (other ids give best-effort text)."""
        return self.response_text(prompt_ids)

    def response_text(self, ids) -> str:
        """Decoded text up to the first EOS: what every scorer reads."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.vocab.decode(ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids)

    def _pad_rows(self, texts: list[str], length: int) -> torch.Tensor:
        rows = [self.vocab.encode(t) for t in texts]
        for t, ids in zip(texts, rows):
            if len(ids) > length:
                raise ValueError(f"{t!r} has {len(ids)} tokens, more than the {length} available")
        padded = [ids + [EOS_ID] * (length - len(ids)) for ids in rows]  # right-pad with EOS
        return torch.tensor(padded, dtype=torch.long).reshape(-1, length)  # (n, length)

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, n: int, split: str = "train", generator: torch.Generator | None = None):
        """Fresh examples of `split`: prompts (n, P) and answers (n, L), both int64, EOS-padded."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        share = 1.0 if self.draws_split else (TEST_PERCENT if split == "test" else 100 - TEST_PERCENT) / 100
        problems, size = [], int(n / share * 1.2) + 8
        for _ in range(1000):
            if len(problems) >= n:
                break
            # Rejection: problems of the other split are dropped; rounds grow while too few survive.
            problems += [p for p in self._candidates(size, split, generator) if self.split_of(p) == split]
            size = min(2 * size, 16384)
        else:
            raise RuntimeError(f"{self!r}: could not draw {n} {split} problems; the options leave too few")
        prompts = self._pad_rows([self.prompt_text(p) for p in problems[:n]], self.prompt_len)  # (n, P)
        return prompts, self._pad_rows([self.answer_text(p) for p in problems[:n]], self.response_len)

    def test_set(self, n: int, seed: int = 0):
        """A fixed test set: the same (n, P), (n, L) tensors for the same options, n and seed."""
        return self.sample(n, "test", torch.Generator().manual_seed(seed))

    # ---- rewards ------------------------------------------------------------------------------
    def reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n,) float32 in [0, 1] on the responses' device; never raises on any token ids."""
        return self._per_row(self.score, prompts, responses, torch.float32)

    def exact(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the response is fully correct (what "exact accuracy" counts)."""
        return self._per_row(self.is_exact, prompts, responses, torch.bool)

    def is_exact(self, problem: str, response_text: str) -> bool:
        return self.score(problem, response_text) >= 1.0  # sudoku also checks the givens

    def _per_row(self, fn, prompts, responses, dtype):
        if prompts.dim() != 2 or responses.dim() != 2 or len(prompts) != len(responses) \
                or prompts.shape[1] != self.prompt_len or responses.shape[1] != self.response_len:
            raise ValueError(f"expected prompts (n, {self.prompt_len}) and responses (n, "
                             f"{self.response_len}); got {tuple(prompts.shape)} and {tuple(responses.shape)}")
        rows = zip(prompts.tolist(), responses.tolist())  # one string scorer per row: a few us each
        out = [fn(self.decode_problem(p), self.response_text(r)) for p, r in rows]
        return torch.tensor(out, dtype=dtype, device=responses.device)


class Addition(Task):
    """a + b with n-digit operands (uniform in [0, 10^n), zero-padded); answer = the (n+1)-digit sum.

    Problem "1234+5678" (always natural order). With lsb_first=True (default) the prompt writes both
    operands least-significant digit first and so is the answer, so each answer digit depends only on
    digits already seen and the carry just written (SPEC §7: most-significant-first was not learned):
        problem "1234+5678"  prompt "4321+8765="  answer "21960"  (6912 -> "06912" -> reversed)
    lsb_first=False writes everything most-significant first: prompt "1234+5678=", answer "06912".
    P = round_up(2n+2, 4), L = round_up(n+1, 4), block_size 1 (digits=4: P=12, L=8): one token per block, so
    decoding is left to right and every digit is predicted after the digits (and carries) below it. Measured
    (README): the default 0.8M model reached 100% exact in 180 CPU seconds with block 1 and 27% with block 4,
    where a digit is often predicted before the digit whose carry it needs.
    Reward: 1 if the first n+1 characters of the response are the answer, else 0 (what follows them
    is ignored); partial=True gives the fraction of those n+1 digits that are right instead.
    Split: crc32 of the two operands in sorted order (a+b and b+a share a split).
    """

    name, block_size = "addition", 1

    def __init__(self, digits: int = 4, lsb_first: bool = True, partial: bool = False):
        super().__init__(digits=digits, lsb_first=lsb_first, partial=partial)
        self.n = _option("digits", digits, range(1, 16))
        self.lsb_first = _option("lsb_first", lsb_first, (True, False))
        self.partial = _option("partial", partial, (True, False))
        self.prompt_len, self.response_len = _round_up(2 * self.n + 2, 4), _round_up(self.n + 1, 4)
        self._re = re.compile(rf"(\d{{{self.n}}})\+(\d{{{self.n}}})")

    def _operands(self, problem: str) -> tuple[str, str]:
        match = self._re.fullmatch(problem)
        if match is None:
            raise ValueError(f"{problem!r} is not a {self.n}-digit addition problem like '1234+5678'")
        return match.group(1), match.group(2)

    def prompt_text(self, problem):
        a, b = self._operands(problem)
        return (a[::-1] + "+" + b[::-1] if self.lsb_first else a + "+" + b) + "="

    def decode_problem(self, prompt_ids):
        text = self.response_text(prompt_ids)
        if self._re.fullmatch(text[:-1]) is None or text[-1] != "=":
            return text  # not a prompt of this task (score() gives 0 unless it happens to parse)
        a, b = text[:-1].split("+")
        return a[::-1] + "+" + b[::-1] if self.lsb_first else a + "+" + b

    def answer_text(self, problem):
        a, b = self._operands(problem)
        total = str(int(a) + int(b)).zfill(self.n + 1)
        return total[::-1] if self.lsb_first else total

    def split_of(self, problem):
        return _hash_split("+".join(sorted(self._operands(problem))))

    def score(self, problem, response_text):
        if self._re.fullmatch(problem) is None:
            return 0.0
        answer = self.answer_text(problem)
        right = sum(i < len(response_text) and response_text[i] == c for i, c in enumerate(answer))
        return right / len(answer) if self.partial else float(right == len(answer))

    def _candidates(self, m, split, generator):
        operands = torch.randint(0, 10 ** self.n, (m, 2), generator=generator).tolist()  # (m, 2)
        return [f"{a:0{self.n}d}+{b:0{self.n}d}" for a, b in operands]


@functools.lru_cache(maxsize=None)
def _sudoku_grids() -> torch.Tensor:
    """All 288 valid 4x4 grids, (288, 16) int64, row-major, lexicographic order (cached: don't modify)."""
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
def _sudoku_cells() -> dict[tuple[int, int], int]:
    """(cell, digit) -> a 288-bit mask of the grids holding `digit` in `cell` (bit g = grid g)."""
    cells = {}
    for index, grid in enumerate(_sudoku_grids().tolist()):
        for cell, digit in enumerate(grid):
            cells[cell, digit] = cells.get((cell, digit), 0) | 1 << index
    return cells


@functools.lru_cache(maxsize=None)
def _sudoku_test_grids() -> torch.Tensor:
    """(288,) bool: the test grids, a fixed 20% chosen with a local generator (no global RNG)."""
    order = torch.randperm(288, generator=torch.Generator().manual_seed(20250))
    return torch.zeros(288, dtype=torch.bool).index_fill(0, order[: round(288 * TEST_PERCENT / 100)], True)


def _grid_text(index: int) -> str:
    return "".join(map(str, _sudoku_grids()[index].tolist()))


class Sudoku(Task):
    """4x4 sudoku: every row, column and 2x2 box holds 1..4.

    Problem = the puzzle as 16 characters, row-major, '0' for a blank: "0430001040202001"; prompt = that
    string (P=16); answer = the solved grid, all 16 digits: "1432321441232341" (L=16); block_size 4.
    A puzzle blanks k cells of a grid (k uniform in [min_blanks, max_blanks], cells uniform) and is kept
    only if its solution is unique among all 288 grids. Reward = fraction of the blanks filled correctly
    (givens are ignored; 0 if the prompt is not a puzzle with a unique solution); exact = all 16 cells
    right. Harder variant: more blanks, e.g. min_blanks=8, max_blanks=12 (12 blanks leave 4 givens, the
    fewest a unique 4x4 puzzle can have; only ~5% of such draws are unique, so sampling is slower).
    Split by solution grid: a fixed 20% of the 288 grids are test grids, never seen in training.
    """

    name, block_size, prompt_len, response_len, draws_split = "sudoku", 4, 16, 16, True

    def __init__(self, min_blanks: int = 4, max_blanks: int = 10):
        super().__init__(min_blanks=min_blanks, max_blanks=max_blanks)
        self.min_blanks = _option("min_blanks", min_blanks, range(1, 13))
        self.max_blanks = _option("max_blanks", max_blanks, range(self.min_blanks, 13))

    @staticmethod
    def _solution(problem: str) -> int | None:
        """Index of the puzzle's solution grid, None unless there is exactly one: the grids agreeing
        with all givens are the AND of the givens' (cell, digit) bitmasks."""
        if len(problem) != 16 or not set(problem) <= set("01234"):
            return None
        found = (1 << 288) - 1
        for cell, c in enumerate(problem):
            if c != "0":
                found &= _sudoku_cells()[cell, int(c)]
        return found.bit_length() - 1 if found and not found & (found - 1) else None  # exactly one bit set

    def _checked_solution(self, problem: str) -> int:
        index = self._solution(problem)
        if index is None:
            raise ValueError(f"{problem!r} is not a 4x4 sudoku puzzle (16 digits 0-4) with one solution")
        return index

    def answer_text(self, problem):
        return _grid_text(self._checked_solution(problem))

    def split_of(self, problem):
        return "test" if _sudoku_test_grids()[self._checked_solution(problem)] else "train"

    def score(self, problem, response_text):
        index = self._solution(problem)
        if index is None:
            return 0.0
        solution, blanks = _grid_text(index), [i for i, c in enumerate(problem) if c == "0"]
        right = sum(i < len(response_text) and response_text[i] == solution[i] for i in blanks)
        return right / len(blanks) if blanks else 1.0  # no blanks: vacuously all filled correctly

    def is_exact(self, problem, response_text):
        index = self._solution(problem)  # all 16 cells, givens included
        return index is not None and response_text[:16] == _grid_text(index)

    def _candidates(self, m, split, generator):
        pool = (_sudoku_test_grids() == (split == "test")).nonzero().flatten()  # grids of this split
        grids = _sudoku_grids()[pool[torch.randint(0, len(pool), (m,), generator=generator)]]  # (m, 16)
        k = torch.randint(self.min_blanks, self.max_blanks + 1, (m, 1), generator=generator)  # (m, 1)
        rank = torch.rand(m, 16, generator=generator).argsort(1).argsort(1)  # (m, 16) random cell order
        puzzles = ["".join(map(str, p)) for p in grids.masked_fill(rank < k, 0).tolist()]  # k blanks each
        return [p for p in puzzles if self._solution(p) is not None]  # keep puzzles with one solution


class Star(Task):
    """Path-finding on a star graph (Bachmann & Nagarajan, "The pitfalls of next-token prediction").

    A source node with `degree` arms, each a chain of path_len-1 further nodes; node labels are distinct
    random letters among the first num_nodes letters. Problem = the edges (two letters, pointing away
    from the source) in random order, comma-separated, then ":", the source and the goal (the leaf of a
    random arm). degree=2, path_len=4: "cd,ab,bc,ae,ef,fg:ad" -> answer "abcd" (source..goal), or "dcba"
    with reverse=True: backwards every next node is a lookup of the one edge into the current node,
    while forwards the first step needs planning (which arm leads to the goal?). Prompt = the problem,
    P = round_up(3*degree*(path_len-1) + 2, 4), L = round_up(path_len, 4), block_size 4 (defaults:
    P=20, L=4; degree=3, path_len=5: P=40, L=8). Reward: 1 if the first path_len characters of the
    response are the answer, else 0. Split: crc32 of the sorted edges, source and goal.
    """

    name = "star"

    def __init__(self, degree: int = 2, path_len: int = 4, num_nodes: int = 20, reverse: bool = False):
        super().__init__(degree=degree, path_len=path_len, num_nodes=num_nodes, reverse=reverse)
        self.degree = _option("degree", degree, range(1, 26))
        self.path_len = _option("path_len", path_len, range(2, 27))
        self.n_edges = degree * (path_len - 1)
        if self.n_edges + 1 > 26:
            raise ValueError(f"degree={degree}, path_len={path_len} need {self.n_edges + 1} nodes; "
                             "valid: at most 26")
        self.num_nodes = _option("num_nodes", num_nodes, range(self.n_edges + 1, 27))
        self.reverse = _option("reverse", reverse, (True, False))
        self.prompt_len, self.response_len = _round_up(3 * self.n_edges + 2, 4), _round_up(path_len, 4)

    def _path(self, problem: str) -> str | None:
        """The source..goal path along the problem's edges, or None if the problem is malformed."""
        match = re.fullmatch(r"((?:[a-z]{2},)*[a-z]{2}):([a-z])([a-z])", problem)
        if match is None:
            return None
        parent = {}
        for edge in match.group(1).split(","):
            parent.setdefault(edge[1], edge[0])
        path, source = [match.group(3)], match.group(2)  # walk back from the goal
        while path[-1] != source and path[-1] in parent and len(path) <= len(parent):
            path.append(parent[path[-1]])
        return "".join(reversed(path)) if path[-1] == source else None

    def answer_text(self, problem):
        path = self._path(problem)
        if path is None:
            raise ValueError(f"{problem!r} is not a graph-path problem like 'cd,ab,bc,ae,ef,fg:ad'")
        return path[::-1] if self.reverse else path

    def split_of(self, problem):
        self.answer_text(problem)  # validates
        edges, ends = problem.split(":")
        return _hash_split(",".join(sorted(edges.split(","))) + ":" + ends)  # edge order does not matter

    def score(self, problem, response_text):
        if self._path(problem) is None:
            return 0.0
        answer = self.answer_text(problem)
        return float(response_text[: len(answer)] == answer)

    def _candidates(self, m, split, generator):
        K, E = self.path_len, self.n_edges
        labels = torch.rand(m, self.num_nodes, generator=generator).argsort(1)[:, : E + 1].tolist()
        orders = torch.rand(m, E, generator=generator).argsort(1).tolist()  # edge shuffle
        arms = torch.randint(0, self.degree, (m,), generator=generator).tolist()  # the goal's arm
        problems = []
        for label, order, arm in zip(labels, orders, arms):
            names = [chr(ord("a") + i) for i in label]  # distinct letters; names[0] is the source
            chains = [names[:1] + names[1 + d * (K - 1): 1 + (d + 1) * (K - 1)] for d in range(self.degree)]
            edges = [chain[i] + chain[i + 1] for chain in chains for i in range(K - 1)]
            problems.append(",".join(edges[o] for o in order) + ":" + names[0] + chains[arm][-1])
        return problems


TASKS = ("addition", "countdown", "sudoku", "star")


def _registry() -> dict:
    from .countdown import Countdown  # countdown.py builds on Task, so it is imported when first needed

    return {cls.name: cls for cls in (Addition, Countdown, Sudoku, Star)}


def get_task(name: str, **options) -> Task:
    """get_task("addition", digits=6) -> Task. Unknown names and options raise ValueError."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    valid = [p for p in inspect.signature(registry[name].__init__).parameters if p != "self"]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"unknown option(s) {', '.join(bad)} for task {name!r}; "
                         f"valid options: {', '.join(valid)}")
    return registry[name](**options)

"""What every task shares: the vocabulary, the splits, the `Task` base class and its helpers.

The task modules (addition, countdown, sudoku, star) import only from here; the registry is in
`minidtrpo/tasks/__init__.py`.
"""
import zlib

import torch

CHARS = "0123456789+-*/=,:|()abcdefghijklmnopqrstuvwxyz"
EOS_ID, MASK_ID = len(CHARS), len(CHARS) + 1  # 46, 47
SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of problems (by hash) or of sudoku grids that belong to the test split


class Vocab:
    """Character vocabulary: `encode` is strict (raises), `decode` is total (never raises)."""

    def __init__(self):
        self.chars, self.eos_id, self.mask_id = CHARS, EOS_ID, MASK_ID
        self.size = len(CHARS) + 2
        self._index = {c: i for i, c in enumerate(CHARS)}
        self._render = tuple(CHARS) + ("", "_")  # EOS renders as "", MASK as "_"

    def encode(self, text: str) -> list[int]:
        bad = [c for c in text if c not in self._index]
        if bad:
            raise ValueError(f"character {bad[0]!r} is not in the vocabulary; "
                             f"valid characters: {CHARS!r}")
        return [self._index[c] for c in text]

    def decode(self, ids) -> str:
        """ids: a list or 1-D tensor of ints; ids outside [0, size) render as "?" (models emit
        anything)."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self._render[i] if 0 <= i < self.size else "?" for i in map(int, ids))


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x (prompt and response lengths)."""
    return -(-x // multiple) * multiple


def hash_split(canonical: str) -> str:
    """"train" or "test" for a problem's canonical string; stable across runs and machines
    (crc32, unlike Python's salted hash())."""
    return "test" if zlib.crc32(canonical.encode()) % 100 < TEST_PERCENT else "train"


def check_option(name: str, value, choices):
    """Validate one task option and return it; `choices` is a range of ints or a tuple of allowed
    values. Raises ValueError naming the valid values."""
    if type(value) is not type(choices[0]) or value not in choices:
        valid = (f"an int in [{choices[0]}, {choices[-1]}]" if isinstance(choices, range)
                 else choices)
        raise ValueError(f"option {name}={value!r} is invalid; valid: {valid}")
    return value


class Task:
    """Base class: attributes name, vocab, options, prompt_len (P), response_len (L) and block_size
    (the default decoding block; L is a multiple of it).

    A subclass implements `answer_text`, `score` and `split_of` on problem strings, plus
    `_candidates` (random problem strings); this class turns them into tensors (`sample`, `reward`,
    `exact`).
    """

    name, block_size, prompt_len, response_len = "task", 4, 0, 0
    draws_split = False  # True if `_candidates` returns only problems of the requested split
    # SFT options this task's recipe sets where the command line leaves them (SFTConfig.defaults;
    # docs/results.md "Supervised training"): none, SFTConfig's own defaults (300 steps)
    sft_recipe = {}

    def __init__(self, **options):
        self.vocab, self.options = Vocab(), options

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"{self.name}({opts}) P={self.prompt_len} L={self.response_len} "
                f"block={self.block_size}")

    def is_problem(self, problem: str) -> bool:
        """Whether `problem` is one this task can score (a problem read from a file, say)."""
        try:
            self.answer_text(problem)
            return True
        except ValueError:
            return False

    # ---- strings <-> tokens ---------------------------------------------------------------
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

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, n: int, split: str = "train", generator: torch.Generator | None = None):
        """Fresh examples of `split`: prompts (n, P) and answers (n, L), both int64, EOS-padded."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        percent = TEST_PERCENT if split == "test" else 100 - TEST_PERCENT
        share = 1.0 if self.draws_split else percent / 100
        problems, size = [], int(n / share * 1.2) + 8
        for _ in range(1000):
            if len(problems) >= n:
                break
            # Rejection: problems of the other split are dropped; rounds grow while too few survive.
            candidates = self._candidates(size, split, generator)
            problems += [p for p in candidates if self.split_of(p) == split]
            size = min(2 * size, 16384)
        else:
            raise RuntimeError(f"{self!r}: could not draw {n} {split} problems; "
                               "the options leave too few")
        problems = problems[:n]
        prompts = self._pad_rows([self.prompt_text(p) for p in problems], self.prompt_len)  # (n, P)
        return prompts, self._pad_rows([self.answer_text(p) for p in problems], self.response_len)

    def test_set(self, n: int, seed: int = 0):
        """A fixed test set: the same (n, P), (n, L) tensors for the same options, n and seed."""
        return self.sample(n, "test", torch.Generator().manual_seed(seed))

    # ---- rewards --------------------------------------------------------------------------
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
                             f"{self.response_len}); got {tuple(prompts.shape)} and "
                             f"{tuple(responses.shape)}")
        rows = zip(prompts.tolist(), responses.tolist())  # one string scorer per row: a few us each
        out = [fn(self.decode_problem(p), self.response_text(r)) for p, r in rows]
        return torch.tensor(out, dtype=dtype, device=responses.device)

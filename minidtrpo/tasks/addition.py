"""Addition of two n-digit numbers, written least-significant digit first by default."""
import re

import torch

from .base import Task, check_option, hash_split, round_up


class Addition(Task):
    """a + b with n-digit operands (uniform in [0, 10^n), zero-padded); answer = the (n+1)-digit
    sum.

    Problem "1234+5678" (always natural order). With lsb_first=True (default) the prompt writes
    both operands least-significant digit first and so is the answer, so each answer digit depends
    only on digits already seen and the carry just written (docs/math.md §7; most-significant first,
    a digit would depend on carries from digits not yet written):
        problem "1234+5678"  prompt "4321+8765="  answer "21960"  (6912 -> "06912" -> reversed)
    lsb_first=False writes everything most-significant first: prompt "1234+5678=", answer "06912".
    P = round_up(2n+2, 4), L = round_up(n+1, 4), block_size 1 (digits=4: P=12, L=8): one token per
    block, so decoding is left to right and every digit is predicted after the digits (and carries)
    below it; with larger blocks a digit can be predicted before the digit whose carry it needs.
    Reward: 1 if the first n+1 characters of the response are the answer, else 0 (what follows them
    is ignored); partial=True gives the fraction of those n+1 digits that are right instead.
    Split: crc32 of the two operands in sorted order (a+b and b+a share a split).
    Curriculum without a schedule: a share `short_share` of the training problems (default half)
    have k ~ U{1..n} digits, zero-padded, the rest n; the test problems all have n. Trained on
    n-digit problems alone, the model learns addition on some seeds and stays at chance on others
    (the lookup of an answer digit's two operand digits is found late or never); the short
    problems, most of whose answer digits are 0 or a single sum, show it early (docs/results.md,
    "Supervised training").
    """

    name, block_size = "addition", 1
    # SFT's recipe (docs/results.md "Supervised training"): ≥ 95% exact on every seed measured
    sft_recipe = {"max_steps": 1000, "eval_every": 250}

    def __init__(self, digits: int = 4, lsb_first: bool = True, partial: bool = False,
                 short_share: float = 0.5):
        super().__init__(digits=digits, lsb_first=lsb_first, partial=partial,
                         short_share=short_share)
        if type(short_share) not in (int, float) or not 0 <= short_share <= 1:
            raise ValueError(f"option short_share={short_share!r} is invalid; valid: a number "
                             "in [0, 1]")
        self.short_share = float(short_share)
        self.n = check_option("digits", digits, range(1, 16))
        self.lsb_first = check_option("lsb_first", lsb_first, (True, False))
        self.partial = check_option("partial", partial, (True, False))
        self.prompt_len, self.response_len = round_up(2 * self.n + 2, 4), round_up(self.n + 1, 4)
        self._re = re.compile(rf"(\d{{{self.n}}})\+(\d{{{self.n}}})")

    def _operands(self, problem: str) -> tuple[str, str]:
        match = self._re.fullmatch(problem)
        if match is None:
            raise ValueError(f"{problem!r} is not a {self.n}-digit addition problem like "
                             "'1234+5678'")
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
        return hash_split("+".join(sorted(self._operands(problem))))

    def score(self, problem, response_text):
        if self._re.fullmatch(problem) is None:
            return 0.0
        answer = self.answer_text(problem)
        right = sum(i < len(response_text) and response_text[i] == c for i, c in enumerate(answer))
        return right / len(answer) if self.partial else float(right == len(answer))

    def _candidates(self, m, split, generator):
        if split == "test":  # the test problems: n-digit operands, uniform
            operands = torch.randint(0, 10 ** self.n, (m, 2), generator=generator).tolist()
            return [f"{a:0{self.n}d}+{b:0{self.n}d}" for a, b in operands]
        # training problems: short_share of them with k ~ U{1..n} digits (zero-padded), the rest n
        digits = torch.randint(1, self.n + 1, (m, 1), generator=generator)
        digits[torch.rand(m, 1, generator=generator) >= self.short_share] = self.n
        operands = (torch.rand(m, 2, generator=generator, dtype=torch.float64)
                    * 10.0 ** digits).long().tolist()  # (m, 2), each in [0, 10^k)
        return [f"{a:0{self.n}d}+{b:0{self.n}d}" for a, b in operands]

"""Countdown (d1's CD3 task): its generator, a safe arithmetic scorer, and the reference solver.

A module of its own because its parser is a concept of its own: the response is parsed with the
standard library's `ast` and walked with a whitelist (integer literals, + - * /), evaluated exactly
with Fraction. Nothing is ever passed to Python's eval.
"""
import ast
import itertools
import re
from fractions import Fraction

import torch

from .base import Task, check_option, hash_split

_OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_INT = r"(-?(?:0|[1-9]\d*))"  # an integer without leading zeros
_STEP = re.compile(rf"{_INT}([-+*/]){_INT}={_INT}")
_COUNTDOWN = re.compile(r"([1-9]\d*),([1-9]\d*),([1-9]\d*):([1-9]\d*)")


def _apply(op: str, x, y):
    """x op y, exact (Fraction for /); None when dividing by zero. Used to check model answers."""
    if op == "/":
        return None if y == 0 else Fraction(x) / y
    return x + y if op == "+" else x - y if op == "-" else x * y


def _positive_int(op: str, x: int, y: int) -> int | None:
    """x op y for positive ints if the result is a positive integer (reference solutions), else
    None."""
    if op == "-":
        return x - y if x > y else None
    if op == "/":
        return x // y if x % y == 0 else None
    return x + y if op == "+" else x * y


def _int_op(op, x, y):
    """`_positive_int` on tensors: op (m,) indexes "+-*/", x, y (m,) positive -> value (m,),
    ok (m,)."""
    quotient = x // y.clamp(min=1)
    value = torch.stack([x + y, x - y, x * y, quotient], 1).gather(1, op[:, None])[:, 0]  # (m,)
    return value, (value > 0) & (y > 0) & ((op != 3) | (quotient * y == x))


def _solve_countdown(numbers: list[int], target: int):
    """First solution in a fixed search order whose intermediate results are positive integers:
    (x, op1, y, op2, z, pair_left), meaning (x op1 y) op2 z if pair_left else z op2 (x op1 y)."""
    for i, j, k in itertools.permutations(range(3)):
        x, y, z = numbers[i], numbers[j], numbers[k]
        for op1 in _OPS:
            # (j, i) was tried already for + and *
            r1 = None if op1 in "+*" and i > j else _positive_int(op1, x, y)
            for op2 in _OPS if r1 else ():
                if _positive_int(op2, r1, z) == target:
                    return x, op1, y, op2, z, True
                if op2 in "-/" and _positive_int(op2, z, r1) == target:
                    return x, op1, y, op2, z, False
    return None


def _eval_expression(text: str):
    """Safe evaluator: -> (value, numbers used) where value is a Fraction, or None after a division
    by zero; or None if the text is not an expression of + - * / ( ) and integer literals."""
    if not text or not set(text) <= set("0123456789+-*/()"):
        return None  # also keeps out names, hex (0x1e), floats (1e3), spaces
    try:
        tree = ast.parse(text, mode="eval")  # only parses; nothing is executed
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers = []

    def walk(node):  # whitelist; anything else (unary minus, calls, ...) is not well-formed
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return _apply(_AST_OPS[type(node.op)], left, right)
        raise ValueError(f"{type(node).__name__} is not allowed")

    try:
        return walk(tree.body), numbers
    except (ValueError, RecursionError):
        return None


class Countdown(Task):
    """d1's CD3 countdown: reach the target with + - * / using each of three numbers exactly once.

    Problem "30,100,93:23" (numbers in 1..max_number, then a target in 1..max_target); prompt = that
    string, EOS-padded to P=16. The reference answer is the first solution of a fixed search in
    which every intermediate result is a positive integer, written as
        answer_format="expression" (L=16):  "30+93-100", "(100-93)*30" (parentheses where needed)
        answer_format="steps"      (L=32):  "30+93=123,123-100=23"     (two steps "a op b=c")
    block_size 8 for both. The scorer accepts both formats whatever the option (text with "=" is
    steps), but like the tokens it reads at most L characters, so steps rarely fit the expression
    task.
    Reward (d1): 1.0 correct; 0.1 well-formed but wrong (wrong value, numbers other than the given
    ones, a number used twice, division by zero, wrong arithmetic in a step, a step operand not
    available); 0.0 malformed (unparseable, unary minus, a MASK or any character outside the format
    before EOS).
    Steps are correct iff each is exact arithmetic, takes both operands from the pool (the three
    numbers plus earlier results, each consumed once) and after the last step only the target is
    left.
    Curriculum: smaller numbers are just smaller max_number / max_target (e.g. 20 and 20).
    Split: crc32 of the sorted numbers and the target (reordered numbers share a split).
    """

    name, block_size, prompt_len = "countdown", 8, 16
    # SFT's recipe, measured in docs/results.md "Supervised training"
    sft_recipe = {"max_steps": 6500, "eval_every": 500}

    def __init__(self, max_number: int = 100, max_target: int = 100,
                 answer_format: str = "expression"):
        super().__init__(max_number=max_number, max_target=max_target, answer_format=answer_format)
        self.max_number = check_option("max_number", max_number, range(1, 1000))
        self.max_target = check_option("max_target", max_target, range(1, 1000))
        self.answer_format = check_option("answer_format", answer_format,
                                          ("expression", "steps"))
        self.response_len = 16 if answer_format == "expression" else 32

    def _parse(self, problem: str):
        match = _COUNTDOWN.fullmatch(problem)
        if match is None:
            return None
        return [int(g) for g in match.groups()[:3]], int(match.group(4))

    def is_problem(self, problem):  # well-formed is enough: unsolvable problems score too
        return self._parse(problem) is not None

    def split_of(self, problem):
        parsed = self._parse(problem)
        if parsed is None:
            raise ValueError(f"{problem!r} is not a countdown problem like '30,100,93:23'")
        return hash_split(",".join(map(str, sorted(parsed[0]))) + ":" + str(parsed[1]))

    def answer_text(self, problem):
        parsed = self._parse(problem)
        found = _solve_countdown(*parsed) if parsed else None
        if found is None:
            raise ValueError(f"{problem!r} is not a solvable countdown problem like "
                             "'30,100,93:23'")
        x, op1, y, op2, z, pair_left = found
        r1, target = _positive_int(op1, x, y), parsed[1]
        if self.answer_format == "steps":
            second = f"{r1}{op2}{z}" if pair_left else f"{z}{op2}{r1}"
            return f"{x}{op1}{y}={r1},{second}={target}"
        inner = f"{x}{op1}{y}"
        if _PREC[op1] < _PREC[op2] or (not pair_left and op2 in "-/"):  # (a+b)*c, c-(a+b), c/(a*b)
            inner = f"({inner})"
        return f"{inner}{op2}{z}" if pair_left else f"{z}{op2}{inner}"

    def score(self, problem, response_text):
        parsed, text = self._parse(problem), response_text[: self.response_len]
        if parsed is None:
            return 0.0
        numbers, target = parsed
        if "=" not in text:
            result = _eval_expression(text)
            if result is None:
                return 0.0
            return 1.0 if result[0] == target and sorted(result[1]) == sorted(numbers) else 0.1
        steps = [_STEP.fullmatch(s) for s in text.split(",")]
        if not all(steps):
            return 0.0
        pool, correct = list(numbers), True  # pool: values still available, each usable once
        for step in steps:
            a, op, b, c = int(step[1]), step[2], int(step[3]), int(step[4])
            correct &= _apply(op, a, b) == c  # exact; a division by zero gives None != c
            for operand in (a, b):
                if operand in pool:
                    pool.remove(operand)
                else:
                    correct = False  # not given, already used, or not an earlier result
            pool.append(c)
        # Two steps consume the three numbers; what is left must be the target.
        return 1.0 if correct and pool == [target] else 0.1

    def _candidates(self, m, split, generator):
        # Problems from random solutions: three numbers, two operations, and the side of the second
        # operation the first result goes to; kept if all results are positive ints, target <= max.
        tries = 12 * m  # about 9% are kept with the default options
        nums = torch.randint(1, self.max_number + 1, (tries, 3), generator=generator)  # (tries, 3)
        ops = torch.randint(0, 4, (tries, 3), generator=generator)  # (tries, 3): op1, op2, side
        r1, ok1 = _int_op(ops[:, 0], nums[:, 0], nums[:, 1])
        right = ops[:, 2] % 2 == 1  # c op2 r1 instead of r1 op2 c
        a2, b2 = torch.where(right, nums[:, 2], r1), torch.where(right, r1, nums[:, 2])
        target, ok2 = _int_op(ops[:, 1], a2, b2)
        keep = ok1 & ok2 & (target <= self.max_target)  # (tries,)
        # Shuffle the order in which the numbers are shown.
        order = torch.rand(int(keep.sum()), 3, generator=generator).argsort(1)
        shown = nums[keep].gather(1, order)[:m].tolist()
        return [f"{a},{b},{c}:{t}" for (a, b, c), t in zip(shown, target[keep][:m].tolist())]

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

from .base import Task, check_option, hash_split, round_up

_OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_INT = r"(-?(?:0|[1-9]\d*))"  # an integer without leading zeros
_STEP = re.compile(rf"{_INT}([-+*/]){_INT}={_INT}")
_COUNTDOWN = re.compile(r"([1-9]\d*),([1-9]\d*),([1-9]\d*):([1-9]\d*)")
_FIXED_PROMPT = re.compile(r"(\d{3}),(\d{3}),(\d{3}):(\d{3})")


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


def _digits(value: int, width: int) -> str:
    """value zero-padded to `width` digits, least-significant first: _digits(30, 5) == "03000"."""
    return str(value).zfill(width)[::-1]


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
        answer_format="fixed"      (L=32):  "03000+39000=32100,32100-00100"
    answer_format="fixed" is the steps answer with every number zero-padded to one width W and
    written least-significant digit first (as addition does), the final "=target" left out, and the
    prompt written the same way with width 3 ("030,001,390:320"): each number sits at fixed
    positions and each result digit follows the digits it depends on. W fits the largest first
    result a reference answer can have, target * number (W=5 by default, so "03000" is 30).
    block_size 8 for all three. The scorer accepts expressions and steps whatever the option (text
    with "=" is steps), but like the tokens it reads at most L characters, so steps rarely fit the
    expression task; with answer_format="fixed" it reads only that format.
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

    def __init__(self, max_number: int = 100, max_target: int = 100,
                 answer_format: str = "expression"):
        super().__init__(max_number=max_number, max_target=max_target, answer_format=answer_format)
        self.max_number = check_option("max_number", max_number, range(1, 1000))
        self.max_target = check_option("max_target", max_target, range(1, 1000))
        self.answer_format = check_option("answer_format", answer_format,
                                          ("expression", "steps", "fixed"))
        self.response_len = 16 if answer_format == "expression" else 32
        if answer_format == "fixed":
            # r1 op2 z = target with z <= max_number: r1 <= target * z (division) is the largest.
            self.width = len(str(self.max_target * self.max_number))
            self.response_len = round_up(5 * self.width + 4, self.block_size)
            w = self.width
            self._fixed = re.compile(rf"(\d{{{w}}})([-+*/])(\d{{{w}}})=(\d{{{w}}}),"
                                     rf"(\d{{{w}}})([-+*/])(\d{{{w}}})")

    def _parse(self, problem: str):
        match = _COUNTDOWN.fullmatch(problem)
        if match is None:
            return None
        return [int(g) for g in match.groups()[:3]], int(match.group(4))

    def is_problem(self, problem):  # well-formed is enough: unsolvable problems score too
        parsed = self._parse(problem)
        # The fixed format's prompt has room for three digits per number.
        return parsed is not None and (self.answer_format != "fixed"
                                       or max(*parsed[0], parsed[1]) < 1000)

    def prompt_text(self, problem):
        if self.answer_format != "fixed" or not self.is_problem(problem):
            return problem
        numbers, target = self._parse(problem)
        return ",".join(_digits(x, 3) for x in numbers) + ":" + _digits(target, 3)

    def decode_problem(self, prompt_ids):
        text = self.response_text(prompt_ids)
        match = _FIXED_PROMPT.fullmatch(text) if self.answer_format == "fixed" else None
        if match is None:
            return text  # not a fixed-format prompt: scored as it reads
        x, y, z, target = (int(g[::-1]) for g in match.groups())
        return f"{x},{y},{z}:{target}"

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
        if self.answer_format == "fixed":
            x, y, z, r1 = (_digits(v, self.width) for v in (x, y, z, r1))
        if self.answer_format != "expression":
            second = f"{r1}{op2}{z}" if pair_left else f"{z}{op2}{r1}"
            return f"{x}{op1}{y}={r1},{second}" + ("" if self.answer_format == "fixed"
                                                    else f"={target}")
        inner = f"{x}{op1}{y}"
        if _PREC[op1] < _PREC[op2] or (not pair_left and op2 in "-/"):  # (a+b)*c, c-(a+b), c/(a*b)
            inner = f"({inner})"
        return f"{inner}{op2}{z}" if pair_left else f"{z}{op2}{inner}"

    def score(self, problem, response_text):
        parsed, text = self._parse(problem), response_text[: self.response_len]
        if parsed is None:
            return 0.0
        numbers, target = parsed
        if self.answer_format == "fixed":
            match = self._fixed.fullmatch(text)
            if match is None:
                return 0.0
            a, op1, b, c, d, op2, e = (g if g in _OPS else int(g[::-1]) for g in match.groups())
            # The implied last result is the target; arithmetic that misses it is a wrong answer.
            steps = [(a, op1, b, c), (d, op2, e, target if _apply(op2, d, e) == target else None)]
        elif "=" not in text:
            result = _eval_expression(text)
            if result is None:
                return 0.0
            return 1.0 if result[0] == target and sorted(result[1]) == sorted(numbers) else 0.1
        else:
            steps = [_STEP.fullmatch(s) for s in text.split(",")]
            if not all(steps):
                return 0.0
            steps = [(int(s[1]), s[2], int(s[3]), int(s[4])) for s in steps]
        pool, correct = list(numbers), True  # pool: values still available, each usable once
        for a, op, b, c in steps:
            correct &= c is not None and _apply(op, a, b) == c  # exact; x/0 gives None != c
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

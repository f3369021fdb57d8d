"""Synthetic tasks with verifiable rewards for a masked-diffusion LM (docs/math.md §7).

Every task turns a *problem string* into a prompt of P tokens and a reference answer of L tokens,
and scores any response of L tokens with a reward in [0, 1] that never raises: RL feeds it raw
model output (masks, EOS in the middle, anything). No Python `eval` of model output anywhere.

Vocabulary (one, shared by all tasks; `Vocab`):
    CHARS = "0123456789+-*/=,:|()abcdefghijklmnopqrstuvwxyz"  -> ids 0..45 in that order
            (digit d = id d)
    EOS  = 46  end of text and padding (prompts and answers are right-padded with it), decoded as ""
    MASK = 47  the diffusion mask token, decoded as "_"; never part of a prompt or an answer

Tasks (one module each; details and P / L / block_size in each class docstring):
    addition   problem "1234+5678"      prompt "4321+8765="  answer "21960"
               (least-significant digit first)
    countdown  problem "30,100,93:23"   prompt the same
               answer "30+93-100" or "30+93=123,123-100=23"
    sudoku     problem "0430001040202001" (4x4, 0 = blank)
               answer "1432321441232341" (the solved grid)
    star       problem "cd,ab,bc,ae,ef,fg:ad" (edges:source goal)   answer "abcd" (the path)

Scorers read the response up to its first EOS (`Task.response_text`) and at most L characters.
Train and test never overlap: a problem's split is a deterministic function of the problem itself
(crc32 of a canonical string, or the solution grid for sudoku); `sample` keeps only the requested
split. Shapes: n examples, P prompt length, L response length.

Layout: `base` (vocabulary, splits, `Task` and the helpers `hash_split`, `check_option`,
`round_up`), one module per task, and here the registry and `get_task`.
"""
import inspect

from .addition import Addition
from .base import (CHARS, EOS_ID, MASK_ID, SPLITS, TEST_PERCENT, Task, Vocab, check_option,
                   hash_split, round_up)
from .countdown import Countdown
from .star import Star
from .sudoku import Sudoku

REGISTRY = {cls.name: cls for cls in (Addition, Countdown, Sudoku, Star)}
TASKS = tuple(REGISTRY)  # ("addition", "countdown", "sudoku", "star")

__all__ = ["CHARS", "EOS_ID", "MASK_ID", "REGISTRY", "SPLITS", "TASKS", "TEST_PERCENT", "Addition",
           "Countdown", "Star", "Sudoku", "Task", "Vocab", "check_option", "get_task",
           "hash_split", "round_up"]


def get_task(name: str, **options) -> Task:
    """get_task("addition", digits=6) -> Task. Unknown names and options raise ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    valid = [p for p in inspect.signature(REGISTRY[name].__init__).parameters if p != "self"]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"unknown option(s) {', '.join(bad)} for task {name!r}; "
                         f"valid options: {', '.join(valid)}")
    return REGISTRY[name](**options)

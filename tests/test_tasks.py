"""Tests for the minidtrpo/tasks/ package: formats, reference answers, rewards that never raise,
disjoint splits, the registry and the module layout.

Where possible a property is checked against an independent reference: sudoku grids against a
brute-force enumeration, countdown steps with plain integer arithmetic, star answers against the
edge list, the token-level reward against the string scorer on the decoded texts.
"""
import ast
import importlib
import inspect
import itertools
import pkgutil
import re

import pytest
import torch

import minidtrpo.tasks as tasks_module
from minidtrpo.tasks import CHARS, EOS_ID, MASK_ID, REGISTRY, TASKS, Vocab, get_task
from minidtrpo.tasks.sudoku import sudoku_grids

CONFIGS = [
    ("addition", {}),
    ("addition", {"digits": 6, "lsb_first": False}),
    ("addition", {"digits": 2, "partial": True}),
    ("countdown", {}),
    ("countdown", {"max_number": 20, "max_target": 20, "answer_format": "steps"}),
    ("sudoku", {}),
    ("sudoku", {"min_blanks": 8, "max_blanks": 12}),
    ("star", {}),
    ("star", {"degree": 3, "path_len": 5, "reverse": True}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CONFIGS]

# Near-valid garbage: parser edge cases (division by zero, nesting, huge numbers, wrong operators).
GARBAGE = ["1/0", "((", "))", "()", "99999*99999", "9" * 40, "1+", "+1", "-1", "1--1", "1**2",
           "1//2", "(1)(2)", "1=1", "=", ",", ",,", "1+1=2,", "1+1=2,2+2=4,4+4=8", "0x10", "1e3",
           "007+1", "1/(2-2)", "((((((((((1))))))))))", "1+1=2=2", "a+b", "30,100,93:23", "|", ":",
           "0/0=0", "abcd", "aaaa", "1234567890123456", "0000000000000000"]


def pad(ids, length):
    return (ids + [EOS_ID] * length)[:length]


def test_vocabulary():
    vocab = Vocab()
    assert (vocab.size, vocab.eos_id, vocab.mask_id, vocab.chars) == (48, 46, 47, CHARS)
    assert vocab.encode("09+a") == [0, 9, 10, 20]
    assert vocab.decode([0, 9, 10, 20, EOS_ID, MASK_ID, 48, -1, 10**9]) == "09+a_???"
    assert vocab.decode(torch.tensor([1, 2, EOS_ID])) == "12"
    with pytest.raises(ValueError, match="'A'.*valid characters"):
        vocab.encode("1A")


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_sample_format_and_reference_answers(name, opts):
    task = get_task(name, **opts)
    assert task.response_len % task.block_size == 0 and task.prompt_len % 4 == 0
    prompts, answers = task.sample(64, generator=torch.Generator().manual_seed(0))
    assert prompts.shape == (64, task.prompt_len) and answers.shape == (64, task.response_len)
    assert prompts.dtype == answers.dtype == torch.long
    for t in (prompts, answers):
        assert t.min() >= 0 and t.max() <= EOS_ID  # inside the vocabulary, never MASK
        after_eos = (t == EOS_ID).long().cummax(1).values.bool()
        assert (t[after_eos] == EOS_ID).all()  # right-padded: nothing but EOS after the first EOS
    assert (task.reward(prompts, answers) == 1.0).all() and task.exact(prompts, answers).all()
    for prompt, answer in zip(prompts, answers):
        problem = task.decode_problem(prompt)
        assert torch.equal(task.encode_problem(problem), prompt)  # encode/decode round trip
        assert task.response_text(answer) == task.answer_text(problem)  # sample == answer_text
        assert task.score(problem, task.answer_text(problem)) == 1.0
        assert task.split_of(problem) == "train"


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_reward_never_raises_and_matches_the_string_scorer(name, opts):
    task = get_task(name, **opts)
    g = torch.Generator().manual_seed(1)
    n, L = 10_000, task.response_len
    prompts, answers = task.sample(200, generator=g)
    prompts = prompts[torch.randint(0, 200, (n,), generator=g)]  # (n, P)
    responses = torch.randint(0, task.vocab.size, (n, L), generator=g)  # uniform over all 48 ids
    garbage = torch.tensor([pad(task.vocab.encode(s), L) for s in GARBAGE])
    responses[: len(garbage)] = garbage
    # references with one token changed
    near = answers[torch.randint(0, 200, (2000,), generator=g)].clone()
    where = torch.randint(0, L, (2000,), generator=g)
    near[torch.arange(2000), where] = torch.randint(0, 48, (2000,), generator=g)
    responses[len(garbage): len(garbage) + 2000] = near
    # out of range
    responses[-3:] = torch.tensor([-7, 10**6, MASK_ID]).repeat_interleave(L).reshape(3, L)
    rewards = task.reward(prompts, responses.int())  # any integer dtype
    assert rewards.shape == (n,) and rewards.dtype == torch.float32
    assert ((rewards >= 0) & (rewards <= 1)).all()
    assert not (rewards[-3:] > 0).any()
    # The tensor reward equals the string scorer on the decoded texts (checked on a subset for
    # speed).
    idx = torch.cat([torch.arange(len(garbage) + 2000), torch.randint(0, n, (500,), generator=g)])
    strings = [task.score(task.decode_problem(prompts[i]), task.response_text(responses[i]))
               for i in idx]
    assert rewards[idx].tolist() == pytest.approx(strings)
    exact = task.exact(prompts, responses)
    assert exact.dtype == torch.bool and (rewards[exact] == 1.0).all()
    # Garbage prompts must not raise either.
    random_prompts = torch.randint(-2, 60, (500, task.prompt_len), generator=g)
    assert (task.reward(random_prompts, responses[:500]) >= 0).all()


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_splits_are_disjoint(name, opts):
    task = get_task(name, **opts)
    g = torch.Generator().manual_seed(2)
    problems = {}
    for split in ("train", "test"):
        prompts, _ = task.sample(2000, split, generator=g)
        problems[split] = {task.decode_problem(p) for p in prompts}
        assert all(task.split_of(p) == split for p in problems[split])
    assert not problems["train"] & problems["test"]
    if name == "sudoku":  # split by solution grid: no solved grid appears in both
        solutions = {s: {task.answer_text(p) for p in problems[s]} for s in problems}
        assert not solutions["train"] & solutions["test"]
    with pytest.raises(ValueError, match="train, test"):
        task.sample(4, "valid")


def test_split_is_a_function_of_the_problem_not_of_its_writing():
    g = torch.Generator().manual_seed(3)
    addition = get_task("addition")
    pairs = [f"{a:04d}+{b:04d}" for a, b in torch.randint(0, 10**4, (300, 2), generator=g).tolist()]
    assert all(addition.split_of(p) == addition.split_of(p[5:] + "+" + p[:4]) for p in pairs)
    countdown = get_task("countdown")
    problems = [f"{a},{b},{c}:{t}"
                for a, b, c, t in torch.randint(1, 100, (300, 4), generator=g).tolist()]
    for p in problems:
        nums, target = p.split(":")
        for perm in itertools.permutations(nums.split(",")):
            assert countdown.split_of(",".join(perm) + ":" + target) == countdown.split_of(p)
    assert (get_task("star").split_of("ab,bc,ad,de:ac")
            == get_task("star").split_of("de,ad,bc,ab:ac"))
    assert {countdown.split_of(p) for p in problems} == {"train", "test"}


@pytest.mark.parametrize("name", TASKS)
def test_seeds(name):
    task = get_task(name)
    first = task.sample(32, generator=torch.Generator().manual_seed(5))
    again = task.sample(32, generator=torch.Generator().manual_seed(5))
    other = task.sample(32, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert all(torch.equal(a, b) for a, b in zip(task.test_set(16), task.test_set(16)))
    state = torch.get_rng_state()  # an explicit generator leaves the global RNG alone
    task.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_countdown_scoring_by_hand():
    task = get_task("countdown")
    p = "30,100,93:23"
    cases = {
        "30+93-100": 1.0, "93-100+30": 1.0, "(30+93)-100": 1.0, "93+30-100": 1.0,
        "30+93+100": 0.1, "100-77": 0.1, "30+30-37": 0.1,  # wrong value / numbers / a number twice
        "30+93-100+0": 0.1, "1/0": 0.1, "30/(93-93)+100": 0.1,  # extra number / division by zero
        "30+93=124,124-100=24": 0.1,  # wrong arithmetic in a step: well-formed, so 0.1 (not 0)
        "30+93=123,123-100=22": 0.1, "30+30=60,60-37=23": 0.1, "30+93=123": 0.1, "7/2=3": 0.1,
        "": 0.0, "abc": 0.0, "30+": 0.0, "((": 0.0, "-30+93": 0.0, "30+93-100_": 0.0, "30*+93": 0.0,
        "30+93=123,123-100": 0.0, "30+93=123,": 0.0, "030+93-100": 0.0, "0x1e+93-100": 0.0,
        "3e1": 0.0,
    }
    steps = get_task("countdown", answer_format="steps")  # L=32; both tasks accept both formats
    for text, expected in cases.items():
        assert steps.score(p, text) == expected, text
        assert len(text) > 16 or task.score(p, text) == expected, text
    assert task.answer_text(p) == "30+93-100" and steps.answer_text(p) == "30+93=123,123-100=23"
    assert steps.score(p, "30+93=123,123-100=23") == 1.0 and steps.score(p, "30+93-100") == 1.0
    assert steps.score(p, "93-100=-7,30+-7=23") == 1.0  # negative intermediates are fine in answers
    # score reads at most L characters, like the tokens would: this 20-character answer is cut at
    # 16.
    assert task.score(p, "30+93=123,123-100=23") == 0.0
    assert (task.answer_text("100,93,30:210") == "(100-93)*30"
            and task.answer_text("2,3,9:3") == "9-(2*3)")
    assert task.score("7,3,8:5", "7+8=15,15/3=5") == 1.0 and task.score("7,3,8:5", "(7+8)/3") == 1.0
    assert task.score("not a problem", "30+93-100") == 0.0
    # Token level: the text ends at the first EOS; a MASK before it makes the answer malformed.
    prompt = task.encode_problem(p)[None]
    ids = task.vocab.encode("30+93-100")
    garbage_after_eos = torch.tensor([pad(ids + [EOS_ID] + task.vocab.encode("+1"), 16)])
    masked = torch.tensor([pad(ids[:3] + [MASK_ID] + ids[3:], 16)])
    assert (task.reward(prompt, garbage_after_eos).item() == 1.0
            and task.reward(prompt, masked).item() == 0.0)
    # Reference solutions, re-checked with plain integer arithmetic: each step exact, every
    # intermediate result a positive integer, the three numbers used once, the last result the
    # target.
    prompts, answers = steps.sample(300, generator=torch.Generator().manual_seed(4))
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for prompt, answer in zip(prompts, answers):
        numbers, target = steps.decode_problem(prompt).split(":")
        (a, op1, b, r1), (c, op2, d, r2) = [re.fullmatch(r"(\d+)(\D)(\d+)=(\d+)", s).groups()
                                            for s in steps.response_text(answer).split(",")]
        a, b, r1, c, d, r2 = map(int, (a, b, r1, c, d, r2))
        assert ops[op1](a, b) == r1 > 0 and (op1 != "/" or a % b == 0)
        assert ops[op2](c, d) == r2 == int(target) and (op2 != "/" or c % d == 0)
        assert r1 in (c, d) and sorted([a, b, c + d - r1]) == sorted(map(int, numbers.split(",")))


def task_modules():
    """The package and every module in it (base, one per task)."""
    names = [m.name for m in pkgutil.iter_modules(tasks_module.__path__, "minidtrpo.tasks.")]
    return [tasks_module] + [importlib.import_module(name) for name in names]


def test_no_python_eval_or_exec_in_the_package():
    assert len(task_modules()) == 6  # __init__, base, addition, countdown, star, sudoku
    for module in task_modules():
        tree = ast.parse(inspect.getsource(module))
        called = {n.func.id for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not called & {"eval", "exec", "compile", "__import__"}, module.__name__


def test_registry_and_module_layout():
    assert TASKS == tuple(REGISTRY) == ("addition", "countdown", "sudoku", "star")
    assert all(REGISTRY[name].name == name for name in TASKS)
    for module in task_modules()[1:]:  # no import cycle: only public names, only from .base
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "base", module.__name__
                assert not [a.name for a in node.names if a.name.startswith("_")], module.__name__


def test_addition_formats():
    task = get_task("addition")
    assert task.vocab.decode(task.encode_problem("1234+5678")) == "4321+8765="
    assert task.decode_problem(task.encode_problem("1234+5678")) == "1234+5678"
    assert (task.answer_text("1234+5678") == "21960"
            and (task.prompt_len, task.response_len) == (12, 8))
    msb = get_task("addition", lsb_first=False)
    assert msb.vocab.decode(msb.encode_problem("1234+5678")) == "1234+5678="
    assert msb.answer_text("1234+5678") == "06912"
    partial = get_task("addition", partial=True)
    assert partial.score("1234+5678", "21000") == pytest.approx(0.6)
    assert task.score("1234+5678", "21000") == 0.0
    assert task.score("1234+5678", "21960xyz") == 1.0  # what follows the n+1 digits is ignored
    prompts, answers = task.sample(500, generator=torch.Generator().manual_seed(5))
    for p, a in zip(prompts, answers):
        x, y = task.decode_problem(p).split("+")
        assert int(task.response_text(a)[::-1]) == int(x) + int(y)


def brute_force_grids():
    """Independent reference: filter all 24^4 stacks of permuted rows by column and box
    constraints."""
    rows = torch.tensor(list(itertools.permutations(range(1, 5))))  # (24, 4)
    idx = torch.cartesian_prod(*[torch.arange(24)] * 4)  # (331776, 4)
    grids = rows[idx]  # (331776, 4 rows, 4 cols)
    boxes = grids.reshape(-1, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4, 4)  # (., box, cell)
    ok = lambda units: (units.sort(-1).values == torch.arange(1, 5)).all(-1).all(-1)
    return grids[ok(grids.transpose(1, 2)) & ok(boxes)].reshape(-1, 16)


def test_addition_trains_on_short_problems_and_tests_on_full_ones():
    task = get_task("addition")  # digits=4, short_share=0.5
    gen = torch.Generator().manual_seed(0)
    train = [task.decode_problem(p) for p in task.sample(2000, "train", gen)[0]]
    test = [task.decode_problem(p) for p in task.sample(2000, "test", gen)[0]]

    def digits(problem):  # the longer operand's digit count, zero padding aside
        return max(len(x.lstrip("0")) for x in problem.split("+"))

    short = sum(digits(p) <= 2 for p in train) / len(train)  # 1 or 2 digits: 0.5 · 2/4 = 0.25
    assert 0.2 < short < 0.3, short
    assert sum(digits(p) <= 2 for p in test) / len(test) < 0.02  # (1 in 100 has both < 100)
    full = get_task("addition", short_share=0)
    assert sum(digits(full.decode_problem(p)) <= 2
               for p in full.sample(2000, "train", gen)[0]) / 2000 < 0.02


def test_sudoku_grids_and_unique_puzzles():
    reference = brute_force_grids()
    assert len(reference) == 288
    assert {tuple(g) for g in reference.tolist()} == {tuple(g) for g in sudoku_grids().tolist()}
    for opts in ({}, {"min_blanks": 8, "max_blanks": 12}):
        task = get_task("sudoku", **opts)
        prompts, answers = task.sample(500, generator=torch.Generator().manual_seed(6))
        # (500, 288)
        compatible = ((prompts[:, None] == 0) | (prompts[:, None] == reference[None])).all(-1)
        assert (compatible.sum(1) == 1).all()  # every puzzle has exactly one solution
        assert torch.equal(reference[compatible.int().argmax(1)], answers)
        blanks = (prompts == 0).sum(1)
        assert blanks.min() >= task.min_blanks and blanks.max() <= task.max_blanks
    task, p = get_task("sudoku"), "0430001040202001"
    assert task.answer_text(p) == "1432321441232341"
    assert task.score(p, "1432321441232341") == 1.0 and task.score(p, "0000000000000000") == 0.0
    assert task.score(p, "2432321441232341") == pytest.approx(8 / 9)  # 9 blanks, one wrong
    assert task.score(p, "1432321441232341"[:8]) == pytest.approx(5 / 9)  # cut short by EOS
    wrong_given = torch.tensor([task.vocab.encode("1432321441232344")])
    assert task.reward(task.encode_problem(p)[None],
                       wrong_given).item() == 1.0  # givens are ignored...
    assert not task.exact(task.encode_problem(p)[None], wrong_given).item()  # ...but not by exact
    assert task.score("1100000000000000", "1234341221434321") == 0.0  # no completion


def test_sudoku_with_several_solutions_scores_the_best_completion():
    """A puzzle read from a file may have several solutions: exact = a valid grid keeping every
    given; reward = the best fraction of blanks right over the valid completions (brute force)."""
    reference, task = brute_force_grids(), get_task("sudoku")
    gen = torch.Generator().manual_seed(8)
    grids = reference[torch.randint(0, 288, (300,), generator=gen)]
    puzzles = grids.masked_fill(torch.rand(300, 16, generator=gen) < 0.75, 0)  # ~12 blanks
    noise = torch.rand(300, 16, generator=gen) < torch.rand(300, 1, generator=gen) * 0.4
    responses = torch.where(noise, torch.randint(1, 5, (300, 16), generator=gen), grids)
    several = exact = 0
    for puzzle, response in zip(puzzles, responses):
        blanks = puzzle == 0
        completions = reference[((puzzle == 0) | (puzzle == reference)).all(1)]  # (k, 16)
        several += len(completions) > 1
        best = ((response == completions) & blanks).sum(1).max().item() / blanks.sum().item()
        text, r = "".join(map(str, puzzle.tolist())), "".join(map(str, response.tolist()))
        assert task.score(text, r) == pytest.approx(best)
        assert task.is_exact(text, r) == (response == completions).all(1).any().item()
        exact += task.is_exact(text, r)
    assert several > 200 and 30 < exact < 270  # most of these puzzles have several solutions
    assert task.is_exact("0000000000000000", "1234341221434321")  # any valid grid
    assert not task.is_exact("0000000000000000", "1234341221434312")  # not a valid grid


@pytest.mark.parametrize("opts", [{}, {"degree": 3, "path_len": 5},
                                  {"path_len": 3, "reverse": True}])
def test_star_answer_follows_the_edges(opts):
    task = get_task("star", **opts)
    prompts, answers = task.sample(300, generator=torch.Generator().manual_seed(7))
    for p, a in zip(prompts, answers):
        edges_text, ends = task.decode_problem(p).split(":")
        edges = set(edges_text.split(","))
        path = task.response_text(a)[:: -1 if task.reverse else 1]
        assert len(edges) == task.degree * (task.path_len - 1) and len(path) == task.path_len
        assert len(set(edges_text.replace(",", ""))) == len(edges) + 1  # distinct labels, a tree
        assert (path[0], path[-1]) == (ends[0], ends[1])
        assert all(path[i: i + 2] in edges for i in range(len(path) - 1))
        assert max(edges_text.replace(",", "")) < chr(ord("a") + task.num_nodes)
    assert (get_task("star").prompt_len, get_task("star").response_len) == (16, 4)
    assert get_task("star").answer_text("de,ab,bc,ad:ae") == "ade"
    assert get_task("star", reverse=True).answer_text("de,ab,bc,ad:ae") == "eda"
    long = get_task("star", path_len=4)  # the longer arms kept as an option
    assert (long.prompt_len, long.response_len) == (20, 4)
    assert long.answer_text("cd,ab,bc,ae,ef,fg:ad") == "abcd"


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="valid tasks: addition, countdown, sudoku, star"):
        get_task("multiplication")
    with pytest.raises(ValueError, match="valid options: digits, lsb_first, partial"):
        get_task("addition", digit=4)
    with pytest.raises(ValueError,
                       match="valid: 'expression', 'steps'|valid: \\('expression', 'steps'\\)"):
        get_task("countdown", answer_format="latex")
    with pytest.raises(ValueError, match=r"valid: an int in \[5, 26\]"):
        get_task("star", num_nodes=4)  # 2 arms of 2 nodes and the source
    with pytest.raises(ValueError, match="nodes"):
        get_task("star", degree=5, path_len=7)
    with pytest.raises(ValueError, match="valid"):
        get_task("sudoku", min_blanks=6, max_blanks=5)
    with pytest.raises(ValueError, match="True or False|\\(True, False\\)"):
        get_task("addition", lsb_first=1)
    with pytest.raises(ValueError, match="expected prompts"):
        get_task("sudoku").reward(torch.zeros(2, 16, dtype=torch.long),
                                  torch.zeros(2, 15, dtype=torch.long))

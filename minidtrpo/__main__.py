"""Command line: `python -m minidtrpo <command> [--option=value ...]`; `--help` lists options."""

import csv
import json
import sys
from dataclasses import dataclass

import torch

from .compare import CompareConfig, compare
from .config import BadInput, RunStopped, arg, device_problem, fail, parse, pick_device
from .preference import DPOConfig, PairsConfig, make_pairs, train_dpo
from .report import ReportConfig, run_report
from .rl import RLConfig, train_rl
from .sft import SFTConfig, train_sft
from .train import DecodingConfig, check_steps, evaluate, load


@dataclass
class EvalConfig(DecodingConfig):
    """Evaluate a checkpoint on a task split with the sampler (any decoding rule); ends with one
    JSON line."""
    ckpt: str = arg("runs/sft/checkpoint.pt", "checkpoint to evaluate")
    split: str = arg("test", "which problems", ("train", "test"))
    n: int = arg(500, "number of problems", ge=1)
    problems: str = arg("", "score every problem of this file instead (split and n unused): one "
                        "problem per line, d1's sudoku CSV (Puzzle,Solution) or d1's countdown "
                        "JSONL (input, output)")
    seed: int = arg(0, "seed of the problem set (and of sampling when temperature > 0)", ge=0,
                    lt=2**31)
    temperature: float = arg(0.0, "sampling temperature (0 = greedy)", ge=0)
    device: str = arg("auto", "auto | cpu | cuda | cuda:N | mps", valid=device_problem)


def read_problems(path: str, task) -> torch.Tensor:
    """The prompts (n, P) of the problems in a file, in the task's problem format: a line per
    problem; d1's sudoku CSV, whose Puzzle column is our puzzle string; d1's countdown JSONL,
    {"input": "30,100,93", "output": "23"}, which is our "30,100,93:23"."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--problems={path}: cannot read it ({e})") from None
    numbered = [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    if numbered and numbered[0][1].startswith("Puzzle,"):  # d1's sudoku CSV
        rows = csv.DictReader(lines)
        numbered = [(i, row["Puzzle"]) for i, row in enumerate(rows, 2)]
    elif numbered and numbered[0][1].startswith("{"):  # d1's countdown JSONL
        try:
            records = [(i, json.loads(line)) for i, line in numbered]
            numbered = [(i, f"{r['input']}:{r['output']}") for i, r in records]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"--problems={path}: not JSONL with 'input' and 'output' ({e})") \
                from None
    if not numbered:
        raise BadInput(f"--problems={path}: no problems in the file")
    prompts = []
    for i, problem in numbered:
        try:
            if not task.is_problem(problem):
                raise ValueError(f"not of the form of {task.name} problems")
            prompts.append(task.encode_problem(problem))
        except ValueError as e:
            raise BadInput(f"--problems={path}, line {i}: {problem!r} is not a problem of this "
                           f"checkpoint's task, {task!r} ({e})") from None
    return torch.stack(prompts)


def run_eval(cfg: EvalConfig) -> dict:
    device = pick_device(cfg.device)
    model, task = load(cfg.ckpt, device)
    check_steps(cfg.steps_per_block, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.problems:
        prompts = read_problems(cfg.problems, task)
    elif cfg.split == "test":
        prompts = task.test_set(cfg.n, seed=cfg.seed)[0]
    else:
        prompts = task.sample(cfg.n, "train", generator=gen)[0]
    m = evaluate(model, task, prompts.to(device), steps_per_block=cfg.steps_per_block,
                 temperature=cfg.temperature,
                 generator=torch.Generator(device).manual_seed(cfg.seed), **cfg.decoding(task))
    print(json.dumps(m))
    return m


COMMANDS = {  # name: (options, what runs them, one line of help)
    "sft": (SFTConfig, train_sft, "supervised masked-diffusion training (minidtrpo/sft.py)"),
    "eval": (EvalConfig, run_eval, "evaluate a checkpoint (prints one JSON line)"),
    "rl": (RLConfig, train_rl, "online RL: full_trajectory | bgpo | diffu_grpo | vrpo_ol (rl.py)"),
    "pairs": (PairsConfig, make_pairs, "sample (best, worst) pairs with trajectories"),
    "dpo": (DPOConfig, train_dpo, "offline DPO: dtrpo | full_trajectory | vrpo (preference.py)"),
    "compare": (CompareConfig, compare, "every objective, same start and budget: table, figure"),
    "estimators": (ReportConfig, run_report, "bias, noise, gradient and cost of each estimator"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m minidtrpo <command> [--option=value ...]\n\ncommands:")
        for name, (_, _, help) in COMMANDS.items():
            print(f"  {name:<12} {help}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        fail(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    config, run, _ = COMMANDS[argv[0]]
    try:
        run(parse(config, argv[1:], f"python -m minidtrpo {argv[0]}"))
    except BadInput as e:  # a file or folder found bad once the command started, before any work
        fail(str(e))
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

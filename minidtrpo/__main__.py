"""Command line: `python -m minidtrpo <command> [--option=value ...]`; `--help` lists options.
sft, rl and dpo also run data-parallel: `torchrun --nproc_per_node=N -m minidtrpo <command> ...`."""

import csv
import json
import sys
from dataclasses import dataclass

import torch

from .compare import CompareConfig, compare
from .config import BadInput, RunStopped, arg, device_arg, fail, parse, pick_device
from .demo import DemoConfig
from .parallel import end_parallel
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
    device: str = device_arg()


def read_problems(path: str, task) -> torch.Tensor:
    """The prompts (n, P) of the problems in a file, in the task's problem format: a line per
    problem; d1's sudoku CSV, whose Puzzle column is our puzzle string; d1's countdown JSONL,
    {"input": "30,100,93", "output": "23"}, which is our "30,100,93:23". Blank lines are skipped;
    a bad line is refused with its number."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: drops a leading BOM
            lines = [(i, line.strip()) for i, line in enumerate(f.read().splitlines(), 1)]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--problems={path}: cannot read it ({e})") from None
    lines = [(i, line) for i, line in lines if line]

    def bad(i, line, why):
        shown = line if len(line) <= 60 else line[:57] + "..."
        return BadInput(f"--problems={path}, line {i}: {shown!r} {why}")

    def fields(i, line):  # one CSV line (d1's file has no quoted line breaks)
        try:
            return [field.strip() for field in next(csv.reader([line]))]
        except csv.Error as e:
            raise bad(i, line, f"is not a CSV line ({e})") from None

    problems = lines
    if lines and fields(*lines[0])[0] == "Puzzle":  # d1's sudoku CSV: a header, then rows
        header = fields(*lines[0])
        problems = []
        for i, line in lines[1:]:
            row = fields(i, line)
            if len(row) != len(header):
                raise bad(i, line, f"has {len(row)} fields, the header {len(header)}")
            problems.append((i, row[0]))
    elif lines and lines[0][1].startswith("{"):  # d1's countdown JSONL: one object per line
        problems = []
        for i, line in lines:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if not (isinstance(record, dict) and {"input", "output"} <= set(record)):
                raise bad(i, line, "is not a JSON object with 'input' and 'output'")
            problems.append((i, f"{record['input']}:{record['output']}"))
    if not problems:
        raise BadInput(f"--problems={path}: no problems in the file")
    prompts = []
    for i, problem in problems:
        try:
            if not task.is_problem(problem):
                raise ValueError(f"not of the form of {task.name} problems")
            prompts.append(task.encode_problem(problem))
        except ValueError as e:
            raise bad(i, problem, f"is not a problem of this checkpoint's task, {task!r} "
                                  f"({e})") from None
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
    "demo": (DemoConfig, compare, "the main job: SFT, then three objectives head to head"),
    "sft": (SFTConfig, train_sft, "supervised masked-diffusion training (minidtrpo/sft.py)"),
    "eval": (EvalConfig, run_eval, "evaluate a checkpoint (prints one JSON line)"),
    "rl": (RLConfig, train_rl, "online RL: full_trajectory | bgpo | diffu_grpo | vrpo_ol | dtrpo (rl.py)"),
    "pairs": (PairsConfig, make_pairs, "sample (best, worst) pairs with trajectories"),
    "dpo": (DPOConfig, train_dpo, "offline DPO: dtrpo | full_trajectory | vrpo (preference.py)"),
    "compare": (CompareConfig, compare, "every objective, same start and counts: table, figure"),
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
    finished = False
    try:
        run(parse(config, argv[1:], f"python -m minidtrpo {argv[0]}"))
        finished = True
    except BadInput as e:  # a file or folder found bad once the command started, before any work
        fail(str(e))
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        end_parallel(finished)


if __name__ == "__main__":
    main()

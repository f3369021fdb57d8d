"""Command line: python -m minidtrpo <command> [--option=value ...]; `python -m minidtrpo <command> --help`."""

import json
import sys
from dataclasses import dataclass

import torch

from .compare import CompareConfig, compare
from .config import arg, fail, parse, pick_device
from .preference import DPOConfig, PairsConfig, make_pairs, train_dpo
from .rl import RLConfig, train_rl
from .report import cmd_estimators
from .training import TrainConfig, evaluate, load, train_sft


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on a task split with the sampler; ends with one JSON line."""
    ckpt: str = arg("runs/sft/checkpoint.pt", "checkpoint to evaluate")
    split: str = arg("test", "which problems", ("train", "test"))
    n: int = arg(500, "number of problems")
    seed: int = arg(0, "seed of the problem set (and of sampling when temperature > 0)")
    temperature: float = arg(0.0, "sampling temperature (0 = greedy)")
    steps_per_block: int = arg(0, "sampler steps per block (0: one token per step)")
    device: str = arg("auto", "auto | cpu | cuda | mps")


def cmd_eval(argv):
    cfg = parse(EvalConfig, argv, "eval")
    device = pick_device(cfg.device)
    model, task = load(cfg.ckpt, device)
    if cfg.split == "test":
        prompts, answers = task.test_set(cfg.n, seed=cfg.seed)
    else:
        prompts, answers = task.sample(cfg.n, "train", generator=torch.Generator().manual_seed(cfg.seed))
    gen = torch.Generator(device).manual_seed(cfg.seed)
    m = evaluate(model, task, prompts.to(device), answers.to(device), steps_per_block=cfg.steps_per_block,
                 temperature=cfg.temperature, generator=gen)
    print(json.dumps(m))


COMMANDS = {
    "sft": (lambda argv: train_sft(parse(TrainConfig, argv, "sft")), "supervised masked-diffusion training"),
    "eval": (cmd_eval, "evaluate a checkpoint (prints one JSON line)"),
    "rl": (lambda argv: train_rl(parse(RLConfig, argv, "rl")),
           "online RL: full_trajectory | bgpo | diffu_grpo | vrpo_ol (minidtrpo/rl.py)"),
    "pairs": (lambda argv: make_pairs(parse(PairsConfig, argv, "pairs")),
              "sample (best, worst) pairs with trajectories from a frozen reference"),
    "dpo": (lambda argv: train_dpo(parse(DPOConfig, argv, "dpo")),
            "offline DPO on pairs: dtrpo | full_trajectory | vrpo (minidtrpo/preference.py)"),
    "compare": (lambda argv: compare(parse(CompareConfig, argv, "compare")),
                "every objective, same start, budget and seeds: table + figure (minidtrpo/compare.py)"),
    "estimators": (lambda argv: cmd_estimators(argv),
                   "bias, noise, gradient cosine and cost of every likelihood estimator (minidtrpo/report.py)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m minidtrpo <command> [--option=value ...]\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:<12} {help}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        fail(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    try:
        COMMANDS[argv[0]][0](argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

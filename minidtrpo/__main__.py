"""Command line: python -m minidtrpo <command> [--option=value ...]; `python -m minidtrpo <command> --help`."""

import json
import sys
from dataclasses import dataclass

import torch

from .config import arg, fail, parse, pick_device
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

"""Where GRPO's signal is on countdown: by the operations of the reference answer.

GRPO learns only from groups whose G rewards differ: a group all right or all wrong has zero
advantage everywhere (docs/math.md §5.1). For a checkpoint, this draws `n` training prompts (what
`rl` samples), decodes G rollouts of each at the rollout temperature (as `rl` does) and one greedy
answer, and reports, for each class of problem by the operations of its reference answer (+-, -*,
...): its share of the prompts, greedy exact, the rollouts' own exact rate, the share of groups
with signal, the share with no right rollout at all (where only hints, IGPO, could help), and the
room: prompts whose greedy answer is wrong while a rollout is right, the most that sharpening the
policy toward its own right rollouts could add to greedy accuracy on these prompts.

    python bench/countdown_signal.py --ckpt=runs/countdown/sft_s0/checkpoint.pt   # ~1 minute

Ends with one JSON line: {"classes": [{"ops", "share", "greedy", "own", "signal", "none", "room"},
...]}.
"""

import collections
import json
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minidtrpo.config import BadInput, Config, arg, device_arg, exit_on_bad_input, parse, pick_device
from minidtrpo.train import load, rollout


@dataclass
class SignalConfig(Config):
    """Greedy and sampled exact rates and GRPO's groups with signal, by countdown operation."""
    ckpt: str = arg("runs/countdown/sft_s0/checkpoint.pt", "a countdown checkpoint")
    n: int = arg(512, "training prompts drawn", ge=1)
    num_generations: int = arg(8, "rollouts per prompt G (rl's default)", ge=2)
    temperature: float = arg(1.0, "rollout temperature (rl's default)", gt=0)
    seed: int = arg(0, "seed of the prompts and the rollouts", ge=0)
    device: str = device_arg()


def operations(task, answer_ids) -> str:
    """The operations of a reference answer, in order: '+-', '-*', ..."""
    return "".join(c for c in task.response_text(answer_ids) if c in "+-*/")


def by_class(classes: list[str], greedy: torch.Tensor, exact: torch.Tensor) -> list[dict]:
    """One row per class (most prompts first), then "all": its share of the prompts, greedy exact
    (greedy (n,)), the rollouts' own exact rate, the shares of groups with signal (some right,
    some wrong) and with no right rollout (exact (n, G), 1 = right), and the room: the share whose
    greedy answer is wrong while some rollout is right."""
    G, right = exact.shape[1], exact.sum(1)  # right rollouts per group
    members = collections.defaultdict(list)
    for j, c in enumerate(classes):
        members[c].append(j)
    rows = []
    for name, idx in sorted(members.items(), key=lambda kv: -len(kv[1])) + \
            [("all", range(len(classes)))]:
        idx = torch.tensor(list(idx))
        rows.append({"ops": name, "share": len(idx) / len(classes),
                     "greedy": greedy[idx].mean().item(), "own": exact[idx].mean().item(),
                     "signal": ((right[idx] > 0) & (right[idx] < G)).float().mean().item(),
                     "none": (right[idx] == 0).float().mean().item(),
                     "room": ((greedy[idx] == 0) & (right[idx] > 0)).float().mean().item()})
    return rows


def main(cfg: SignalConfig):
    model, task = load(cfg.ckpt, pick_device(cfg.device))
    if task.name != "countdown":
        raise BadInput(f"{cfg.ckpt}: a {task.name} checkpoint; expected a countdown one")
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts, answers = task.sample(cfg.n, "train", gen)
    device = next(model.parameters()).device
    G, exact, greedy = cfg.num_generations, [], []  # (n, G) and (n,) once joined
    with torch.no_grad():
        for i in tqdm(range(0, cfg.n, 64), desc="rollouts", leave=False):
            batch = prompts[i:i + 64].to(device)
            greedy.append(rollout(model, task, batch)[2].cpu())
            sampled = rollout(model, task, batch.repeat_interleave(G, 0),
                              temperature=cfg.temperature,
                              generator=torch.Generator(device).manual_seed(cfg.seed + i))[2]
            exact.append(sampled.cpu().view(-1, G))
    rows = by_class([operations(task, a) for a in answers], torch.cat(greedy).float(),
                    torch.cat(exact).float())
    print(f"{cfg.ckpt}: {cfg.n} training prompts, G = {G} rollouts at τ = {cfg.temperature}\n"
          "| operations | share of prompts | greedy exact | rollouts' own exact | groups with "
          "signal | groups with no right rollout | room: greedy wrong, a rollout right |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ops']} | {100 * r['share']:.1f}% | {100 * r['greedy']:.1f}% | "
              f"{100 * r['own']:.1f}% | {100 * r['signal']:.1f}% | {100 * r['none']:.1f}% | "
              f"{100 * r['room']:.1f}% |")
    print(json.dumps({"classes": rows}))


if __name__ == "__main__":
    exit_on_bad_input(main, parse(SignalConfig, sys.argv[1:], "python bench/countdown_signal.py"))

"""IGPO's inpainting (arXiv 2509.10396): give a group without a correct response a signal.

When all G rollouts of a prompt are wrong, GRPO's advantages are all zero and the group teaches
nothing. IGPO decodes G more responses with part of the reference answer fixed in place before
decoding (hints), and puts up to ⌊igpo·G⌋ of the correct ones in the group in place of wrong ones.
Used by rl.py (`--igpo`); the departures from IGPO's code are listed there (departure 3).

Shapes: B responses (prompts × G), G group size, L response length.
"""

import torch
from einops import rearrange, repeat

from .config import autocast
from .estimators import trajectory_logprob
from .train import rollout


def sample_hints(answers, share, mask_id, generator, chunk=(2, 4)) -> torch.Tensor:
    """IGPO's hints (arXiv 2509.10396): each answer (n, L) cut left to right into chunks of
    chunk[0]..chunk[1] tokens, of which round(share_r · #chunks) chosen at random stay (share (n,));
    the rest becomes mask_id -> (n, L) for `generate(hints=...)`. IGPO's chunks are 5-10 tokens of
    a reasoning trace; here an answer has ~16 tokens, so they are shorter."""
    hints = torch.full_like(answers, mask_id)
    for r in range(len(answers)):  # a few rows of ~16 tokens: a loop reads best
        sizes = torch.randint(chunk[0], chunk[1] + 1, (answers.shape[1],), generator=generator)
        ends = sizes.cumsum(0)
        ends = ends[ends < answers.shape[1]].tolist() + [answers.shape[1]]  # chunk i: ends[i-1]..
        starts = [0] + ends[:-1]
        shown = torch.randperm(len(ends), generator=generator)[:round(float(share[r]) * len(ends))]
        for c in shown.tolist():
            hints[r, starts[c]:ends[c]] = answers[r, starts[c]:ends[c]]
    return hints


def inpaint(cfg, policy, task, traj, rewards, exact, answers, gens):
    """IGPO (arXiv 2509.10396): for each group whose G responses are all wrong, decode G more with
    hints (a share η ~ U[igpo_hint_min, igpo_hint_max] of the answer's chunks fixed before
    decoding) and put up to ⌊igpo·G⌋ of the correct ones in place of the group's first responses,
    so that the group has a signal. Modifies traj, rewards, exact in place; returns stats."""
    G, k = cfg.num_generations, int(cfg.igpo * cfg.num_generations)
    wrong = ~rearrange(exact, "(p g) -> p g", g=G).any(1)  # (B/G,) groups without a correct one
    stats = {"igpo_groups": int(wrong.sum()), "igpo_replaced": 0}
    if k == 0 or not wrong.any():
        return stats
    rows = repeat(wrong, "p -> (p g)", g=G)  # (B,) the responses of those groups
    share = cfg.igpo_hint_min + (cfg.igpo_hint_max - cfg.igpo_hint_min) * torch.rand(
        int(rows.sum()), generator=gens["prompts"])
    hints = sample_hints(answers[rows.cpu()], share, policy.config.mask_id, gens["prompts"])
    new, new_rewards, new_exact = rollout(
        policy, task, traj.prompts[rows], temperature=cfg.temperature,
        steps_per_block=cfg.steps_per_block, generator=gens["rollout"],
        hints=hints.to(rows.device), **cfg.decoding(task))
    T_B = max(traj.steps_per_block, new.steps_per_block)  # the parallel rules: they may differ
    traj.renumber(T_B), new.renumber(T_B)
    dst, src = [], []  # rows of traj to overwrite, rows of `new` that overwrite them
    for n, p in enumerate(wrong.nonzero().flatten().tolist()):  # n-th all-wrong group is prompt p
        correct = (n * G + new_exact[n * G:(n + 1) * G].nonzero().flatten())[:k].tolist()
        src += correct
        dst += range(p * G, p * G + len(correct))
    new = new.index(src)
    if cfg.igpo_score_hints and src:  # a hint is "revealed" at its block's first step, T_B·⌊i/b⌋
        first = torch.arange(new.responses.shape[1], device=rows.device) // new.block_size
        new.unmask_step = torch.where(new.unmask_step < 0, first * new.steps_per_block,
                                      new.unmask_step)
        with torch.no_grad(), autocast(rows.device):  # the recorded terms of that trajectory
            new.logp_at_reveal = trajectory_logprob(policy, new, per_token=True)
    for name in ("tokens", "unmask_step", "logp_at_reveal"):
        getattr(traj, name)[dst] = getattr(new, name)
    rewards[dst], exact[dst] = new_rewards[src], new_exact[src]
    return {**stats, "igpo_replaced": len(dst)}

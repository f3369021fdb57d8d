"""Online RL of the masked-diffusion policy with five objectives (docs/math.md §5.1–§5.4).

One iteration: G rollouts per sampled prompt from the current policy (LLaDA's sampler, trajectories
recorded), rewards, GRPO advantages, then the objective's update: `num_iterations` optimizer steps
(1 = on-policy). The five updates (full_trajectory, dtrpo, diffu_grpo, bgpo, vrpo_ol), how each
scores a response and their departures from the papers are in updates.py. The run loop (log,
evaluate, checkpoint, resume) is train.run_loop; the logged metrics are defined in docs/math.md
§5.5.

Departures:
1. Groups with all-equal rewards (A = 0) are dropped; if none is left the update is skipped.
   AdamW, gradient clipping; the learning rate optionally ramped up over `warmup_iters` and
   decayed along a cosine to `min_lr_ratio`·lr over the run's limit (default constant).
2. `kl_ref` (k1, token part of §4.1) and `entropy_revealed` are untimed diagnostics on
   kl_rollouts rollouts; `nll_revealed` is an entropy stand-in at no extra pass.
   It can be negative: without log S_t the token part is not a normalised distribution under
   low-confidence remasking (docs/math.md §4.1).
3. IGPO (igpo > 0; arXiv 2509.10396) as its code does it: triggered by a group without a correct
   response, G hinted responses decoded, up to ⌊igpo·G⌋ correct ones replace the group's first.
   IGPO's d1-based code scores the hinted tokens with the rest; here (igpo_score_hints) a
   replaced response's record says they were revealed at their block's first step, its terms
   recomputed, so every estimator scores them; IGPO's entropy filter (only the 20% of hint
   positions of highest entropy scored) is not implemented. igpo_score_hints=false: hints are
   context only, never masked or scored. Chunks are 2-4 tokens (IGPO: 5-10); η is not sorted.
4. Data parallel (torchrun): each process decodes and scores its own whole groups of one global
   batch of prompts, with its own rollout and estimator draws, so a run on N processes is not the
   one-process run draw for draw; given the same rollouts, the update is (docs/distributed.md).
   IGPO runs in one process only.
A policy-gradient loss value is not a progress signal: ρ ≡ 1 on-policy makes it ≈ 0 by construction
(docs/math.md §5.2); watch reward and test accuracy.

Shapes: B responses (prompts × G), G group size, P prompt length, L response length.
"""

import math
import time
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from .config import BadInput, arg, autocast, check, folder_problem
from .elbo import ELBO_MASKS
from .estimators import entropy_at_reveal, trajectory_logprob
from .igpo import inpaint
from .meters import Meters, elapsed
from .objectives import grpo_advantages
from .parallel import all_ranks, data_parallel, init_parallel, share, weigh
from .train import (DecodingConfig, RunConfig, check_steps, clip_and_step, load, lr_at, rollout,
                    run_loop)
from .updates import UPDATES

OBJECTIVES = ("full_trajectory", "bgpo", "diffu_grpo", "vrpo_ol", "dtrpo")
HEALTH = ("reward_mean", "kl_ref", "grad_norm", "clip_frac", "zero_adv_frac",
          "entropy_revealed")  # curves.png beside the test scores; docs/math.md §5.5 defines them


@dataclass
class RLConfig(RunConfig, DecodingConfig):
    """Online RL from a supervised checkpoint with one of five objectives."""
    init: str = arg("runs/sft/checkpoint.pt", "checkpoint to start from; also the frozen reference")
    objective: str = arg(
        "full_trajectory", "how a response is scored (updates.py)", OBJECTIVES)
    num_prompts: int = arg(64, "training prompts per iteration (fewer: noisier updates)", ge=1)
    num_generations: int = arg(8, "rollouts per prompt G (the GRPO group; one has no advantage)",
                               ge=2)
    temperature: float = arg(1.0, "rollout temperature τ (> 0: greedy groups would be flat)",
                             gt=0)
    max_iters: int = arg(120, "iterations of the run (the block-layout recipe: 120)", ge=1)
    out_dir: str = arg(
        "runs/rl", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves.png",
        valid=folder_problem)
    # ---- the objective's options
    num_iterations: int = arg(1, "optimizer steps per rollout batch μ (1 = on-policy)", ge=1,
                              group="objective")
    clip_eps: float = arg(0.2, "PPO clip ε of the ratio (bgpo: per MC sample; vrpo_ol: of "
                          "exp(mean_j d_j); inert on-policy)", ge=0, group="objective")
    beta: float = arg(0.0, "β of the k3 KL to the initial model (full_trajectory, dtrpo, "
                      "diffu_grpo only)",
                      ge=0, group="objective")
    scale_std: bool = arg(True, "divide advantages by the group std (false: d1 / Dr. GRPO)",
                          group="objective")
    aggregation: str = arg("sequence_mean", "loss aggregation (objectives.clipped_pg_loss)",
                           ("token_mean", "sequence_mean", "constant"), group="objective")
    ratio_level: str = arg("sequence", "full_trajectory: one ratio per sequence, or per step "
                           "(TraceRL)", ("sequence", "step"), group="objective")
    steps_scored: int = arg(1, "dtrpo: K of each block's T_B steps scored, drawn without "
                            "replacement, c = T_B/K (1: dTRPO; T_B: exact; docs/math.md §4.2)",
                            ge=1, group="objective")
    stratified_steps: bool = arg(False, "dtrpo: the K steps spread evenly over the block (one "
                                 "random offset), not a uniform K-subset", group="objective")
    position_term: bool = arg(False, "full_trajectory: add the sampler's selection term log S_t "
                              "to log π (docs/math.md §4.1; θ-dependent under low confidence)",
                              group="objective")
    n_mc: int = arg(4, "ELBO Monte Carlo samples per response n (bgpo, vrpo_ol; each costs a "
                    "forward row per response)", ge=1, group="objective")
    elbo_per_token: bool = arg(True, "ℓ^(j) per masked token as in BGPO's code (false: × L)",
                               group="objective")
    vrpo_two_pass: bool = arg(False, "vrpo_ol: a no-grad pass for exp(mean_j d_j), then one "
                              "sample's graph at a time (docs/math.md §5.4)", group="objective")
    group_masks: bool = arg(False, "bgpo, vrpo_ol, uniform or blockwise masks: the G responses "
                            "of a prompt share one set (common random numbers; docs/math.md §5.4)",
                            group="objective")
    elbo_masks: str = arg("auto", "bgpo, vrpo_ol: ELBO masks uniform over the response, "
                          "blockwise (earlier blocks clean, later masked), or the rollout's own "
                          "states (trajectory); auto: blockwise in the full layout, trajectory in "
                          "the block layout; docs/math.md §4.3", ELBO_MASKS, group="objective")
    prompt_mask_p: float = arg(0.15, "diffu_grpo: probability of masking each prompt token",
                               ge=0, le=1, group="objective")
    # ---- the learning-rate schedule
    warmup_iters: int = arg(0, "learning rate ramped linearly over this many first iterations "
                               "(0: constant from the start)", ge=0, group="optimizer")
    min_lr_ratio: float = arg(1.0, "final learning rate as a fraction of lr, cosine decay over "
                              "max_iters (1: constant, the block layout's recipe; 0.1: the full "
                              "layout's)", ge=0, le=1,
                              group="optimizer")
    # ---- IGPO: hinted rollouts for groups without a correct response
    igpo: float = arg(0.0, "IGPO: share of an all-wrong group's G responses that correct "
                      "responses decoded with hints from the answer may replace (0: off; the "
                      "paper's runs: 0.5)", ge=0, le=1, group="IGPO")
    igpo_hint_min: float = arg(0.2, "IGPO: least share of an answer's chunks given as hints",
                               ge=0, le=1, group="IGPO")
    igpo_hint_max: float = arg(0.6, "IGPO: largest share of an answer's chunks given as hints",
                               ge=0, le=1, group="IGPO")
    igpo_score_hints: bool = arg(True, "IGPO: score a replaced response's hints as tokens revealed "
                                 "at the first step of their block (as IGPO); false: context only",
                                 group="IGPO")
    # ---- diagnostics
    kl_rollouts: int = arg(
        16, "rollouts per iteration scored for kl_ref (by the initial model) and "
        "entropy_revealed (0: off)", ge=0,
        group="diagnostics")

    def __post_init__(self):
        super().__post_init__()
        check(self.beta == 0 or self.objective not in ("bgpo", "vrpo_ol"), "beta", self.beta,
              "0 for bgpo and vrpo_ol "
              "(the KL penalty exists for full_trajectory, dtrpo and diffu_grpo only)")
        check(not self.position_term or self.objective == "full_trajectory", "position_term",
              self.position_term, "false unless objective=full_trajectory")
        check(self.igpo_hint_min <= self.igpo_hint_max, "igpo_hint_max", self.igpo_hint_max,
              f"a share >= igpo_hint_min={self.igpo_hint_min}")



def train_rl(cfg: RLConfig) -> dict:
    """Run online RL as configured; returns the final test metrics. Ctrl-C saves a checkpoint."""
    rank, world, device = init_parallel(cfg.device)
    G = cfg.num_generations
    # this process's rows: whole groups, so each group's mean and std are computed where it is
    mine = share(cfg.num_prompts, rank, world, "num_prompts", group=G)
    if world > 1 and cfg.igpo > 0:
        raise BadInput(f"--igpo={cfg.igpo}: IGPO runs in one process (its hints are drawn from "
                       "the prompt stream, which every process must draw alike)")
    policy, task = load(cfg.init, device)
    check_steps(cfg.steps_per_block, policy)
    ref, _ = load(cfg.init, device)  # the initial model, frozen: reference of the KL and of kl_ref
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gens = {"prompts": torch.Generator().manual_seed(cfg.seed),  # task.sample draws on the CPU
            "rollout": torch.Generator(device).manual_seed(cfg.seed + 1),  # the sampler's draws
            "estimator": torch.Generator(device).manual_seed(cfg.seed + 2)}  # ELBO, prompt masks
    fwd = data_parallel(policy, world)  # the update's forwards and backwards (DDP: all-reduced)

    def iteration(it):
        lr = lr_at(cfg.lr, it, cfg.max_iters, cfg.warmup_iters, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        # ---- rollouts: G responses per prompt from the current policy, scored by the task
        t0 = time.perf_counter()
        prompts, answers = task.sample(cfg.num_prompts, "train", generator=gens["prompts"])
        prompts = repeat(prompts, "p l -> (p g) l", g=G)[mine].to(device)  # (B, P) groups whole
        if world > 1:  # own draws per process, a function of (seed, iteration, rank): resumable
            s = (cfg.seed * 1_000_003 + it) * world + rank
            gens["rollout"].manual_seed(2 * s), gens["estimator"].manual_seed(2 * s + 1)
        traj, rewards, exact = rollout(policy, task, prompts, temperature=cfg.temperature,
                                       steps_per_block=cfg.steps_per_block,
                                       generator=gens["rollout"], **cfg.decoding(task))
        own = {"reward_mean": rewards.mean().item(), "exact": exact.float().mean().item(),
               "nll_revealed": -traj.logp_at_reveal.mean().item()}
        few = traj.index(torch.arange(min(cfg.kl_rollouts, len(prompts)), device=device))  # copy
        # The policy's own rollouts are logged; with igpo > 0 some are replaced here. igpo = 0
        # only counts the all-wrong groups (no random draw), so every run logs them.
        own.update(inpaint(cfg, policy, task, traj, rewards, exact,
                           repeat(answers, "p l -> (p g) l", g=G)[mine], gens))
        adv, adv_stats = grpo_advantages(rewards, G, scale_std=cfg.scale_std)  # (B,)
        signal = rearrange(adv, "(p g) -> p g", g=G).ne(0).any(1)  # (B/G,) groups with a signal
        keep = repeat(signal, "p -> (p g)", g=G)  # (B,)
        kept = all_ranks(keep.sum().item())  # responses kept in the global batch
        row = {**adv_stats, **own, "lr": opt.param_groups[0]["lr"],
               "kept": int(kept), "rollout_s": elapsed(t0, device)}
        if cfg.kl_rollouts > 0:  # untimed diagnostic on π_θ's own trajectories
            with torch.no_grad(), autocast(device):
                # k1 = log π_θ(τ) − log π_init(τ)
                row["kl_ref"] = (few.logp_at_reveal.sum(1)
                                 - trajectory_logprob(ref, few)).mean().item()
                # H(μ_θ) at each decoded token, in the state where the policy revealed it
                row["entropy_revealed"] = entropy_at_reveal(policy, few)[few.unmask_step >= 0] \
                    .mean().item()
        # ---- update on the groups with signal
        if kept == 0:
            return {**row, "update_s": 0.0, "skipped": 1}
        t0, grad_norms, responses = time.perf_counter(), [], int(keep.sum())
        # the losses are means over this process's rows: weight its gradient by its share of them
        weigh(fwd, responses, kept)
        if not keep.any():  # every process must join each backward: this one adds 0 × its groups
            keep = torch.ones_like(keep)

        def step():
            grad_norms.append(clip_and_step(policy, opt, cfg.grad_clip))

        with Meters(device, policy, ref) as meters:
            stats = UPDATES[cfg.objective](cfg, fwd, ref, traj.index(keep), adv[keep],
                                           gens["estimator"], step)
        return {**row, **stats, "grad_norm": grad_norms[-1], "update_s": elapsed(t0, device),
                "skipped_steps": sum(not math.isfinite(n) for n in grad_norms),  # not stepped
                **meters.summary(responses=responses)}

    return run_loop(cfg, "rl", models={"model": policy}, frozen={"ref_model": ref}, task=task,
                    opt=opt, generators=gens, iteration=iteration, max_iters=cfg.max_iters,
                    device=device, bar_keys=("reward_mean", "exact", "zero_adv_frac"),
                    curve_keys=HEALTH)

"""Online RL of the masked-diffusion policy with five objectives (docs/math.md §5.1–§5.4).

One iteration: G rollouts per sampled prompt from the current policy (LLaDA's sampler, trajectories
recorded), rewards, GRPO advantages, then `num_iterations` optimizer steps (1 = on-policy). The
objectives differ only in how they score a response:
- full_trajectory: exact trajectory log-prob (§4.1) in the clipped surrogate (TraceRL,
  arXiv 2509.06949; CJ-GRPO, arXiv 2509.23924); sequence-level ratio, or step-level (TraceRL).
- dtrpo: dTRPO's reduced trajectory (arXiv 2603.18806, §4.2) in the same clipped surrogate, K of
  each block's T_B steps scored (steps_scored; 1: dTRPO's D̂, T_B: the exact log-prob), c = T_B/K.
- diffu_grpo: d1's one-step mean-field log-prob with a random prompt mask (arXiv 2504.12216, §4.4).
- bgpo: BGPO's linear lower bound of the ELBO-ratio objective, backpropagated one MC sample at a
  time so memory does not grow with n_mc (arXiv 2510.11683, §5.4; `bgpo_accumulate`).
- vrpo_ol: the exp-of-mean ELBO-ratio objective BGPO bounds, all n_mc graphs alive (BGPO's
  baseline, with VRPO's masks shared between θ, old and ref, arXiv 2505.19223, and this project's
  stratified counts); vrpo_two_pass: the same gradient one sample at a time, after a no-grad pass
  for its factor.
The run loop (log, evaluate, checkpoint, resume) is train.run_loop; the logged metrics are defined
in docs/math.md §5.5.

Departures:
1. full_trajectory's and dtrpo's old values are the sampler's logp_at_reveal (P1), summed over
   the scored steps: no old-policy pass, for any num_iterations (block layout: ρ − 1 ≈ float32
   rounding on-policy). dtrpo draws fresh steps for every optimizer step.
2. Estimators score at the rollout temperature τ (μ_θ = softmax(logits/τ)), the one that sampled.
3. diffu_grpo: one prompt mask per optimizer step, drawn up front and shared by old, new and
   reference (as d1); a sequence ratio, not d1's per-token one. bgpo, vrpo_ol: one set of ELBO
   masks per rollout batch. With num_iterations > 1 the old values cost one no-grad pass.
4. The k3 KL penalty (β) is clipped_pg_loss's (full_trajectory, diffu_grpo); bgpo and vrpo_ol
   refuse β > 0 (BGPO trains without KL). vrpo_ol clips each response's ratio exp(mean_j d_j)
   (objectives.py, departure 4).
5. Groups with all-equal rewards (A = 0) are dropped; if none is left the update is skipped.
   AdamW, gradient clipping; the learning rate optionally ramped up over `warmup_iters` and
   decayed along a cosine to `min_lr_ratio`·lr over the run's limit (default constant).
6. `kl_ref` (k1, token part of §4.1) and `entropy_revealed` are untimed diagnostics on
   kl_rollouts rollouts; `nll_revealed` is an entropy stand-in at no extra pass.
   It can be negative: without log S_t the token part is not a normalised distribution under
   low-confidence remasking (docs/math.md §4.1).
7. On-policy, diffu_grpo, bgpo, vrpo_ol (and full_trajectory with position_term, whose log S_t
   the sampler does not record) take the old values from the graph pass, detached
   (θ_old = θ: what a no-grad pass gives, tested), one pass cheaper.
8. bgpo, vrpo_ol with group_masks: the G responses of a prompt share one set of ELBO masks, so
   what they have in common cancels in Σ A_i ∇ℓ_i (docs/math.md §5.4); the papers draw per response.
9. bgpo, vrpo_ol in the block layout: ELBO masks are the rollout's own states by default
   (elbo_masks=auto -> trajectory, docs/math.md §4.3), not the papers' uniform masks, with which
   BGPO does not gain there (docs/results.md, "What did not help").
10. IGPO (igpo > 0; arXiv 2509.10396) as its code does it: triggered by a group without a correct
   response, G hinted responses decoded, up to ⌊igpo·G⌋ correct ones replace the group's first.
   IGPO's d1-based code scores the hinted tokens with the rest; here (igpo_score_hints) a
   replaced response's record says they were revealed at their block's first step, its terms
   recomputed, so every estimator scores them; IGPO's entropy filter (only the 20% of hint
   positions of highest entropy scored) is not implemented. igpo_score_hints=false: hints are
   context only, never masked or scored. Chunks are 2-4 tokens (IGPO: 5-10); η is not sorted.
11. Data parallel (torchrun): each process decodes and scores its own whole groups of one global
   batch of prompts, with its own rollout and estimator draws, so a run on N processes is not the
   one-process run draw for draw; given the same rollouts, the update is (docs/distributed.md).
   IGPO runs in one process only.
A policy-gradient loss value is not a progress signal: ρ ≡ 1 on-policy makes it ≈ 0 by construction
(docs/math.md §5.2); watch reward and test accuracy.

Shapes: B responses in the update (prompts × G), G group size, P prompt length, L response length,
N MC samples, T decoding steps, N_B blocks.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from .config import BadInput, arg, autocast, check, folder_problem
from .estimators import (ELBO_MASKS, dtrpo_scale, elbo_mask_block, elbo_masks_for, elbo_terms,
                         entropy_at_reveal, one_step_logprob, reduced_recorded_logprob,
                         reduced_trajectory_logprob, sample_block_steps, sample_prompt_mask,
                         trajectory_logprob)
from .igpo import inpaint
from .meters import Meters, elapsed
from .objectives import (bgpo_loss_terms, clipped_pg_loss, elbo_ratio_loss, elbo_ratio_terms,
                         grpo_advantages)
from .parallel import all_ranks, data_parallel, init_parallel, no_sync, share, weigh
from .train import (DecodingConfig, RunConfig, check_steps, clip_and_step, load, lr_at, rollout,
                    run_loop)

OBJECTIVES = ("full_trajectory", "bgpo", "diffu_grpo", "vrpo_ol", "dtrpo")
HEALTH = ("reward_mean", "kl_ref", "grad_norm", "clip_frac", "zero_adv_frac",
          "entropy_revealed")  # curves.png beside the test scores; docs/math.md §5.5 defines them


@dataclass
class RLConfig(RunConfig, DecodingConfig):
    """Online RL from a supervised checkpoint with one of five objectives."""
    init: str = arg("runs/sft/checkpoint.pt", "checkpoint to start from; also the frozen reference")
    objective: str = arg(
        "full_trajectory", "how a response is scored (module docstring)", OBJECTIVES)
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


# --------------------------------------------------------------------------------------------------
# The five objectives. Each computes its old-policy (and reference) values without grad, then takes
# cfg.num_iterations optimizer steps: loss, backward, `step()`. Returns the last step's stats.


def update_full_trajectory(cfg, policy, ref, traj, adv, gen, step):
    per_step, pos = cfg.ratio_level == "step", cfg.position_term
    # log π_old(τ) = Σ_i logp_at_reveal_i: recorded by the sampler (P1), no pass (departure 1)
    logp_old = traj.logp_at_reveal.sum(1)  # (B,)
    if pos and cfg.num_iterations > 1:  # the recorded sum lacks log S_t: one no-grad pass
        with torch.no_grad(), autocast(adv.device):
            logp_old = trajectory_logprob(policy, traj, per_step=per_step, position_term=True)
    elif per_step:
        # log π_old(τ_{t−1} | τ_t) = Σ_{i∈I_t} logp_at_reveal_i, placed at step t = unmask_step_i
        logp_old = torch.zeros(len(adv), traj.num_steps, device=adv.device).scatter_add(
            1, traj.unmask_step.clamp(min=0), traj.logp_at_reveal)  # (B, T); hints add 0
    with torch.no_grad(), autocast(adv.device):
        logp_ref = trajectory_logprob(ref, traj, per_step=per_step, position_term=pos) \
            if cfg.beta > 0 else None
    for _ in range(cfg.num_iterations):
        with autocast(adv.device):  # T passes (full layout), T_B [x ; y ; ỹ] passes (block)
            logp = trajectory_logprob(policy, traj, per_step=per_step, position_term=pos)
        if pos and cfg.num_iterations == 1:  # on-policy: old = this pass, detached (departure 7)
            logp_old = logp.detach()
        loss, stats = clipped_pg_loss(logp, logp_old, adv, cfg.clip_eps,
                                      aggregation=cfg.aggregation, logp_ref=logp_ref, beta=cfg.beta)
        loss.backward()
        step()
    return stats


def update_dtrpo(cfg, policy, ref, traj, adv, gen, step):
    K, single = cfg.steps_scored, policy.config.layout == "block"  # one pass only where exact
    if K > traj.steps_per_block:
        raise BadInput(f"--steps_scored={K} is not valid: the rollouts took "
                       f"{traj.steps_per_block} steps per block")
    c = dtrpo_scale(traj, "steps", K)  # T_B/K: E[c·Σ_{s∈S_b} ...] = the exact log-prob (P16)
    for _ in range(cfg.num_iterations):
        steps = sample_block_steps(traj, gen, K, cfg.stratified_steps)  # (B, N_B, K) fresh each step
        # log π̂_old = c·Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} logp_at_reveal_i: the record, no pass (dep. 1)
        logp_old = c * reduced_recorded_logprob(traj, steps)  # (B,)
        with torch.no_grad(), autocast(adv.device):
            logp_ref = c * reduced_trajectory_logprob(ref, traj, steps, single_pass=single) \
                if cfg.beta > 0 else None
        with autocast(adv.device):  # one [x ; y ; ỹ¹ … ỹᴷ] pass (block), N_B·K passes (full)
            logp = c * reduced_trajectory_logprob(policy, traj, steps, single_pass=single)  # (B,)
        loss, stats = clipped_pg_loss(logp, logp_old, adv, cfg.clip_eps,
                                      aggregation=cfg.aggregation, logp_ref=logp_ref, beta=cfg.beta)
        loss.backward()
        step()
    return stats


def update_diffu_grpo(cfg, policy, ref, traj, adv, gen, step):
    x, y, tau = traj.prompts, traj.responses, traj.logp_temperature
    # one fresh prompt mask per optimizer step, drawn up front so old, new and reference share it
    prompt_masks = [sample_prompt_mask(x, cfg.prompt_mask_p, gen)
                    for _ in range(cfg.num_iterations)]
    with torch.no_grad(), autocast(adv.device):
        # (B,) each; on-policy: from the graph pass (departure 7)
        logp_old = [one_step_logprob(policy, x, y, m, temperature=tau)
                    if cfg.num_iterations > 1 else None for m in prompt_masks]
        logp_ref = [one_step_logprob(ref, x, y, m, temperature=tau) if cfg.beta > 0 else None
                    for m in prompt_masks]
    for k, m in enumerate(prompt_masks):
        with autocast(adv.device):  # one pass: each y_i predicted from x' and an all-masked y
            logp = one_step_logprob(policy, x, y, m, temperature=tau)  # (B,)
        old = logp.detach() if logp_old[k] is None else logp_old[k]
        loss, stats = clipped_pg_loss(logp, old, adv, cfg.clip_eps, aggregation=cfg.aggregation,
                                      logp_ref=logp_ref[k], beta=cfg.beta)
        loss.backward()
        step()
    return stats


def _elbo(cfg, model, traj, masks):
    """ℓ^(j) of every response on masks (B, N, L) -> (B, N) at the rollout τ (docs/math.md §4.3)."""
    blk = elbo_mask_block(cfg.elbo_masks, model.config.layout, traj.block_size)  # None: uniform
    with autocast(traj.tokens.device):
        return elbo_terms(model, traj.prompts, traj.responses, masks,
                          normalize=cfg.elbo_per_token, temperature=traj.logp_temperature,
                          block_size=blk)


def _elbo_setup(cfg, policy, traj, gen):
    """The update's ELBO masks (B, N, L), one set per response or per group (group_masks), and
    ℓ_old^(j) (B, N) on them: None on-policy, where ℓ_old^(j) = ℓ_θ^(j) detached is taken from the
    graph pass (departure 7). IGPO's hints are never masked: they are context (departure 10)."""
    G = cfg.num_generations if cfg.group_masks else 1  # responses sharing one set of masks
    masks = elbo_masks_for(cfg.elbo_masks, policy.config.layout, traj, cfg.n_mc, gen, G)
    if cfg.num_iterations == 1:
        return masks, None
    with torch.no_grad():
        return masks, _elbo(cfg, policy, traj, masks)  # ℓ_old^(j) on the same masks


def update_bgpo(cfg, policy, ref, traj, adv, gen, step):
    masks, ell_old = _elbo_setup(cfg, policy, traj, gen)  # (B, N, L), (B, N) or None on-policy
    for _ in range(cfg.num_iterations):
        # R̂_lb = Σ_j g_j: sample j's graph is built, backpropagated and freed before sample j+1
        _, stats = bgpo_accumulate(lambda j: _elbo(cfg, policy, traj, masks[:, j:j + 1])[:, 0],
                                   ell_old, adv, n_mc=cfg.n_mc, clip_eps=cfg.clip_eps,
                                   no_sync=no_sync(policy))
        step()
    return stats


def update_vrpo_ol(cfg, policy, ref, traj, adv, gen, step):
    masks, ell_old = _elbo_setup(cfg, policy, traj, gen)  # (B, N, L), (B, N) or None on-policy
    for k in range(cfg.num_iterations):
        if cfg.vrpo_two_pass:  # the same value and gradient, one sample's graph at a time
            # the first step's θ is θ_old: d_j = 0 as on-policy, so no first pass (old = None)
            _, stats = vrpo_two_pass(lambda j: _elbo(cfg, policy, traj, masks[:, j:j + 1])[:, 0],
                                     ell_old if k > 0 else None, adv, n_mc=cfg.n_mc,
                                     clip_eps=cfg.clip_eps, no_sync=no_sync(policy))
        else:
            ell = _elbo(cfg, policy, traj, masks)  # (B, N): all n graphs alive until backward
            # R̂ = A · exp((1/n) Σ_j (ℓ_θ^(j) − ℓ_old^(j)))
            loss, stats = elbo_ratio_loss(ell, ell.detach() if ell_old is None else ell_old, adv,
                                          clip_eps=cfg.clip_eps)
            loss.backward()
        step()
    return stats


def backward_per_sample(ell_fn, ell_old, n, terms_fn, no_sync=contextlib.nullcontext):
    """Backpropagate Σ_j terms_fn(ℓ_θ^{(j)}, ℓ_old^{(j)}) one MC sample's graph at a time
    -> (loss value, mean_j d_j (B,)).

    ell_fn(j) -> (B,) the policy's ℓ_θ^{(j)} with its graph (the caller runs the model on
    masks[:, j:j+1]); ell_old: (B, N) without grad, or None on-policy (θ_old = θ): then
    ℓ_old^{(j)} = ℓ_θ^{(j)} detached, one pass cheaper. terms_fn gets (B, 1) columns and returns
    terms that depend on sample j alone, so the n backwards sum to the gradient of their sum.
    Gradients accumulate in .grad; the caller steps the optimizer. no_sync: DDP's `model.no_sync`
    (parallel.no_sync), entered for every sample but the last: the processes reduce gradients once.
    """
    total, d_sum = 0.0, 0.0
    for j in range(n):
        # data parallel: samples 0..n−2 only accumulate, the last backward all-reduces the sum
        with no_sync() if j < n - 1 else contextlib.nullcontext():
            ell_j = ell_fn(j)  # (B,) builds the graph of sample j only
            old_j = ell_j.detach() if ell_old is None else ell_old[:, j]  # (B,)
            loss_j = terms_fn(ell_j[:, None], old_j[:, None]).sum()
            loss_j.backward()  # frees sample j's graph before j+1 is built: memory ∝ one sample
        total += loss_j.item()
        d_sum = d_sum + (ell_j.detach() - old_j)
    return total, d_sum / n


def bgpo_accumulate(ell_fn, ell_old, advantages, *, n_mc=None, clip_eps=None,
                    no_sync=contextlib.nullcontext):
    """BGPO's memory-efficient backward: one MC sample's graph at a time -> (loss value, stats).

    ell_fn, ell_old, no_sync as `backward_per_sample`; n_mc is required when ell_old is None. Each
    term of `bgpo_loss_terms` depends on one sample only, so the separate backwards sum to the
    bound's gradient (docs/math.md §5.4, P6).
    """
    n = ell_old.shape[1] if ell_old is not None else n_mc

    def terms(ell_j, old_j):  # (B, 1) each
        return bgpo_loss_terms(ell_j, old_j, advantages, n_mc=n, clip_eps=clip_eps)[0]

    total, d_mean = backward_per_sample(ell_fn, ell_old, n, terms, no_sync)
    return (torch.tensor(total, dtype=advantages.dtype),
            {"bound": -total, "logratio_mean": d_mean.mean().item()})


def vrpo_two_pass(ell_fn, ell_old, advantages, *, n_mc=None, clip_eps=None,
                  no_sync=contextlib.nullcontext):
    """The exp-of-mean objective at one sample's memory -> (loss value, stats), with the value and
    the .grad of `elbo_ratio_loss` (docs/math.md §5.4).

    ∇R̂ = A·exp(mean_j d_j)·(1/n)·Σ_j ∇ℓ_θ^{(j)}: the factor needs the samples' values, not their
    graphs. Pass 1 computes every ℓ_θ^{(j)} without grad (n·B rows, nothing saved); pass 2
    backpropagates one sample at a time, like `bgpo_accumulate`. ell_fn, ell_old, no_sync as
    `backward_per_sample`; ell_old None (θ_old = θ): every d_j = 0, so there is no pass 1.
    """
    n = ell_old.shape[1] if ell_old is not None else n_mc
    if ell_old is None:  # on-policy: mean_j d_j = 0 exactly, the factor is A
        d_mean = torch.zeros_like(advantages)  # (B,)
    else:
        with torch.no_grad():  # pass 1: values only, one sample at a time as in pass 2
            ell = torch.stack([ell_fn(j) for j in range(n)], 1)  # (B, N)
        d_mean = (ell - ell_old).mean(1)  # (B,) mean_j d_j

    def terms(ell_j, old_j):  # (B, 1) each; old_j is inside d_mean
        return elbo_ratio_terms(ell_j, d_mean, advantages, n_mc=n, clip_eps=clip_eps)[0]

    total, _ = backward_per_sample(ell_fn, ell_old, n, terms, no_sync)
    return (torch.tensor(total, dtype=advantages.dtype),
            {"objective": -total, "logratio_mean": d_mean.mean().item()})


UPDATES = {"full_trajectory": update_full_trajectory, "diffu_grpo": update_diffu_grpo,
           "bgpo": update_bgpo, "vrpo_ol": update_vrpo_ol, "dtrpo": update_dtrpo}


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

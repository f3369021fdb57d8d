"""The five online RL updates, one per objective (docs/math.md §5.2, §5.4).

`rl.train_rl` draws the rollouts and their GRPO advantages, then calls `UPDATES[cfg.objective]`
(cfg an `rl.RLConfig`). Each update computes its old-policy (and reference) values without grad,
then takes cfg.num_iterations optimizer steps (1 = on-policy): loss, backward, `step()`; it returns
the last step's stats. The objectives differ only in how they score a response:
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

Departures:
1. full_trajectory's and dtrpo's old values are the sampler's logp_at_reveal (P1), summed over
   the scored steps: no old-policy pass, for any num_iterations (block layout: ρ − 1 ≈ float32
   rounding on-policy). dtrpo draws fresh steps for every optimizer step.
2. Estimators score at the rollout temperature τ (μ_θ = softmax(logits/τ)), the one that sampled.
3. diffu_grpo: one prompt mask per optimizer step, drawn up front and shared by old, new and
   reference (as d1); a sequence ratio, not d1's per-token one. bgpo, vrpo_ol: one set of ELBO
   masks per rollout batch. With num_iterations > 1 the old values cost one no-grad pass.
4. The k3 KL penalty (β) is clipped_pg_loss's (full_trajectory, dtrpo, diffu_grpo); bgpo and
   vrpo_ol refuse β > 0 (RLConfig; BGPO trains without KL). vrpo_ol clips each response's ratio
   exp(mean_j d_j) (objectives.py, departure 4).
5. On-policy, diffu_grpo, bgpo, vrpo_ol (and full_trajectory with position_term, whose log S_t
   the sampler does not record) take the old values from the graph pass, detached
   (θ_old = θ: what a no-grad pass gives, tested), one pass cheaper.
6. bgpo, vrpo_ol with group_masks: the G responses of a prompt share one set of ELBO masks, so
   what they have in common cancels in Σ A_i ∇ℓ_i (docs/math.md §5.4); the papers draw per response.
7. bgpo, vrpo_ol in the block layout: ELBO masks are the rollout's own states by default
   (elbo_masks=auto -> trajectory, docs/math.md §4.3), not the papers' uniform masks, with which
   BGPO does not gain there (docs/results.md, "What did not help").

Shapes: B responses in the update (prompts × G), G group size, L response length, N MC samples,
T decoding steps, N_B blocks, K steps per block.
"""

import contextlib

import torch

from .config import BadInput, autocast
from .elbo import elbo_mask_block, elbo_masks_for, elbo_terms, one_step_logprob, sample_prompt_mask
from .estimators import (dtrpo_scale, reduced_recorded_logprob, reduced_trajectory_logprob,
                         sample_block_steps, trajectory_logprob)
from .objectives import bgpo_loss_terms, clipped_pg_loss, elbo_ratio_loss, elbo_ratio_terms
from .parallel import no_sync


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
        if pos and cfg.num_iterations == 1:  # on-policy: old = this pass, detached (departure 5)
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
        # (B,) each; on-policy: from the graph pass (departure 5)
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
    graph pass (departure 5). IGPO's hints are never masked: they are context (rl.py,
    departure 3)."""
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


UPDATES = {"full_trajectory": update_full_trajectory, "diffu_grpo": update_diffu_grpo,
           "bgpo": update_bgpo, "vrpo_ol": update_vrpo_ol, "dtrpo": update_dtrpo}


# --------------------------------------------------------------------------------------------------
# BGPO's backward: one Monte Carlo sample's graph at a time (docs/math.md §5.4)


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

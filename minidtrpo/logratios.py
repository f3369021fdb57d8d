"""Every likelihood estimator of docs/math.md §4 as an estimate of one log-ratio: the rows of the
estimator report (report.py, `python -m minidtrpo estimators`).

An `Estimator` row holds fn(policy, ref, traj, generator) -> (B,), an estimate of
Δ = log π_θ(τ|x) − log π_ref(τ|x) for a batch of decoded trajectories, with the gradient through the
policy only (the reference is scored without grad, on the same draws: s_b, ELBO masks, prompt mask).
`exact` is Δ itself (§4.1); `dtrpo` dTRPO's D̂ and the dial (§4.2); `elbo` the Monte Carlo ELBO
log-ratio (§4.3); `one_step` d1's (§4.4). `estimators_for` lists the rows a checkpoint gets.

Shapes: B trajectories, N MC samples, L response length, P prompt length.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .elbo import elbo_mask_block, elbo_masks_for, elbo_terms, one_step_logprob, sample_prompt_mask
from .estimators import dtrpo_logratio, sample_block_steps, trajectory_logprob


@dataclass
class Estimator:
    """One row of the report: a log-ratio estimate and what its expectation is."""
    name: str
    targets: str  # what its expectation is: "decoded τ" or "log p(y|x)"
    fn: Callable  # (policy, ref, traj, generator) -> (B,) estimate of Δ
    random: bool  # False: deterministic, no draws needed


def exact(position_term=False):
    def fn(policy, ref, traj, gen):
        with torch.no_grad():
            ref_logp = trajectory_logprob(ref, traj, position_term=position_term)
        # Δ = log π_θ(τ|x) − log π_ref(τ|x), T states scored exactly
        return trajectory_logprob(policy, traj, position_term=position_term) - ref_logp
    return fn


def dtrpo(single_pass=True, k=1, stratified=False):
    # D̂ = (T_B/K) · Σ_b Σ_{s∈S_b} [log μ_θ − log μ_ref] at K sampled steps per block; E[D̂] = Δ
    return lambda policy, ref, traj, gen: dtrpo_logratio(
        policy, ref, traj, sample_block_steps(traj, gen, k, stratified), "steps",
        single_pass=single_pass)


def elbo(n_mc, masks="uniform"):
    def fn(policy, ref, traj, gen):
        L = traj.responses.shape[1]
        layout = policy.config.layout
        # (B, N, L) shared by both models: uniform, blockwise or the trajectory's own (§4.3)
        m = elbo_masks_for(masks, layout, traj, n_mc, gen)
        blk = elbo_mask_block(masks, layout, traj.block_size)  # b where one block is scored
        tau = traj.logp_temperature
        with torch.no_grad():
            ell_ref = elbo_terms(ref, traj.prompts, traj.responses, m, temperature=tau,
                                 block_size=blk)  # (B, N)
        ell = elbo_terms(policy, traj.prompts, traj.responses, m, temperature=tau,
                         block_size=blk)  # (B, N)
        # L·(B̂_θ − B̂_ref), B̂ = (1/n) Σ_j ℓ^{(j)} per token: the per-sequence ELBO log-ratio
        return L * (ell - ell_ref).mean(1)
    return fn


def one_step(p):
    def fn(policy, ref, traj, gen):
        prompt_mask = sample_prompt_mask(traj.prompts, p, gen)  # (B, P) the same x' for both models
        tau = traj.logp_temperature
        with torch.no_grad():
            ref_logp = one_step_logprob(ref, traj.prompts, traj.responses, prompt_mask,
                                        temperature=tau)
        # Σ_i [log μ_θ(y_i | x', M…M) − log μ_ref(y_i | x', M…M)]
        return one_step_logprob(policy, traj.prompts, traj.responses, prompt_mask,
                                temperature=tau) - ref_logp
    return fn


def estimators_for(layout: str, temperature: float, prompt_mask_p: float,
                   steps_per_block: int) -> list[Estimator]:
    rows = [Estimator("exact trajectory", "decoded τ", exact(), False)]
    if temperature > 0:  # S_t is a probability only for a sampled rollout
        rows.append(Estimator("exact + log S_t", "decoded τ with S_t",
                              exact(position_term=True), False))
    if layout == "block":  # single pass == per-block passes here (P3): one row
        rows.append(Estimator("dTRPO c=T_B", "decoded τ", dtrpo(), True))
    else:
        rows.append(Estimator("dTRPO c=T_B, 1 pass", "decoded τ (approx.)", dtrpo(True), True))
        rows.append(Estimator("dTRPO c=T_B, N_B passes", "decoded τ", dtrpo(False), True))
    # the dial: K of the T_B steps per block, c = T_B/K (K = 1 is the dTRPO row above)
    for k in sorted({2, steps_per_block // 2} - {0, 1}):
        if k < steps_per_block:
            passes = "1 pass" if layout == "block" else "N_B·K passes"  # exact in both
            rows.append(Estimator(f"dial K={k}, c=T_B/{k}, {passes}", "decoded τ",
                                  dtrpo(layout == "block", k), True))
    if steps_per_block > 2:
        rows.append(Estimator("dial K=2 stratified", "decoded τ",
                              dtrpo(layout == "block", 2, True), True))
    rows += [Estimator(f"ELBO n={n}", "log p(y|x) bound", elbo(n), True) for n in (1, 4, 16)]
    if layout == "full":  # the block-by-block sampler's ELBO (block layout: the rows above are)
        rows.append(Estimator("ELBO n=16, blockwise", "semi-AR log p(y|x) bound",
                              elbo(16, "blockwise"), True))
    # BGPO's default (elbo_masks=auto in the block layout): states the sampler visited
    rows.append(Estimator("ELBO n=4, trajectory masks", "visited-state ELBO",
                          elbo(4, "trajectory"), True))
    rows.append(Estimator(f"one-step p={prompt_mask_p:g}", "log p(y|x) mean-field",
                          one_step(prompt_mask_p), True))
    return rows

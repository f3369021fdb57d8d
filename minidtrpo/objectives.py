"""RL objectives as pure functions: tensors in, (loss, stats) out (docs/math.md §5). No model calls.

The log-likelihood estimates fed in come from `estimators.py` and `elbo.py`. Papers:
- GRPO advantages and the clipped surrogate: DeepSeekMath (arXiv 2402.03300), d1 / diffu-GRPO
  (arXiv 2504.12216); token/step-level ratios: TraceRL (arXiv 2509.06949).
- DPO form of dTRPO (arXiv 2603.18806), the exact trajectory counterpart, and VRPO
  (arXiv 2505.19223).
- BGPO (arXiv 2510.11683): a linear lower bound of the ELBO-ratio objective that backpropagates one
  Monte Carlo sample at a time.

Departures:
1. GRPO's group std is the unbiased (Bessel-corrected) std, as torch.std and the TRL / d1 code; a
   group of size 1 or with all-equal rewards gets A = 0.
2. BGPO's per-sample terms are returned as a (B, N) table, one column per MC sample, so the caller
   can backpropagate them one sample at a time (`updates.bgpo_accumulate`): nothing here runs the
   model.
3. BGPO's optional PPO-style clip (`clip_eps`) acts per MC sample on 1 + d_j (A ≥ 0) or exp(d_j)
   (A < 0); on-policy every d_j = 0 and the clip is inert.
4. The exp-of-mean objective's optional clip acts on each response's ratio exp(mean_j d_j), so one
   sample's d_j can switch off the gradient of all n. Its per-sample split (`elbo_ratio_terms`)
   takes mean_j d_j as a value from a no-grad pass (`updates.vrpo_two_pass`).
A policy-gradient loss value is not a progress signal (≈ 0 on-policy by construction): watch reward.

Shapes: B batch, G group size, K steps or tokens per sequence, N MC samples.
"""

import torch
import torch.nn.functional as F
from einops import rearrange


def grpo_advantages(rewards, group_size, scale_std=True):
    """GRPO group-relative advantages (docs/math.md §5.1) -> ((B,), stats).

    rewards: (B,), in contiguous groups of G. scale_std=False: no std division (d1 / Dr. GRPO).
    """
    r = rearrange(rewards, "(p g) -> p g", g=group_size)  # (B/G, G): each row one prompt's group
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # divides by G − 1
    # A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-6)
    adv = (r - mean) / (std + 1e-6) if scale_std else r - mean
    flat = (r == r[:, :1]).all(1, keepdim=True)  # (B/G, 1) groups with all-equal rewards: no signal
    adv = adv.masked_fill(flat, 0.0)  # exactly 0, not a rounding error of r − mean
    stats = {"zero_adv_frac": flat.float().mean().item(),
             "reward_mean": rewards.float().mean().item(),
             "reward_std": rewards.float().std().item() if rewards.numel() > 1 else 0.0}
    return adv.flatten(), stats


def _aggregate(x, mask, aggregation):
    """Reduce per-element values x (B, K) with a 0/1 mask (B, K) to a scalar, by the named rule."""
    if aggregation == "token_mean":  # Σ_{i,k} m_ik·x_ik / Σ_{i,k} m_ik
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence_mean":  # (1/B) Σ_i [Σ_k m_ik·x_ik / Σ_k m_ik]
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "constant":  # Σ_{i,k} m_ik·x_ik / (B·K)   (Dr. GRPO's constant normaliser)
        return (x * mask).sum() / x.numel()
    raise ValueError(f"aggregation={aggregation!r} "
                     "is not one of token_mean, sequence_mean, constant")


def clipped_pg_loss(logp, logp_old, advantages, eps=0.2, *, aggregation="sequence_mean", mask=None,
                    logp_ref=None, beta=0.0):
    """PPO/GRPO clipped surrogate (docs/math.md §5.2) -> (loss, stats).

    logp, logp_old (and logp_ref): (B,) sequence log-likelihood estimates -> one ratio per sequence,
    or (B, K) per step/token with mask (B, K) -> step/token-level ratios (TraceRL); advantages (B,).
    aggregation of the per-element loss: "token_mean", "sequence_mean" (default) or "constant" (see
    `_aggregate`; for (B,) inputs all three are the mean over B).
    beta > 0 adds β·KL_k3 to the reference, aggregated the same way.
    """
    if logp.dim() == 1:  # one ratio per sequence: a (B, 1) table with K = 1
        logp, logp_old = logp[:, None], logp_old[:, None]
        logp_ref = None if logp_ref is None else logp_ref[:, None]
    mask = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)  # (B, K)
    adv = advantages[:, None].to(logp.dtype)  # (B, 1)
    # ρ = exp(log π̂_θ − log π̂_old); ≡ 1 on-policy (first step after sampling), yet ∇ρ = ρ·∇log π̂
    ratio = torch.exp(logp - logp_old.detach())  # (B, K)
    clipped = ratio.clamp(1 - eps, 1 + eps)
    # L = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A): no gradient once ρ > 1+ε (A > 0) or ρ < 1−ε (A < 0)
    per_elem = -torch.min(ratio * adv, clipped * adv)  # (B, K)
    loss = _aggregate(per_elem, mask, aggregation)
    is_clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))  # clip active
    stats = {"clip_frac": _aggregate(is_clipped.to(logp.dtype), mask, "token_mean").item(),
             "ratio_mean": _aggregate(ratio.detach(), mask, "token_mean").item()}
    if logp_ref is not None:
        delta = logp_ref.detach() - logp  # log π_ref − log π_θ
        # KL_k3 = e^δ − δ − 1   (≥ 0; on samples of π_θ unbiased for KL(π_θ ‖ π_ref) if both
        # log-probs are normalised; its expected gradient is ∇KL(π_ref ‖ π_θ), docs/math.md §5.2)
        kl = torch.exp(delta) - delta - 1  # (B, K)
        kl_mean = _aggregate(kl, mask, aggregation)
        loss = loss + beta * kl_mean
        stats["kl"] = kl_mean.item()
    return loss, stats


def dpo_loss(logratio_chosen, logratio_rejected, beta):
    """DPO loss on trajectory log-ratio estimates D(x, y) = log π_θ − log π_ref -> (loss, stats).

    D: dTRPO's D̂ (`estimators.dtrpo_logratio`), the exact §4.1 log-ratio, or VRPO's B̂_θ − B̂_ref.
    At θ = ref both D are 0 and the loss is log 2 (docs/math.md §5.3).
    """
    margin = beta * (logratio_chosen - logratio_rejected)  # (B,)
    # L = −E log σ(β·[D(x, y_w) − D(x, y_l)])
    loss = -F.logsigmoid(margin).mean()
    stats = {"reward_accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
             "chosen_logratio": logratio_chosen.mean().item(),
             "rejected_logratio": logratio_rejected.mean().item()}
    return loss, stats


def bgpo_loss_terms(ell, ell_old, advantages, *, n_mc=None, clip_eps=None):
    """BGPO's per-sample terms (arXiv 2510.11683, docs/math.md §5.4) -> (terms (B, N), stats).

    Σ terms = −(1/B)·Σ_i R̂_lb,i, the loss to minimise. ell, ell_old: (B, N) ELBO terms of the
    policy and the old policy on the same masks (`elbo_terms`); a subset of the columns may be
    passed with n_mc = the total number of samples n. Every column depends on one MC sample only, so
    each can be backpropagated alone (`updates.bgpo_accumulate`). clip_eps: optional PPO-style clip
    of each sample's ratio surrogate (inert on-policy, where d_j = 0).
    """
    n = ell.shape[1] if n_mc is None else n_mc
    adv = advantages[:, None].to(ell.dtype)  # (B, 1)
    d = ell - ell_old.detach()  # (B, N) d_j = ℓ_θ^{(j)} − ℓ_old^{(j)}
    pos = adv >= 0
    # A ≥ 0: tangent line e^δ ≥ 1 + δ (computed as 1 + d, never exp(log(1 + d)))
    lin = 1 + d
    # A < 0: Jensen e^{mean d} ≤ mean e^{d}; exp(0) where A ≥ 0, so a large d there cannot overflow
    expd = torch.exp(torch.where(pos, 0.0, d))
    surrogate = torch.where(pos, lin, expd)  # (B, N) per-sample stand-in for the ratio exp(mean d)
    # g_j = A·(1 + d_j)/n if A ≥ 0,  g_j = A·exp(d_j)/n if A < 0
    g = adv * surrogate / n  # (B, N)
    if clip_eps is not None:  # PPO: min(s·A, clip(s, 1−ε, 1+ε)·A) per sample; s = 1 on-policy
        g = torch.min(g, adv * surrogate.clamp(1 - clip_eps, 1 + clip_eps) / n)
    terms = -g / ell.shape[0]  # (B, N), so that Σ terms = −(1/B) Σ_i Σ_j g_ij
    stats = {"bound": g.sum(1).mean().item(), "logratio_mean": d.mean().item()}
    return terms, stats


def elbo_ratio_loss(ell, ell_old, advantages, *, clip_eps=None):
    """The exp-of-mean ELBO-ratio objective ("VRPO-OL", BGPO's baseline) -> (loss, stats).

    One graph over all N samples, so peak memory grows with N; `elbo_ratio_terms` splits the same
    value and gradient into per-sample terms (docs/math.md §5.4). clip_eps: optional PPO-style clip
    of each response's ratio exp(mean_j d_j) (inert on-policy, where the ratio is 1).
    """
    d = ell - ell_old.detach()  # (B, N)
    adv = advantages.to(ell.dtype)  # (B,)
    ratio = torch.exp(d.mean(1))  # (B,) ρ = exp((1/n) Σ_j d_j)
    # R̂ = A·ρ
    objective = adv * ratio  # (B,)
    if clip_eps is not None:  # R̂ = min(A·ρ, A·clip(ρ, 1−ε, 1+ε)): one clip for all n samples
        objective = torch.min(objective, adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    # L = −(1/B) Σ_i R̂_i
    loss = -objective.mean()
    return loss, {"objective": objective.mean().item(), "logratio_mean": d.mean().item()}


def elbo_ratio_terms(ell, logratio_mean, advantages, *, n_mc=None, clip_eps=None):
    """The exp-of-mean objective as per-sample terms (docs/math.md §5.4) -> (terms (B, N), stats).

    Summed over all n samples the terms have the value and gradient of `elbo_ratio_loss`:
    ∇R̂ = c·(1/n)·Σ_j ∇ℓ_θ^{(j)} with c = ∂R̂/∂(mean_j d_j), a number per response.
    ell: (B, N) ℓ_θ^{(j)} of some of the samples, with graph (n_mc = n, the total);
    logratio_mean: (B,) mean_j d_j over all n samples, a value (`updates.vrpo_two_pass` gets it from
    a no-grad pass).
    """
    B, n = ell.shape[0], ell.shape[1] if n_mc is None else n_mc
    adv = advantages.to(ell.dtype)  # (B,)
    ratio = torch.exp(logratio_mean.detach().to(ell.dtype))  # (B,) ρ = exp(mean_j d_j), a value
    objective = adv * ratio  # (B,) R̂ = A·ρ
    # c = A·ρ: the derivative of A·exp(δ) at δ = mean_j d_j
    slope = adv * ratio  # (B,)
    if clip_eps is not None:  # as elbo_ratio_loss: min(A·ρ, A·clip(ρ, 1−ε, 1+ε))
        objective = torch.min(objective, adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
        # the clipped side is the min where ρ > 1+ε (A > 0) or ρ < 1−ε (A < 0): c = 0 there
        clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
        slope = slope.masked_fill(clipped, 0.0)
    # ℓ − ℓ.detach() is 0 in value and ∇ℓ in gradient
    zero = ell - ell.detach()  # (B, N)
    # t_ij = −(R̂_i + c_i·(ℓ_ij − ℓ_ij detached)) / (n·B); Σ_ij t_ij = −(1/B) Σ_i R̂_i in value,
    # and its gradient −(1/B) Σ_i c_i·(1/n) Σ_j ∇ℓ_ij is the one-graph gradient
    terms = -(objective[:, None] + slope[:, None] * zero) / (n * B)  # (B, N)
    stats = {"objective": objective.mean().item(), "logratio_mean": logratio_mean.mean().item()}
    return terms, stats

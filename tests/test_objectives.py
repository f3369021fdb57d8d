"""Objectives (docs/math.md §5) against naive loops over sequences and samples: P5–P8, P10, and the
two-pass exp-of-mean objective against its one-graph form.

Gradients are taken on the tiny float64 model's parameters through the estimators, so each property
is checked end to end; the references are written straight from the formulas.
"""

import math
import statistics

import pytest
import torch

from conftest import perturbed, random_prompts, tiny_model
from minidtrpo.meters import SavedBytes
from minidtrpo.elbo import elbo_terms, one_step_logprob, sample_elbo_masks, sample_prompt_mask
from minidtrpo.estimators import dtrpo_logratio, sample_block_steps, trajectory_logprob
from minidtrpo.objectives import (bgpo_loss_terms, clipped_pg_loss, dpo_loss, elbo_ratio_loss,
                                  grpo_advantages)
from minidtrpo.sampling import generate
from minidtrpo.updates import bgpo_accumulate, vrpo_two_pass

pytestmark = pytest.mark.usefixtures("single_thread")
ADV = torch.tensor([1.3, -0.7, 0.5, -2.0, 0.0, 1.4], dtype=torch.float64)  # both signs and zero


def rollout(model, batch=6, steps_per_block=2, seed=0):
    return generate(model, random_prompts(batch, seed=seed), steps_per_block=steps_per_block,
                    temperature=1.0, generator=torch.Generator().manual_seed(seed))


def grads(value, model):
    return torch.autograd.grad(value, list(model.parameters()), retain_graph=True)


def assert_grads_close(g1, g2, rtol=1e-8, atol=1e-12):
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# §5.1 advantages, §5.2 clipped policy gradient (P8)


def test_grpo_advantages_match_naive():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.9, 0.3, 0.0])
    adv, stats = grpo_advantages(rewards, 4)
    for g in range(3):
        r = rewards[4 * g:4 * g + 4].tolist()
        for k in range(4):
            want = (0.0 if len(set(r)) == 1
                    else (r[k] - statistics.mean(r)) / (statistics.stdev(r) + 1e-6))
            assert abs(adv[4 * g + k].item() - want) < 1e-5
    assert torch.equal(adv[4:8], torch.zeros(4)) and abs(stats["zero_adv_frac"] - 1 / 3) < 1e-6
    adv_raw, _ = grpo_advantages(rewards, 4, scale_std=False)
    torch.testing.assert_close(adv_raw[:4], rewards[:4] - rewards[:4].mean())
    assert torch.equal(grpo_advantages(torch.tensor([3.0, 1.0]), 1)[0], torch.zeros(2))


def naive_clipped(logp, logp_old, adv, eps, aggregation, mask, logp_ref, beta):
    B, K = len(logp), len(logp[0])
    per, kl = [[0.0] * K for _ in range(B)], [[0.0] * K for _ in range(B)]
    for i in range(B):
        for k in range(K):
            rho = math.exp(logp[i][k] - logp_old[i][k])
            per[i][k] = -min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            kl[i][k] = math.exp(logp_ref[i][k] - logp[i][k]) - (logp_ref[i][k] - logp[i][k]) - 1

    def agg(x):
        if aggregation == "token_mean":
            return (sum(x[i][k] * mask[i][k] for i in range(B) for k in range(K))
                    / sum(map(sum, mask)))
        if aggregation == "sequence_mean":
            return sum(sum(x[i][k] * mask[i][k] for k in range(K)) / sum(mask[i])
                       for i in range(B)) / B
        return sum(x[i][k] * mask[i][k] for i in range(B) for k in range(K)) / (B * K)
    return agg(per) + beta * agg(kl)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_clipped_pg_loss_matches_naive(aggregation):
    gen = torch.Generator().manual_seed(0)
    logp_old = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    # ratios on both sides of the clip
    logp = logp_old + 0.4 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    logp_ref = logp_old + 0.1 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) < 0.7
    mask[:, 0] = True
    adv = ADV[:5]
    loss, stats = clipped_pg_loss(logp, logp_old, adv, 0.2, aggregation=aggregation, mask=mask,
                                  logp_ref=logp_ref, beta=0.05)
    want = naive_clipped(logp.tolist(), logp_old.tolist(), adv.tolist(), 0.2, aggregation,
                         mask.int().tolist(), logp_ref.tolist(), 0.05)
    assert abs(loss.item() - want) < 1e-12
    assert 0 < stats["clip_frac"] < 1 and stats["kl"] > 0
    # (B,) inputs
    seq, _ = clipped_pg_loss(logp[:, 0], logp_old[:, 0], adv, 0.2, aggregation=aggregation)
    assert abs(seq.item() - naive_clipped(logp[:, :1].tolist(), logp_old[:, :1].tolist(),
                                          adv.tolist(), 0.2, "token_mean", [[1]] * 5,
                                          logp[:, :1].tolist(), 0.0)) < 1e-12


def test_clip_zeroes_gradient_on_the_clipped_side():
    logp_old = torch.zeros(4, dtype=torch.float64)
    # ρ = e^{±0.5}
    logp = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, stats = clipped_pg_loss(logp, logp_old, adv, 0.2)
    (g,) = torch.autograd.grad(loss, logp)
    # A > 0 with ρ > 1+ε and A < 0 with ρ < 1−ε are clipped (no gradient); the other two are not
    assert g[0] == 0 and g[3] == 0 and g[1] != 0 and g[2] != 0 and stats["clip_frac"] == 0.5


def test_p8_clipped_loss_on_policy_gradient_is_reinforce():
    """P8: at θ = θ_old, ∇ clipped loss == −mean(A·∇log π̂) (sequence level) and == −Σ m·A·∇log π̂_k
    / Σ m (step level, token_mean aggregation, TraceRL's per-step log-probs)."""
    model = tiny_model("block")
    traj = rollout(model)
    logp = trajectory_logprob(model, traj)  # (B,)
    loss, stats = clipped_pg_loss(logp, logp.detach(), ADV)
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
    assert_grads_close(grads(loss, model), grads(-(ADV * logp).mean(), model))
    steps = trajectory_logprob(model, traj, per_step=True)  # (B, T)
    mask = torch.ones_like(steps, dtype=torch.bool)
    mask[0, -1] = False
    loss, _ = clipped_pg_loss(steps, steps.detach(), ADV, aggregation="token_mean", mask=mask)
    assert_grads_close(grads(loss, model),
                       grads(-(ADV[:, None] * steps * mask).sum() / mask.sum(), model))
    # d1's estimator
    pmask = sample_prompt_mask(traj.prompts, 0.15, torch.Generator().manual_seed(0))
    d1 = one_step_logprob(model, traj.prompts, traj.responses, pmask)
    # KL_k3 = 0 with zero gradient
    loss, _ = clipped_pg_loss(d1, d1.detach(), ADV, logp_ref=d1.detach(), beta=0.1)
    assert_grads_close(grads(loss, model), grads(-(ADV * d1).mean(), model))


def test_k3_kl_is_unbiased_for_kl_and_its_expected_gradient_is_the_reverse_kls():
    """P14: the k3 penalty of clipped_pg_loss (A = 0, β = 1), averaged exactly over the samples of a
    categorical π_θ (6 outcomes): its value is KL(π_θ ‖ π_ref); its gradient, the samples held
    fixed, is ∇KL(π_ref ‖ π_θ), not ∇KL(π_θ ‖ π_ref) (docs/math.md §5.2). With unnormalised
    log-probs (logits without their log-normaliser) the value is biased."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    ref_logits = torch.randn(6, generator=gen, dtype=torch.float64)
    logp, logp_ref = logits.log_softmax(0), ref_logits.log_softmax(0)
    p, p_ref = logp.exp(), logp_ref.exp()

    def expected_k3(lp, lp_ref):  # Σ_y π_θ(y)·k3(y), each y a batch of one, weights held fixed
        return sum(p[y].detach() * clipped_pg_loss(lp[y:y + 1], lp[y:y + 1].detach(),
                                                   torch.zeros(1), logp_ref=lp_ref[y:y + 1],
                                                   beta=1.0)[0] for y in range(6))

    value = expected_k3(logp, logp_ref)
    kl_forward = (p * (logp - logp_ref)).sum()  # KL(π_θ ‖ π_ref)
    kl_reverse = (p_ref * (logp_ref - logp)).sum()  # KL(π_ref ‖ π_θ)
    assert abs(value.item() - kl_forward.item()) < 1e-12
    (g,) = torch.autograd.grad(value, logits, retain_graph=True)
    (g_reverse,) = torch.autograd.grad(kl_reverse, logits, retain_graph=True)
    (g_forward,) = torch.autograd.grad(kl_forward, logits, retain_graph=True)
    torch.testing.assert_close(g, g_reverse, rtol=0, atol=1e-12)
    assert (g - g_forward).norm() > 0.1 * g_forward.norm()
    biased = expected_k3(logits, ref_logits)  # log π̂ = logit: off by log Z_θ − log Z_ref
    assert abs(biased.item() - kl_forward.item()) > 1e-2


# --------------------------------------------------------------------------------------------------
# §5.3 DPO form (P10)


def test_p10_dpo_at_reference():
    """P10: at θ = ref the loss is log 2, its gradient is −(β/2)·mean(∇D_w − ∇D_l), and one gradient
    step raises the chosen log-ratio (and the margin)."""
    ref = tiny_model("block")
    policy = perturbed(ref, 0.0)  # an exact copy
    traj = rollout(ref, batch=8, steps_per_block=4)
    chosen, rejected = traj.index(slice(0, 4)), traj.index(slice(4, 8))
    s_w, s_l = (sample_block_steps(chosen, torch.Generator().manual_seed(0)),
                sample_block_steps(rejected))
    beta = 0.5
    d_w, d_l = dtrpo_logratio(policy, ref, chosen, s_w), dtrpo_logratio(policy, ref, rejected, s_l)
    loss, stats = dpo_loss(d_w, d_l, beta)
    assert abs(loss.item() - math.log(2)) < 1e-12 and stats["margin"] == 0.0
    assert_grads_close(grads(loss, policy), grads(-(beta / 2) * (d_w - d_l).mean(), policy))
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.01 * p.grad
        d_w2, d_l2 = (dtrpo_logratio(policy, ref, chosen, s_w),
                      dtrpo_logratio(policy, ref, rejected, s_l))
    assert d_w2.mean() > 0 and (d_w2 - d_l2).mean() > 0
    assert dpo_loss(d_w2, d_l2, beta)[0] < math.log(2)


# --------------------------------------------------------------------------------------------------
# §5.4 BGPO (P5, P6, P7) and the exp-of-mean objective in two passes


def elbo_setup(n, old_scale=0.0, batch=6):
    model = tiny_model("block")
    old = perturbed(model, old_scale)
    traj = rollout(old, batch=batch)
    masks = sample_elbo_masks(batch, 8, n, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the old policy on the same masks as the policy
        ell_old = elbo_terms(old, traj.prompts, traj.responses, masks)
    return model, traj, masks, ell_old


def test_bgpo_terms_match_naive():
    model, traj, masks, ell_old = elbo_setup(4, old_scale=0.02)
    with torch.no_grad():
        ell = elbo_terms(model, traj.prompts, traj.responses, masks)
    terms, _ = bgpo_loss_terms(ell, ell_old, ADV)
    B, n = ell.shape
    for i in range(B):
        for j in range(n):
            d, a = (ell[i, j] - ell_old[i, j]).item(), ADV[i].item()
            g = a * (1 + d) / n if a >= 0 else a * math.exp(d) / n
            assert abs(terms[i, j].item() + g / B) < 1e-14
    loss, _ = elbo_ratio_loss(ell, ell_old, ADV)
    want = -sum(ADV[i].item() * math.exp((ell[i] - ell_old[i]).mean().item())
                for i in range(B)) / B
    assert abs(loss.item() - want) < 1e-12


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_p5_bgpo_on_policy_equals_exp_of_mean(clip_eps):
    """P5: on-policy (every d_j = 0) the BGPO bound and the exp-of-mean objective agree in value and
    in gradient, for A > 0, A < 0 and A = 0; per-sample accumulation gives the same .grad; the clip
    is inert."""
    model, traj, masks, ell_old = elbo_setup(4)
    ell = elbo_terms(model, traj.prompts, traj.responses, masks)
    terms, _ = bgpo_loss_terms(ell, ell_old, ADV, clip_eps=clip_eps)
    base, _ = elbo_ratio_loss(ell, ell_old, ADV)
    torch.testing.assert_close(terms.sum(), base, rtol=1e-8, atol=0)
    g_base = grads(base, model)
    assert_grads_close(grads(terms.sum(), model), g_base)
    total, _ = bgpo_accumulate(
        lambda j: elbo_terms(model, traj.prompts, traj.responses, masks[:, j:j + 1])[:, 0],
        ell_old, ADV, clip_eps=clip_eps)
    torch.testing.assert_close(total, base.detach(), rtol=1e-8, atol=0)
    assert_grads_close([p.grad for p in model.parameters()], g_base)
    # on-policy the old values may come from the graph pass, detached (docs/math.md §5.4)
    model.zero_grad()
    total, stats = bgpo_accumulate(
        lambda j: elbo_terms(model, traj.prompts, traj.responses, masks[:, j:j + 1])[:, 0],
        None, ADV, n_mc=4, clip_eps=clip_eps)
    torch.testing.assert_close(total, base.detach(), rtol=1e-8, atol=0)
    assert_grads_close([p.grad for p in model.parameters()], g_base)
    assert stats["logratio_mean"] == 0


def test_p6_bgpo_accumulated_gradient_and_lower_bound_off_policy():
    """P6: off-policy, the per-sample accumulated gradient == the gradient of the summed bound, and
    the bound R̂_lb = Σ_j g_j ≤ R̂ = A·exp(mean_j d_j) for every sequence (both signs of A)."""
    model, traj, masks, ell_old = elbo_setup(4, old_scale=0.03)
    ell = elbo_terms(model, traj.prompts, traj.responses, masks)
    terms, _ = bgpo_loss_terms(ell, ell_old, ADV)
    g_sum = grads(terms.sum(), model)
    total, _ = bgpo_accumulate(
        lambda j: elbo_terms(model, traj.prompts, traj.responses, masks[:, j:j + 1])[:, 0],
        ell_old, ADV)
    torch.testing.assert_close(total, terms.sum().detach(), rtol=1e-12, atol=0)
    assert_grads_close([p.grad for p in model.parameters()], g_sum, rtol=1e-10)
    B = ell.shape[0]
    bound = -B * terms.detach().sum(1)  # (B,) R̂_lb per sequence
    exact = ADV * torch.exp((ell - ell_old).detach().mean(1))  # (B,) R̂
    assert (ell - ell_old).abs().min() > 1e-4  # genuinely off-policy
    assert (bound <= exact + 1e-12).all() and (bound < exact - 1e-8).sum() >= 4


# both signs and zero; with elbo_setup(4, old_scale=0.03, batch=8) and ε = 0.1 the ratios
# exp(mean_j d_j) fall below, inside and above [1 − ε, 1 + ε] for responses of either sign
ADV8 = torch.tensor([1.3, 0.8, -0.7, -2.0, -0.5, 0.0, 0.6, -1.1], dtype=torch.float64)


@pytest.mark.parametrize("clip_eps", [None, 0.1])
@pytest.mark.parametrize("on_policy", [True, False])
def test_vrpo_two_pass_equals_one_graph(on_policy, clip_eps):
    """The exp-of-mean objective in two passes (mean_j d_j without grad, then one sample's graph at
    a time) has the loss value and the gradient of the one-graph `elbo_ratio_loss`, for A > 0,
    A < 0 and A = 0; off-policy the clip binds for responses of both signs and not for others."""
    model, traj, masks, ell_old = elbo_setup(4, old_scale=0.0 if on_policy else 0.03, batch=8)
    ell = elbo_terms(model, traj.prompts, traj.responses, masks)  # (B, N) one graph
    old = ell.detach() if on_policy else ell_old  # on-policy: θ_old = θ
    base, base_stats = elbo_ratio_loss(ell, old, ADV8, clip_eps=clip_eps)
    g_base = grads(base, model)
    total, stats = vrpo_two_pass(
        lambda j: elbo_terms(model, traj.prompts, traj.responses, masks[:, j:j + 1])[:, 0],
        None if on_policy else ell_old, ADV8, n_mc=4, clip_eps=clip_eps)
    torch.testing.assert_close(total, base.detach(), rtol=1e-12, atol=0)
    assert_grads_close([p.grad for p in model.parameters()], g_base, rtol=1e-10)
    assert stats["logratio_mean"] == pytest.approx(base_stats["logratio_mean"], abs=1e-14)
    ratio = torch.exp((ell - old).detach().mean(1))  # (B,)
    if on_policy:
        assert (ratio == 1).all()
        return
    # the premise: off-policy, every (sign of A, side of the clip range) pair occurs
    eps = 0.1 if clip_eps is None else clip_eps
    side = (ratio > 1 + eps).long() - (ratio < 1 - eps).long()  # (B,) −1 below, 0 inside, 1 above
    assert {(a, s) for a, s in zip(ADV8.sign().tolist(), side.tolist()) if a != 0} == \
        {(a, s) for a in (-1.0, 1.0) for s in (-1, 0, 1)}


def test_p7_bgpo_peak_memory_does_not_grow_with_n():
    """P7: peak bytes saved for backward: flat in n for BGPO (one sample's graph at a time) and for
    the exp-of-mean objective in two passes (its first pass saves nothing), growing with n for the
    exp-of-mean objective in one graph (all graphs at once)."""
    peaks = {"bgpo": {}, "two_pass": {}, "exp_mean": {}}
    for n in (1, 4, 16):
        model, traj, masks, ell_old = elbo_setup(n, batch=4)

        def ell_fn(j):
            return elbo_terms(model, traj.prompts, traj.responses, masks[:, j:j + 1])[:, 0]

        for name in peaks:
            with SavedBytes() as meter:
                if name == "bgpo":
                    bgpo_accumulate(ell_fn, ell_old, ADV[:4])
                elif name == "two_pass":  # ell_old given: the no-grad first pass runs
                    vrpo_two_pass(ell_fn, ell_old, ADV[:4])
                else:
                    # all n graphs at once
                    ell = elbo_terms(model, traj.prompts, traj.responses, masks)
                    elbo_ratio_loss(ell, ell_old, ADV[:4])[0].backward()
            peaks[name][n] = meter.peak
            model.zero_grad()
    print(f"\n[P7] peak saved-activation bytes, n = 1/4/16: BGPO {list(peaks['bgpo'].values())}, "
          f"two passes {list(peaks['two_pass'].values())}, "
          f"exp-of-mean {list(peaks['exp_mean'].values())}")
    for name in ("bgpo", "two_pass"):
        assert peaks[name][16] <= 1.05 * peaks[name][1] and peaks[name][4] <= 1.05 * peaks[name][1]
    assert (peaks["exp_mean"][16] > 8 * peaks["exp_mean"][1]
            and peaks["exp_mean"][4] > 2 * peaks["exp_mean"][1])

# %% [markdown]
# # Tutorial 3: the policy-optimisation objectives
#
# Tutorial 2 showed how to score a response of the diffusion LM. This tutorial builds the objectives
# that use those scores, each a pure function in `minidtrpo.objectives`, and checks the property
# that justifies each one:
#
# 1. GRPO's group-relative advantages;
# 2. the clipped surrogate (PPO / GRPO): on-policy its ratio is identically 1, and its gradient is
#    the REINFORCE gradient;
# 3. DPO on dTRPO's trajectory log-ratio: its loss is log 2 at θ = ref;
# 4. BGPO's bound (arXiv 2510.11683), $e^\delta \ge 1 + \delta$. On-policy it matches the
#    exp-of-mean ELBO objective in value and gradient, and it lets the Monte Carlo samples be
#    backpropagated one at a time. So does the exp-of-mean objective itself, in two passes. We
#    measure the bytes autograd keeps for backward (a proxy for activation memory) for n = 1, 4,
#    16, and say what the bound buys;
# 5. a few iterations of online RL on sudoku with the library's `rl.train_rl`.
#
# Run it as `python tutorials/03_policy_optimisation.py` (about a minute on one CPU thread) or open
# it as a notebook. `MINIDTRPO_TUTORIAL_QUICK=1` makes it a smoke test of a few seconds. The
# gradient checks run in float64.

# %%
import copy
import math
import os
import sys
import time
from pathlib import Path

# tiny model, few steps: a smoke test
QUICK = os.environ.get("MINIDTRPO_TUTORIAL_QUICK", "0") == "1"

try:  # as a script: this file's folder; as a notebook, the kernel starts in the notebook's folder
    HERE = Path(__file__).resolve().parent
except NameError:
    HERE = Path.cwd()
sys.path.insert(0, str(HERE.parent))  # so that a fresh clone runs without `pip install -e .`
OUT = HERE / "out"  # figures and checkpoints (git-ignored)
OUT.mkdir(exist_ok=True)

import matplotlib

matplotlib.use("Agg")  # write image files; never open a window
import matplotlib.pyplot as plt
import torch

from minidtrpo import generate
from minidtrpo.compare import CompareConfig
from minidtrpo.elbo import elbo_terms, sample_elbo_masks
from minidtrpo.estimators import dtrpo_logratio, sample_block_steps, trajectory_logprob
from minidtrpo.objectives import (bgpo_loss_terms, clipped_pg_loss, dpo_loss, elbo_ratio_loss,
                                  grpo_advantages)
from minidtrpo.preference import DPOConfig, PairsConfig
from minidtrpo.rl import RLConfig, train_rl
from minidtrpo.updates import bgpo_accumulate, vrpo_two_pass
from minidtrpo.folders import read_metrics
from minidtrpo.sft import SFTConfig, train_sft
from minidtrpo.train import load

torch.manual_seed(0)
print(f"quick mode: {QUICK}; figures go to {OUT}")


def grads(value, model):
    """∇_θ value as a list of tensors, one per parameter (the graph is kept for a second
    gradient)."""
    return torch.autograd.grad(value, list(model.parameters()), retain_graph=True)


def max_grad_gap(g1, g2):
    """max |g1 − g2| relative to max |g2| over all parameters."""
    gap = max((a - b).abs().max().item() for a, b in zip(g1, g2))
    return gap / max(b.abs().max().item() for b in g2)


# %% [markdown]
# The starting point of RL is a supervised (SFT) model, trained here for a short while on sudoku in
# the block layout. `model64` is a float64 copy, used for the exact checks.

# %%
if QUICK:
    SFT = dict(d_model=32, n_layers=1, batch_size=32, max_steps=10, warmup_steps=5, eval_n=8)
else:
    SFT = dict(d_model=64, n_layers=2, batch_size=64, max_steps=200, warmup_steps=30, eval_n=100)
SFT_CKPT = OUT / "03_sft" / "checkpoint.pt"
sft_metrics = train_sft(SFTConfig(task="sudoku", layout="block", seed=0, eval_every=0, device="cpu",
                                    out_dir=str(SFT_CKPT.parent), **SFT))
model, task = load(str(SFT_CKPT))
model64 = copy.deepcopy(model).double()
L = task.response_len
print(f"SFT start: test exact {sft_metrics['exact']:.2f}, reward {sft_metrics['reward']:.2f}")

# %% [markdown]
# ## 1. GRPO advantages
#
# For each prompt we sample a **group** of G responses and compare each reward with the rest of its
# group:
# $$A_i = \frac{r_i - \mathrm{mean}_{\mathrm{group}}(r)}
#   {\mathrm{std}_{\mathrm{group}}(r) + 10^{-6}} .$$
# The group mean is the baseline, so no value network is needed. A group whose rewards are all equal
# carries no signal: every A is exactly 0, and the library reports the share of such groups as
# `zero_adv_frac`. (`scale_std=False` skips the division, as d1 and Dr. GRPO do.) Below, 4
# puzzles × G = 8 rollouts at temperature 1:

# %%
G = 8
prompts = task.sample(4, "train", generator=torch.Generator().manual_seed(1))[0]
prompts = prompts.repeat_interleave(G, 0)  # (4G, P)
traj = generate(model64, prompts, temperature=1.0, generator=torch.Generator().manual_seed(2))
rewards = task.reward(traj.prompts, traj.responses).double()  # (4G,)
adv, adv_stats = grpo_advantages(rewards, G)
for g in range(4):
    r, a = rewards[g * G:(g + 1) * G], adv[g * G:(g + 1) * G]
    print(f"group {g}: rewards {[round(v, 2) for v in r.tolist()]}")
    print(f"         A       {[round(v, 2) for v in a.tolist()]}")
    if (r == r[0]).all():
        assert (a == 0).all()  # flat group: exactly zero, no gradient
    else:
        # mean 0, std 1 per group
        assert abs(a.mean().item()) < 1e-9 and abs(a.std().item() - 1) < 1e-4
        assert torch.allclose(a, (r - r.mean()) / (r.std() + 1e-6))  # the formula, by hand
print(f"stats: {adv_stats}")
flat, _ = grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.5]), 4)
print(f"a flat group and a mixed one: A = {[round(v, 3) for v in flat.tolist()]}")
assert (flat[:4] == 0).all() and flat[4:].abs().min() > 0
centred, _ = grpo_advantages(rewards, G, scale_std=False)  # d1 / Dr. GRPO: r − mean_group(r)
assert torch.allclose(centred,
                      (rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)).flatten())

# %% [markdown]
# ## 2. The clipped surrogate, on-policy
#
# With a sequence log-likelihood estimate $\log\hat\pi_\theta$ (here the exact trajectory
# log-probability of tutorial 2) and the values $\log\hat\pi_{\mathrm{old}}$ recorded when the
# responses were sampled:
# $$\rho_i = \exp(\log\hat\pi_\theta(y_i) - \log\hat\pi_{\mathrm{old}}(y_i)),\qquad
#   \mathcal L = -\frac1B\sum_i
#   \min\big(\rho_i A_i,\ \mathrm{clip}(\rho_i, 1-\epsilon, 1+\epsilon) A_i\big).$$
# On the first step after sampling, θ = θ_old, so $\rho \equiv 1$. That is inside the clip range, so
# the min takes $\rho A$, and since
# $\nabla\rho = \rho\,\nabla\log\hat\pi_\theta = \nabla\log\hat\pi_\theta$,
# $$\nabla\mathcal L = -\frac1B\sum_i A_i\,\nabla\log\hat\pi_\theta(y_i),$$
# the REINFORCE gradient with the group mean as baseline. The same argument shows that the loss
# *value* on-policy is $-\mathrm{mean}(A) = 0$, whatever the policy's quality. A policy-gradient
# loss is not a progress signal; watch the reward.
#
# The old values are free: the sampler recorded them, $\log\hat\pi_{\mathrm{old}} = \sum_i$
# `logp_at_reveal`.

# %%
logp = trajectory_logprob(model64, traj)  # (B,) with its graph
logp_old = traj.logp_at_reveal.sum(1)  # (B,) recorded by the sampler, no pass needed
loss, stats = clipped_pg_loss(logp, logp_old, adv, eps=0.2)
ratio = torch.exp(logp - logp_old)
g_clip, g_reinforce = grads(loss, model64), grads(-(adv * logp).mean(), model64)
print(f"on-policy: max |ρ − 1| = {(ratio - 1).abs().max():.1e}, clip_frac = {stats['clip_frac']}, "
      f"loss = {loss.item():.1e}; ∇ clipped loss vs REINFORCE: "
      f"relative gap {max_grad_gap(g_clip, g_reinforce):.1e}")
assert (ratio - 1).abs().max() < 1e-10 and abs(loss.item()) < 1e-9
assert max_grad_gap(g_clip, g_reinforce) < 1e-8

# %% [markdown]
# Off-policy (later optimizer steps on the same rollouts), the clip removes the incentive to move ρ
# further: with A > 0 the objective is flat for ρ > 1 + ε, and with A < 0 it is flat for ρ < 1 − ε.
# We feed `clipped_pg_loss` a range of log-ratios and differentiate:

# %%
log_rho = torch.linspace(-0.6, 0.6, 121, dtype=torch.float64, requires_grad=True)
rho = log_rho.exp().detach()
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for a in (1.0, -1.0):
    per_elem = [clipped_pg_loss(lr[None], torch.zeros(1, dtype=torch.float64), torch.tensor([a]))[0]
                for lr in log_rho]
    objective = -torch.stack(per_elem)  # min(ρA, clip(ρ)A)
    (d_obj,) = torch.autograd.grad(objective.sum(), log_rho)
    clipped_side = (rho > 1.2) if a > 0 else (rho < 0.8)
    assert (d_obj[clipped_side] == 0).all() and (d_obj[~clipped_side] != 0).all()
    ax.plot(rho.numpy(), objective.detach().numpy(), label=f"A = {a:+.0f}")
ax.axvspan(0.8, 1.2, color="0.9", label="[1 − ε, 1 + ε]")
ax.set(xlabel="ρ = π_θ / π_old", ylabel="min(ρA, clip(ρ, 1 ± ε)A)",
       title="clipped surrogate, ε = 0.2")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "03_clipped_surrogate.png", dpi=110)
plt.close(fig)
print("zero gradient exactly on the clipped side, for both signs of A; "
      f"saved {OUT / '03_clipped_surrogate.png'}")

# %% [markdown]
# ## 3. DPO with dTRPO's log-ratio
#
# Offline preference optimisation (dTRPO's experiments) needs pairs (chosen $y_w$, rejected $y_l$)
# and a frozen reference. We sample G responses per prompt from the reference and pair the best with
# the worst wherever their rewards differ. The loss is DPO's, with the trajectory log-ratio replaced
# by dTRPO's $\hat D$ (tutorial 2, one pass per response and model):
# $$\mathcal L = -\,\mathbb E\,\log\sigma\big(\beta\,[\hat D(x, y_w) - \hat D(x, y_l)]\big).$$
# At θ = ref both $\hat D$ are 0, so $\mathcal L = \log 2$. Since
# $\frac{d}{dm}[-\log\sigma(m)] = -\tfrac12$ at m = 0, the gradient there is
# $-\frac\beta2\,\mathrm{mean}\,\nabla(\hat D_w - \hat D_l)$: the first step raises the chosen
# responses' log-ratio relative to the rejected ones'.

# %%
ref64 = model64.requires_grad_(False)
policy = copy.deepcopy(ref64).requires_grad_(True)  # θ = ref
pair_prompts = task.sample(8, "train", generator=torch.Generator().manual_seed(3))[0]
pair_prompts = pair_prompts.repeat_interleave(G, 0)
pool = generate(ref64, pair_prompts, steps_per_block=2, temperature=1.0,
                generator=torch.Generator().manual_seed(4))
r = task.reward(pool.prompts, pool.responses).view(-1, G)  # (prompts, G)
keep = r.max(1).values > r.min(1).values  # prompts whose responses differ in reward
best, worst = r.argmax(1), r.argmin(1)
rows = torch.arange(len(r)) * G
chosen, rejected = pool.index((rows + best)[keep]), pool.index((rows + worst)[keep])
assert keep.any(), "every group was flat: no pair to train on"
gen = torch.Generator().manual_seed(5)
s_w, s_l = sample_block_steps(chosen, gen), sample_block_steps(rejected, gen)  # one state per block
beta = 0.5
d_w, d_l = dtrpo_logratio(policy, ref64, chosen, s_w), dtrpo_logratio(policy, ref64, rejected, s_l)
loss, stats = dpo_loss(d_w, d_l, beta)
g_dpo, g_expected = grads(loss, policy), grads(-(beta / 2) * (d_w - d_l).mean(), policy)
print(f"{int(keep.sum())} pairs; at θ = ref: loss = {loss.item():.12f}, "
      f"log 2 = {math.log(2):.12f}; "
      f"∇ vs −(β/2)·∇mean(D̂_w − D̂_l): relative gap {max_grad_gap(g_dpo, g_expected):.1e}")
assert abs(loss.item() - math.log(2)) < 1e-12 and max_grad_gap(g_dpo, g_expected) < 1e-8
grad_norm = torch.sqrt(sum((g ** 2).sum() for g in g_dpo))
with torch.no_grad():  # one small gradient step on the DPO loss: length 0.01 in parameter space
    for p, g in zip(policy.parameters(), g_dpo):
        p -= 0.01 * g / grad_norm
    d_w2 = dtrpo_logratio(policy, ref64, chosen, s_w)
    d_l2 = dtrpo_logratio(policy, ref64, rejected, s_l)
loss2, stats2 = dpo_loss(d_w2, d_l2, beta)
print(f"after one step: loss {loss2.item():.4f} (< log 2), "
      f"margin β·(D̂_w − D̂_l) = {stats2['margin']:+.4f}")
assert loss2.item() < math.log(2) and stats2["margin"] > 0

# %% [markdown]
# ## 4. BGPO: a linear bound that backpropagates one sample at a time
#
# BGPO works with the ELBO of tutorial 2. With n Monte Carlo masks shared by the policy and the old
# policy, let $d_j = \ell^{(j)}_\theta - \ell^{(j)}_{\mathrm{old}}$. The natural on-policy objective
# is the exp-of-mean ratio ("VRPO-OL"):
# $$\hat R = A\,\exp\Big(\frac1n\sum_j d_j\Big).$$
# Computed as one graph, as BGPO's baseline computes it, all n samples' graphs stay alive until
# backward, and memory grows with n. BGPO maximises a lower bound that is a **sum** of per-sample
# terms:
# $$\hat R_{\mathrm{lb}} = \sum_j g_j,\qquad g_j = \begin{cases}
#   A\,(1 + d_j)/n & A \ge 0 \quad (e^\delta \ge 1+\delta,\ \text{tangent at } 0)\\
#   A\,e^{d_j}/n & A < 0 \quad (\text{Jensen: } e^{\mathrm{mean}\,d} \le \mathrm{mean}\,e^{d})
#   \end{cases}$$
# In both cases $g$ sums to at most $\hat R$ (for A < 0, multiplying Jensen by A flips it). Each
# $g_j$ depends on one sample, so we can backpropagate sample j and free its graph before building
# sample j + 1. On-policy every $d_j = 0$, and the values and gradients of both objectives equal $A$
# and $\frac{A}{n}\sum_j \nabla \ell^{(j)}_\theta$.
#
# First the two inequalities, numerically:

# %%
delta = torch.linspace(-3, 2, 501, dtype=torch.float64)
gap = delta.exp() - (1 + delta)
d_rand = torch.randn(1000, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
jensen = d_rand.exp().mean(1) - d_rand.mean(1).exp()
print(f"min over δ of e^δ − (1 + δ) = {gap.min():.2e} at δ = {delta[gap.argmin()]:.2f}; "
      f"min over 1000 random d of mean e^d − e^(mean d) = {jensen.min():.3f}")
assert (gap >= 0).all() and gap.min() < 1e-12 and (jensen >= 0).all()
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(delta.numpy(), delta.exp().numpy(), label="e^δ (exp-of-mean ratio)")
ax.plot(delta.numpy(), (1 + delta).numpy(), "--", label="1 + δ (BGPO, A ≥ 0)")
ax.axvline(0, color="0.7", lw=0.8)
ax.set(xlabel="δ = mean_j d_j", ylabel="ratio surrogate",
       title="BGPO's tangent-line bound, equal at δ = 0")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "03_bgpo_bound.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '03_bgpo_bound.png'}")

# %% [markdown]
# Now on the model, with advantages of both signs. On-policy ($\ell_{\mathrm{old}}$ from the same
# weights) we check three things: the bound's value equals the exp-of-mean objective's; its gradient
# is the same; and `bgpo_accumulate`, which runs backward once per sample, leaves the same `.grad`.
# Off-policy, with θ moved a little, the bound lies below $\hat R$ for every sequence.

# %%
B, n = 6, 4
elbo_model = copy.deepcopy(model64).requires_grad_(True)
x, y = traj.prompts[:B], traj.responses[:B]
A = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.1], dtype=torch.float64)
masks = sample_elbo_masks(B, L, n, torch.Generator().manual_seed(7))  # (B, n, L) stratified, shared
with torch.no_grad():
    ell_old = elbo_terms(elbo_model, x, y, masks)  # (B, n) ℓ_old on the same masks
ell = elbo_terms(elbo_model, x, y, masks)  # (B, n) with graph
terms, _ = bgpo_loss_terms(ell, ell_old, A)  # Σ terms = −mean_i R̂_lb,i
base, _ = elbo_ratio_loss(ell, ell_old, A)  # −mean_i R̂_i
g_bgpo, g_base = grads(terms.sum(), elbo_model), grads(base, elbo_model)
elbo_model.zero_grad()
total, _ = bgpo_accumulate(lambda j: elbo_terms(elbo_model, x, y, masks[:, j:j + 1])[:, 0],
                           ell_old, A)
g_acc = [p.grad for p in elbo_model.parameters()]
print(f"on-policy: bound {-terms.sum().item():.10f} vs exp-of-mean {-base.item():.10f} "
      f"(= mean A = {A.mean():.10f}); gradient gap {max_grad_gap(g_bgpo, g_base):.1e}; "
      f"per-sample accumulation gap {max_grad_gap(g_acc, g_base):.1e}")
assert abs(terms.sum().item() - base.item()) < 1e-12 and abs(total.item() - base.item()) < 1e-12
assert max_grad_gap(g_bgpo, g_base) < 1e-8 and max_grad_gap(g_acc, g_base) < 1e-8

noise = torch.Generator().manual_seed(8)
with torch.no_grad():  # off-policy: θ = θ_old + N(0, 0.02²) per parameter
    for p in elbo_model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    ell_new = elbo_terms(elbo_model, x, y, masks)
    terms_off, _ = bgpo_loss_terms(ell_new, ell_old, A)
bound = -B * terms_off.sum(1)  # (B,) R̂_lb per sequence
exact = A * torch.exp((ell_new - ell_old).mean(1))  # (B,) R̂
print(f"off-policy: R̂_lb = {[round(v, 4) for v in bound.tolist()]}")
print(f"            R̂    = {[round(v, 4) for v in exact.tolist()]}")
assert (bound <= exact + 1e-12).all()

# %% [markdown]
# **The exp-of-mean objective, one sample at a time.** $\hat R$ is not a sum over samples, but its
# gradient is:
# $$\nabla \hat R = c\,\frac1n\sum_j \nabla \ell^{(j)}_\theta,\qquad
#   c = A\,e^{\mathrm{mean}_j d_j}\quad(0 \text{ where a PPO clip of } e^{\mathrm{mean}_j d_j}
#   \text{ binds}).$$
# The factor $c$ needs the n values $\ell^{(j)}_\theta$, not their graphs. `updates.vrpo_two_pass`
# computes them without grad (pass 1), then backpropagates one sample at a time the terms of
# `objectives.elbo_ratio_terms` (pass 2), like `bgpo_accumulate`. Off-policy, with a clip small
# enough to bind at this distance from θ_old (ε = 0.02), it leaves the `.grad` of the one-graph
# objective:

# %%
eps = 0.02
base_off, _ = elbo_ratio_loss(elbo_terms(elbo_model, x, y, masks), ell_old, A, clip_eps=eps)
g_one = grads(base_off, elbo_model)
elbo_model.zero_grad()
total_off, _ = vrpo_two_pass(lambda j: elbo_terms(elbo_model, x, y, masks[:, j:j + 1])[:, 0],
                             ell_old, A, clip_eps=eps)
g_two = [p.grad for p in elbo_model.parameters()]
rho = torch.exp((ell_new - ell_old).mean(1))  # (B,) the ratio of each response
binds = int(((A > 0) & (rho > 1 + eps) | (A < 0) & (rho < 1 - eps)).sum())
print(f"off-policy, clip binding for {binds} of {B} responses: loss one graph "
      f"{base_off.item():.10f}, two passes {total_off.item():.10f}; "
      f"gradient gap {max_grad_gap(g_two, g_one):.1e}")
assert abs(total_off.item() - base_off.item()) < 1e-12 and max_grad_gap(g_two, g_one) < 1e-8
assert binds > 0

# %% [markdown]
# **Memory.** `torch.autograd.graph.saved_tensors_hooks` sees every tensor that autograd saves for
# backward. We count their bytes while they are alive and keep the peak, on any device: a proxy for
# activation memory (a tensor saved twice counts twice; what autograd does not save, not at all).
# For n = 1, 4, 16 samples per response, BGPO's per-sample accumulation stays flat, and so does the
# exp-of-mean objective in two passes (its first pass saves nothing), while the exp-of-mean
# objective in one graph keeps all n graphs at once.

# %%
# a saved_tensors_hooks pair that counts bytes alive and at peak
from minidtrpo.meters import SavedBytes


mem_model = copy.deepcopy(model).requires_grad_(True)  # float32, as in training
xm, ym, Am = traj.prompts[:8], traj.responses[:8], torch.tensor([1.0, -1.0] * 4)
peaks = {"BGPO (per-sample backward)": {}, "exp-of-mean (two passes)": {},
         "exp-of-mean (all n graphs)": {}}
for n in (1, 4, 16):
    masks = sample_elbo_masks(8, L, n, torch.Generator().manual_seed(9))
    with torch.no_grad():
        ell_old = elbo_terms(mem_model, xm, ym, masks)
    for name in peaks:
        with SavedBytes() as meter:
            if name.startswith("BGPO"):
                bgpo_accumulate(lambda j: elbo_terms(mem_model, xm, ym, masks[:, j:j + 1])[:, 0],
                                ell_old, Am)
            elif name.endswith("(two passes)"):
                vrpo_two_pass(lambda j: elbo_terms(mem_model, xm, ym, masks[:, j:j + 1])[:, 0],
                              ell_old, Am)
            else:
                elbo_ratio_loss(elbo_terms(mem_model, xm, ym, masks), ell_old, Am)[0].backward()
        peaks[name][n] = meter.peak / 2**20
        mem_model.zero_grad()
for name, p in peaks.items():
    print(f"{name:28}: peak saved MB (activation proxy) for n = 1, 4, 16: "
          f"{', '.join(f'{v:.2f}' for v in p.values())}")
bg, em = peaks["BGPO (per-sample backward)"], peaks["exp-of-mean (all n graphs)"]
tp = peaks["exp-of-mean (two passes)"]
assert bg[16] <= 1.05 * bg[1] and tp[16] <= 1.05 * tp[1] and em[16] > 8 * em[1]
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, p in peaks.items():
    ax.plot(list(p), list(p.values()), "o-", label=name)
ax.set(xscale="log", xlabel="MC samples per response n", ylabel="peak MB saved for backward",
       title="saved bytes (activation proxy), 8 responses", xticks=[1, 4, 16],
       xticklabels=["1", "4", "16"])
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "03_bgpo_memory.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '03_bgpo_memory.png'}")

# %% [markdown]
# **What the bound buys.** Not memory. What it does buy:
#
# - forward rows, off-policy only. With μ optimizer steps per batch, BGPO and the one-graph
#   objective run $(1 + \mu)\,n$ rows per response (the old values' pass, then n per step); the
#   two-pass objective runs n more no-grad rows on each step after the first, $(\mu - 1)\,n$ in
#   all. On-policy (μ = 1) nothing: the rows are the same n, and the gradients are equal (above);
# - samples that do not interact. The gradient of $g_j$ depends on sample j alone, so BGPO's clip
#   acts on each sample's surrogate and removes that sample's gradient only. The exp-of-mean
#   objective has one ratio per response: its clip removes the gradient of all n samples at once,
#   and one sample with a large $d_j$ can trigger it.
#
# `bench/bench_scaling.py` measures all three against n and μ (docs/math.md §5.4).

# %% [markdown]
# ## 5. A few iterations of online RL
#
# `rl.train_rl` runs the whole loop. Each iteration samples `num_prompts` puzzles × G rollouts from
# the current policy, scores them with the task reward, computes GRPO advantages, drops flat groups,
# and takes an optimizer step. For `objective="full_trajectory"` the step uses the clipped surrogate
# on the exact trajectory log-probability (§2). For `"bgpo"` it uses the per-sample bound on the
# ELBO (§4). Each run writes `metrics.jsonl`, `curves.png` and a checkpoint to its `out_dir`, and
# evaluates greedily on the test set at the start and at the end.
#
# **Be warned:** 20 iterations (2 in quick mode) of 8 puzzles × 8 rollouts are far too few to see
# learning. The test scores before and after are printed, but differences of this size are noise,
# and so are the swings of the per-iteration reward, which is measured on different puzzles every
# iteration. What this section shows is the loop and its logged metrics (docs/math.md §5.5 defines
# each one).

# %%
ITERS = 2 if QUICK else 20
rl_common = dict(init=str(SFT_CKPT), num_prompts=4 if QUICK else 8, num_generations=G,
                 max_iters=ITERS, eval_every=0, eval_n=16 if QUICK else 200, kl_rollouts=0,
                 lr=1e-4, device="cpu", seed=0)
history = {}
for objective in ("full_trajectory", "bgpo"):
    out_dir = OUT / f"03_rl_{objective}"
    t0 = time.perf_counter()
    extra = dict(n_mc=2 if QUICK else 4) if objective == "bgpo" else {}
    train_rl(RLConfig(objective=objective, out_dir=str(out_dir), **rl_common, **extra))
    rows = read_metrics(out_dir / "metrics.jsonl")
    tests = [r for r in rows if "test_exact" in r]
    history[objective] = [r for r in rows if "reward_mean" in r]  # one row per iteration
    print(f"\n{objective}: {time.perf_counter() - t0:.0f} s")
    print(f"{'iter':>4} {'reward_mean':>11} {'exact':>6} {'zero_adv_frac':>13} {'update_s':>8}")
    for r in history[objective]:
        print(f"{r['iter']:>4} {r['reward_mean']:>11.3f} {r['exact']:>6.3f} "
              f"{r['zero_adv_frac']:>13.2f} {r['update_s']:>8.2f}")
    print(f"test exact: {tests[0]['test_exact']:.3f} at the start, "
          f"{tests[-1]['test_exact']:.3f} after {ITERS} iterations "
          f"({rl_common['eval_n']} puzzles, greedy)")
    assert len(history[objective]) == ITERS

fig, ax = plt.subplots(figsize=(5.5, 3.5))
for objective, rows in history.items():
    ax.plot([r["iter"] for r in rows], [r["reward_mean"] for r in rows], "o-", ms=3,
            label=objective)
ax.set(xlabel="iteration", ylabel="mean reward of the rollouts", ylim=(0, 1),
       title=f"{ITERS} iterations: too few to see learning")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "03_rl_reward.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '03_rl_reward.png'}")

# %% [markdown]
# To see the objectives actually learn, and compare them from the same start and seeds, run the
# head-to-head command. It trains one SFT start and then every objective from it, and writes a table
# and a figure to `runs/compare/`. Every run stops at its command's count, read from the configs:

# %%
cc = CompareConfig()
n_runs = len(cc.objectives.split(",")) * len(cc.seeds.split(","))
print(f"python -m minidtrpo compare: {n_runs} runs ({cc.objectives.count(',') + 1} objectives × "
      f"{len(cc.seeds.split(','))} seeds) from one start of {SFTConfig().max_steps} SFT steps; "
      f"each online run {RLConfig().max_iters} iterations, each DPO run {DPOConfig().epochs:g} "
      f"epochs over the pairs of {PairsConfig().num_prompts} puzzles")
print("options: python -m minidtrpo compare --help "
      "(e.g. --objectives=full_trajectory,bgpo --seeds=0 --rl_args=max_iters=40)")

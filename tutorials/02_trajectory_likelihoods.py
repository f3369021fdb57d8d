# %% [markdown]
# # Tutorial 2: what an RL objective needs from a diffusion LM
#
# Policy-gradient and preference objectives need $\log \pi_\theta(y \mid x)$, or at least the
# log-ratio $\log \pi_\theta / \pi_{\mathrm{ref}}$, for responses the model sampled. An
# autoregressive LM gives it as a sum over tokens. A masked-diffusion LM does not: a response is the
# end of a *trajectory* of unmasking steps, and many trajectories end at the same y. This tutorial
# computes and checks, on the toy sudoku model of tutorial 1:
#
# 1. the exact log-probability of the recorded trajectory (docs/math.md §4.1): its token part is
#    what TraceRL and CJ-GRPO score, the selection term $S_t$ this project's derivation;
# 2. why the position-selection term $S_t$ cancels under random remasking, and how much it does not
#    under low-confidence remasking;
# 3. dTRPO's two reductions (arXiv 2603.18806): ratio reduction, then state reduction with one step
#    per block, which is unbiased when scaled by $T_B$. We enumerate every step choice to check this
#    and measure its variance;
# 4. dTRPO's single forward pass with block attention, checked against one pass per block;
# 5. the ELBO of VRPO / BGPO as the average over decoding orders of the trajectory log-likelihood, a
#    lower bound of $\log p$;
# 6. all the estimators side by side on the same responses;
# 7. the dial between dTRPO and the exact trajectory: K of each block's $T_B$ steps, scaled by
#    $T_B/K$; its bias stays 0 while its variance falls and its cost rises with K.
#
# Run it as `python tutorials/02_trajectory_likelihoods.py` (about a minute on one CPU thread) or
# open it as a notebook. `MINIDTRPO_TUTORIAL_QUICK=1` makes it a smoke test of a few seconds. The
# checks run in float64, so "equal" means equal to about 1e-10.

# %%
import copy
import itertools
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
import torch.nn.functional as F

from minidtrpo import MaskedDiffusionTransformer, Trajectory, generate
from minidtrpo.elbo import elbo_terms, one_step_logprob, sample_elbo_masks, sample_prompt_mask
from minidtrpo.estimators import (dtrpo_logratio, dtrpo_scale, reduced_trajectory_logprob,
                                  sample_block_steps, trajectory_logprob)
from minidtrpo.meters import SavedBytes
from minidtrpo.sft import SFTConfig, model_config, train_sft
from minidtrpo.train import load

torch.manual_seed(0)
print(f"quick mode: {QUICK}; figures go to {OUT}")

# %% [markdown]
# We need a model that has learned something: a short supervised run on sudoku (block layout, as in
# tutorial 1 but smaller). The **reference** policy $\pi_{\mathrm{ref}}$ is that model in float64.
# The **policy** $\pi_\theta$ is a nearby model, the same weights plus small Gaussian noise,
# standing in for the policy after a few RL updates.

# %%
if QUICK:
    SFT = dict(d_model=32, n_layers=1, batch_size=32, max_steps=10, warmup_steps=5, eval_n=8)
else:
    SFT = dict(d_model=64, n_layers=2, batch_size=64, max_steps=200, warmup_steps=30, eval_n=100)
metrics = train_sft(SFTConfig(task="sudoku", layout="block", seed=0, eval_every=0, device="cpu",
                                out_dir=str(OUT / "02_sft"), **SFT))
ref, task = load(str(OUT / "02_sft" / "checkpoint.pt"))
ref = ref.double().eval().requires_grad_(False)  # float64: "equal" below means equal to ~1e-10
policy = copy.deepcopy(ref)
noise = torch.Generator().manual_seed(1)
with torch.no_grad():  # θ = θ_ref + N(0, 0.01²) per parameter
    for p in policy.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
P, L, b, M = task.prompt_len, task.response_len, task.block_size, task.vocab.mask_id
N_B = L // b
print(f"reference: test exact {metrics['exact']:.2f}; "
      f"P = {P}, L = {L}, b = {b}, N_B = {N_B} blocks")


def rollout(model, n, steps_per_block, remasking="low_confidence", seed=0):
    """n test puzzles decoded at temperature 1 (as RL samples them), trajectories recorded."""
    prompts = task.sample(n, "test", generator=torch.Generator().manual_seed(seed))[0]
    return generate(model, prompts, steps_per_block=steps_per_block, temperature=1.0,
                    remasking=remasking, generator=torch.Generator().manual_seed(seed))


# %% [markdown]
# ## 1. The exact trajectory log-probability
#
# The sampler of tutorial 1 turns the all-masked state $\tau_0$ into $\tau_T = y$ in $T = N_B T_B$
# steps. (The library and docs/math.md §0 count steps forward: `traj.state(t)` is the state
# *before* step t. The papers count the diffusion way, from $\tau_T$ down to $\tau_0$. The sums are
# the same.) Step t picks a set $I_t$ of positions of the current block and fills them with tokens
# drawn from $\mu_\theta$, so
# $$\log \pi_\theta(\tau \mid x) = \sum_{t=0}^{T-1}\Big[\log S_t(I_t \mid \tau_t)
#   + \sum_{i \in I_t} \log \mu_\theta(y_i \mid x, \tau_t)\Big],$$
# where $S_t$ is the probability that the sampler chose exactly the positions $I_t$, given the
# tokens drawn there. This is the chain rule (the tokens' probability times the selection's given
# them), not an independence: under low confidence the selection depends on those tokens. TraceRL
# and CJ-GRPO score the token part; the $S_t$ term is this project's derivation. Leave $S_t$
# aside for now (§2). The token part needs the model at every state $\tau_t$, which means T forward
# passes if done naively. Because the sampler recorded $\log\mu_\theta(y_i \mid x, \tau_t)$ as
# `logp_at_reveal`, the estimator, run on the sampling model, must reproduce $\sum_i$
# `logp_at_reveal` exactly (docs/math.md §6 P1). `estimators.trajectory_logprob` needs only $T_B$
# passes of [x ; y ; ỹ] in the block layout, because pass s scores within-block step s of every
# block at once (see §4).

# %%
T_B = 4
traj = rollout(ref, 6 if QUICK else 16, T_B)
T = traj.num_steps
exact_lib = trajectory_logprob(ref, traj)  # (B,)
naive, passes = torch.zeros_like(exact_lib), 0
for t in range(T):  # the naive way: one plain forward pass per state τ_t
    logp = F.log_softmax(ref(traj.state(t))[:, P:], -1)  # (B, L, V) log μ_ref(· | x, τ_t)
    tok = logp.gather(-1, traj.responses[..., None]).squeeze(-1)  # (B, L)
    naive += torch.where(traj.unmask_step == t, tok, 0.0).sum(1)  # Σ_{i∈I_t} log μ(y_i | x, τ_t)
    passes += 1
recorded = traj.logp_at_reveal.sum(1)
print(f"log π_ref(τ | x), token part, first 4 rollouts: "
      f"{[round(v, 4) for v in exact_lib[:4].tolist()]}")
print(f"|library − Σ logp_at_reveal| ≤ {(exact_lib - recorded).abs().max():.1e}, "
      f"|library − naive loop| ≤ {(exact_lib - naive).abs().max():.1e}")
print(f"cost per response: naive {passes} passes of {P + L} tokens; "
      f"library {T_B} passes of {P + 2 * L} tokens")
assert torch.allclose(exact_lib, recorded, rtol=0, atol=1e-10)
assert torch.allclose(exact_lib, naive, rtol=0, atol=1e-10)

# %% [markdown]
# ## 2. Why $S_t$ cancels under random remasking
#
# With **random remasking** the sampler reveals $k_t$ of the $m_t$ masked positions of the block
# uniformly at random, so $S_t = 1/\binom{m_t}{k_t}$ (the sampler's counts are checked against
# this, P12). This does not depend on θ, and in any ratio it cancels:
# $$\log\frac{\pi_\theta(\tau_{t+1}\mid\tau_t)}{\pi_{\mathrm{ref}}(\tau_{t+1}\mid\tau_t)}
#   = \sum_{i\in I_t}\big[\log\mu_\theta(y_i\mid x,\tau_t)
#   - \log\mu_{\mathrm{ref}}(y_i\mid x,\tau_t)\big].$$
# This is dTRPO's **ratio reduction** (claim i). With $T_B = 2$ and $b = 4$, each block's first step
# picks 2 of 4 positions ($\log S = -\log 6$) and its second step takes the remaining 2
# ($\log S = 0$).
#
# With **low-confidence remasking** the chosen positions are the most confident candidates, so $S_t$
# depends on θ and does not cancel. `trajectory_logprob(..., position_term=True)` computes it (the
# derivation is in its docstring). Below we measure how far the token-only log-ratio is from the
# full one.

# %%
traj_r = rollout(ref, 8, 2, remasking="random", seed=1)
with_s = {m: trajectory_logprob(m, traj_r, position_term=True, per_step=True)
          for m in (policy, ref)}  # (B, T)
tokens_only = {m: trajectory_logprob(m, traj_r, per_step=True) for m in (policy, ref)}
log_s = with_s[ref] - tokens_only[ref]  # (B, T) log S_t alone
print(f"random remasking, T_B = 2: log S_t of the first 4 steps = "
      f"{[round(v, 4) for v in log_s[0, :4].tolist()]}, −log C(4, 2) = {-math.log(6):.4f}")
assert torch.allclose(log_s[:, 0::2], torch.full_like(log_s[:, 0::2], -math.log(6)), atol=1e-12)
assert torch.allclose(log_s[:, 1::2], torch.zeros_like(log_s[:, 1::2]), atol=1e-12)
ratio_full = with_s[policy] - with_s[ref]
ratio_tok = tokens_only[policy] - tokens_only[ref]
print(f"per-step log-ratio with S_t vs without: "
      f"max |Δ| = {(ratio_full - ratio_tok).abs().max():.1e}")
assert torch.allclose(ratio_full, ratio_tok, rtol=0, atol=1e-10)

traj_lc = rollout(ref, 8, 2, remasking="low_confidence", seed=1)
full_lc = (trajectory_logprob(policy, traj_lc, position_term=True)
           - trajectory_logprob(ref, traj_lc, position_term=True))
tok_lc = trajectory_logprob(policy, traj_lc) - trajectory_logprob(ref, traj_lc)
print(f"low-confidence remasking, T_B = 2: mean |log-ratio with S_t − token-only| = "
      f"{(full_lc - tok_lc).abs().mean():.4f} "
      f"(mean |token-only log-ratio| = {tok_lc.abs().mean():.4f}): "
      f"the ratio reduction is an approximation here")

# %% [markdown]
# ## 3. dTRPO's state reduction: one step per block
#
# Split the exact (token-part) log-ratio by block b and within-block step s:
# $$\Delta(\tau) = \sum_{b=0}^{N_B-1}\sum_{s=0}^{T_B-1} r_{b,s},\qquad
#   r_{b,s} = \sum_{i \in I_{b,s}}\big[\log\mu_\theta(y_i \mid x, \tau_{bT_B+s})
#   - \log\mu_{\mathrm{ref}}(y_i \mid x, \tau_{bT_B+s})\big].$$
# dTRPO draws **one** step $s_b \sim U\{0, \dots, T_B-1\}$ per block, independently, and keeps only
# that state:
# $$\hat D(x, y) = c\sum_b r_{b, s_b},\qquad
#   \mathbb E_s[\hat D] = c \sum_b \frac{1}{T_B}\sum_s r_{b,s}
#   = \Delta(\tau)\quad\text{for } c = T_B .$$
# The blocks' steps are independent and $\hat D$ is a sum over blocks, so its variance is
# $T_B^2 \sum_b \mathrm{Var}_{s}(r_{b,s})$. Each block's share is the variance over s of the
# conditional mean $\mathbb E[\hat D \mid s_b = s]$. The variance is zero for $T_B = 1$, where the
# reduced trajectory *is* the trajectory. How it grows with $T_B$ depends on the $r_{b,s}$, which
# change with the trajectory: if the L token log-ratios were i.i.d. with variance $\sigma^2$ and
# $T_B$ divided b, its mean would be $(T_B - 1)\,L\,\sigma^2$ (docs/math.md §4.2, P4). (The
# paper writes c = 1 and absorbs $T_B$ into β; `scale="one"`.)
#
# The check: for $T_B = 1, 2, 4$ we enumerate all $T_B^{N_B}$ choices of $(s_0, \dots, s_{N_B-1})$.
# We compare the average of $\hat D$ over them with the exact log-ratio of §1, and its variance with
# the sum of the per-block shares. We use random remasking, so that the exact log-ratio is the full
# one (§2).

# %%
def all_step_choices(traj):
    """Every (s_0..s_{N_B−1}) with the trajectory repeated for each: (C·B) rows and steps
    (C·B, N_B)."""
    combos = torch.tensor(list(itertools.product(range(traj.steps_per_block),
                                                 repeat=traj.num_blocks)))  # (C, N_B)
    B = traj.tokens.shape[0]
    return traj.index(torch.arange(B).repeat(len(combos))), combos.repeat_interleave(B, 0), combos


variance, d_hat_tb4 = {}, None
for T_B in (1, 2, 4):
    traj_e = rollout(ref, 2 if QUICK else 4, T_B, remasking="random", seed=2)
    exact = trajectory_logprob(policy, traj_e) - trajectory_logprob(ref, traj_e)  # (B,) Δ(τ)
    big, steps, combos = all_step_choices(traj_e)
    C = len(combos)
    # (C, B) D̂ for every choice, c = T_B
    d_hat = dtrpo_logratio(policy, ref, big, steps).view(C, -1)
    variance[T_B] = d_hat.var(0, unbiased=False).mean().item()
    # E[D̂ | s_b = s] for every block b and step s: (N_B, T_B, B); its variance over s is
    # block b's share
    cond = torch.stack([torch.stack([d_hat[combos[:, blk] == s].mean(0) for s in range(T_B)])
                        for blk in range(N_B)])
    assert torch.allclose(d_hat.var(0, unbiased=False), cond.var(1, unbiased=False).sum(0),
                          rtol=0, atol=1e-9)
    print(f"T_B = {T_B}: {C:3d} choices; exact Δ = {[round(v, 4) for v in exact.tolist()]}, "
          f"mean over choices of D̂ = {[round(v, 4) for v in d_hat.mean(0).tolist()]}, "
          f"Var_s[D̂] = {variance[T_B]:.4f}")
    assert torch.allclose(d_hat.mean(0), exact, rtol=0, atol=1e-9)
    assert torch.allclose(dtrpo_logratio(policy, ref, big, steps, scale="one").view(C, -1) * T_B,
                          d_hat, atol=1e-12)
    if T_B == 4:
        d_hat_tb4, exact_tb4 = d_hat, exact
assert variance[1] < 1e-20  # one step per block: D̂ is the exact log-ratio

fig, axes = plt.subplots(1, d_hat_tb4.shape[1], figsize=(3.2 * d_hat_tb4.shape[1], 2.8),
                         squeeze=False)
for i, ax in enumerate(axes[0]):
    ax.hist(d_hat_tb4[:, i].numpy(), bins=30, color="tab:blue", alpha=0.7)
    ax.axvline(exact_tb4[i].item(), color="k", lw=1.5, label="exact Δ")
    ax.axvline(d_hat_tb4[:, i].mean().item(), color="tab:red", ls="--", lw=1.5, label="mean of D̂")
    ax.set(title=f"response {i}", xlabel="D̂ (c = T_B = 4)")
axes[0, 0].legend(fontsize=8)
fig.suptitle("dTRPO's D̂ over all 4^4 = 256 step choices: unbiased, but spread out")
fig.tight_layout()
fig.savefig(OUT / "02_dtrpo_unbiased.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '02_dtrpo_unbiased.png'}")

# %% [markdown]
# ## 4. One forward pass for all blocks (block attention)
#
# The state before step $bT_B + s_b$ has blocks < b decoded, block b partly masked
# ($\tilde y_b^{(s_b)}$) and blocks > b fully masked. In the block layout nothing attends to later
# blocks, so block b's predictions depend only on $(x, y_{<b}, \tilde y_b^{(s_b)})$. The sequence
# [x ; y ; ỹ], with every block of ỹ in its own sampled state and the attention mask of tutorial 1,
# therefore scores every block's state in **one** pass of length P + 2L, instead of $N_B$ passes of
# length P + L. In the full layout the true state also contains the masked later blocks, which
# everyone sees, so the single pass is only an approximation there. We check both on the same
# inputs.

# %%
traj_s = rollout(ref, 64 if not QUICK else 8, 4, seed=3)
steps = sample_block_steps(traj_s, torch.Generator().manual_seed(0))  # (B, N_B)
timing = {}
for single in (True, False):
    t0 = time.perf_counter()
    timing[single] = reduced_trajectory_logprob(ref, traj_s, steps, single_pass=single)  # (B,)
    timing[single, "s"] = time.perf_counter() - t0
gap = (timing[True] - timing[False]).abs().max().item()
print(f"block layout, float64: single pass vs {N_B} per-block passes: max |Δ| = {gap:.1e} "
      f"({timing[True, 's'] * 1e3:.0f} ms vs {timing[False, 's'] * 1e3:.0f} ms "
      f"for {len(steps)} responses)")
assert gap < 1e-10
ref32 = copy.deepcopy(ref).float()
gap32 = (reduced_trajectory_logprob(ref32, traj_s, steps) -
         reduced_trajectory_logprob(ref32, traj_s, steps, single_pass=False)).abs().max().item()
print(f"block layout, float32: max |Δ| = {gap32:.1e}")
assert gap32 < 1e-5

full_model = MaskedDiffusionTransformer(model_config(task, layout="full", d_model=32, n_layers=2),
                                        verbose=False).double()
with torch.no_grad():
    # an untrained stand-in with confident, non-uniform predictions
    full_model.head.weight.mul_(20.0)
full_gap = (reduced_trajectory_logprob(full_model, traj_s, steps) -
            reduced_trajectory_logprob(full_model, traj_s, steps, single_pass=False)).abs()
print(f"full layout (untrained stand-in): mean |single − per-block| = {full_gap.mean():.4f}, "
      f"max {full_gap.max():.4f}: an approximation")
assert full_gap.max() > 1e-6

# %% [markdown]
# ## 5. The ELBO: the likelihood averaged over decoding orders (VRPO, BGPO)
#
# VRPO and BGPO do not score the trajectory that was sampled. They score y through the
# masked-diffusion ELBO of tutorial 1:
# $$\mathrm{ELBO}(y) = \sum_{m=1}^{L} \mathbb E_{|S| = m}
#   \Big[\frac{1}{m}\sum_{i \in S}\log\mu_\theta(y_i \mid x, y_S)\Big].$$
# Consider a **random-order** sampler, which reveals one uniformly random masked position per step.
# Order σ has probability $P(\sigma) = \prod_t S_t = 1/L!$. At the step where m positions are still
# masked, the masked set S is a uniform m-subset and the revealed position is uniform in S, so
# averaging the trajectory log-likelihood over σ gives exactly the ELBO. By Jensen's inequality it
# then bounds the log-likelihood of y:
# $$\log p_\theta(y \mid x) = \log \sum_\sigma P(\sigma)\, p_\sigma(y)
#   \;\ge\; \sum_\sigma P(\sigma)\,\log p_\sigma(y)
#   = \mathbb E_\sigma[\log\pi_\theta(\tau_\sigma)] = \mathrm{ELBO}(y).$$
# In the block layout the orders are taken inside each block (blocks left to right), with
# $P(\sigma) = (1/b!)^{N_B}$, and the ELBO is the sum of per-block ELBOs. Block b's term depends
# only on its own order (block attention; checked below with mixed orders), so averaging over the
# $b! = 24$ orders applied to every block at once gives the same mean as all $24^{N_B}$
# combinations. The likelihood factorises too:
# $\log p(y) = \sum_b \log \frac{1}{24}\sum_{\sigma_b} p_{\sigma_b}(y_b)$.
#
# VRPO and BGPO estimate the ELBO by Monte Carlo (docs/math.md §4.3): n masks, one per sampled
# size $m_j$ (VRPO's allocation; spreading the sizes evenly, stratification, is this project's),
# $\ell^{(j)} = \frac{1}{m_j}\sum_{i\in S_j}\log\mu_\theta(y_i \mid x, y^{(j)})$, and
# $\hat B = \frac1n\sum_j \ell^{(j)}$. Then $L\hat B$ is an unbiased estimate of the ELBO. Three
# checks: the exact ELBO, computed by enumerating masks, equals the average over orders; it lies
# below $\log p$; and $L \hat B$ converges to it.

# %%
traj_o = rollout(ref, 2 if QUICK else 4, 4, seed=4)
x, y = traj_o.prompts, traj_o.responses
B = len(y)
# exact ELBO: Σ_b Σ_{k=1..b} mean over the k-subsets S of block b of
#   ℓ_S = (1/k) Σ_{i∈S} log μ(y_i | x, y_<b, y_b with S masked)
subsets = [[blk * b + j for j in S] for blk in range(N_B) for k in range(1, b + 1)
           for S in itertools.combinations(range(b), k)]
masks = torch.zeros(len(subsets), L, dtype=torch.bool)
for row, S in enumerate(subsets):
    masks[row, S] = True
sizes = masks.sum(1)  # (60,) |S| = k
ell = elbo_terms(ref, x, y, masks.expand(B, -1, -1))  # (B, 60)
elbo = sum(ell[:, (sizes == k) & (masks[:, blk * b:(blk + 1) * b].any(1))].mean(1)
           for blk in range(N_B) for k in range(1, b + 1))  # (B,)

# every order σ of the 4 positions of a block, applied to all blocks: 24 one-token-per-step
# trajectories
orders = list(itertools.permutations(range(b)))
# (24, b) step of each position
rank = torch.tensor([[order.index(j) for j in range(b)] for order in orders])
unmask_step = (torch.arange(N_B)[:, None] * b + rank[:, None, :]).flatten(1)  # (24, L)
O = len(orders)
traj_sigma = Trajectory(tokens=traj_o.tokens.repeat_interleave(O, 0),
                        unmask_step=unmask_step.repeat(B, 1),
                        logp_at_reveal=torch.zeros(B * O, L, dtype=torch.float64), prompt_len=P,
                        block_size=b, steps_per_block=b, temperature=1.0, remasking="random",
                        mask_id=M)
order_ll = trajectory_logprob(ref, traj_sigma).view(B, O)  # (B, 24) log π(τ_σ), token part
# (B·24, T) incl. log S_t
per_block = trajectory_logprob(ref, traj_sigma, position_term=True, per_step=True)
per_block = per_block.view(B, O, N_B, b).sum(-1)  # (B, 24, N_B) log P(σ_b) + log p_σb(y_b)
log_p = per_block.logsumexp(1).sum(-1)  # (B,) log p(y) of the random-order sampler
tokens_block = trajectory_logprob(ref, traj_sigma, per_step=True)  # (B·24, T)
tokens_block = tokens_block.view(B, O, N_B, b).sum(-1)  # (B, 24, N_B)
assert torch.allclose(per_block - tokens_block, torch.full_like(per_block, -math.log(24)),
                      atol=1e-12)  # P(σ_b) = 1/4!

# block b's term depends on its own order only: mix different orders across blocks and compare
# 8 random (σ_0..σ_3)
mixed = torch.randint(0, O, (8, N_B), generator=torch.Generator().manual_seed(5))
mixed_steps = (torch.arange(N_B)[:, None] * b + rank[mixed]).flatten(1)  # (8, L)
traj_mixed = Trajectory(tokens=traj_o.tokens[:1].expand(8, -1), unmask_step=mixed_steps,
                        logp_at_reveal=torch.zeros(8, L, dtype=torch.float64), prompt_len=P,
                        block_size=b, steps_per_block=b, temperature=1.0, remasking="random",
                        mask_id=M)
mixed_block = trajectory_logprob(ref, traj_mixed, per_step=True).view(8, N_B, b).sum(-1)  # (8, N_B)
assert torch.allclose(mixed_block, tokens_block[0, mixed, torch.arange(N_B)], rtol=0, atol=1e-10)

R = 50 if QUICK else 400
# (B·R, 4, L), n = 4 stratified
mc_masks = sample_elbo_masks(B * R, L, 4, torch.Generator().manual_seed(0))
with torch.no_grad():
    mc = elbo_terms(ref, x.repeat(R, 1), y.repeat(R, 1), mc_masks, normalize=False)  # (B·R, 4)
    mc = mc.mean(1).view(R, B)  # L·B̂
print(f"{'response':>8} {'exact ELBO':>11} {'mean over 24 orders':>20} {'log p(y)':>9} "
      f"{'log p − ELBO':>13} {'L·B̂ (n=4): mean ± s.e.':>26}")
for i in range(B):
    print(f"{i:>8} {elbo[i]:>11.4f} {order_ll[i].mean():>20.4f} {log_p[i]:>9.4f} "
          f"{log_p[i] - elbo[i]:>13.2e} {mc[:, i].mean():>10.4f} ± "
          f"{mc[:, i].std() / math.sqrt(R):.4f} ({R} draws)")
assert torch.allclose(order_ll.mean(1), elbo, rtol=0, atol=1e-10)
# Jensen (equality only if every order gives y the same probability)
assert (elbo <= log_p + 1e-10).all()
assert ((mc.mean(0) - elbo).abs() < 4 * mc.std(0) / math.sqrt(R)).all()

# %% [markdown]
# **Which orders the ELBO averages over matters for training.** In the full layout every position
# sees every other, so docs/math.md §4.3's uniform masks average over *all* $L!$ orders, including
# the many in which a later block is half revealed while an earlier one is still masked: states a
# block-by-block sampler never visits. Passing `block_size=b` to `sample_elbo_masks` and
# `elbo_terms` keeps the earlier blocks clean and the later ones masked and scores one block per
# sample: the ELBO of the block-by-block orders (its own P11 test). For BGPO on full-layout sudoku
# this one change is the difference between losing 8 points and gaining 10 at the same learning rate
# (docs/results.md, "What did not help"); `rl` and `dpo` use it by default in the full layout
# (`--elbo_masks=auto`).

# %% [markdown]
# ## 6. All the estimators on the same responses
#
# The same 8 rollouts of $\pi_{\mathrm{ref}}$ (temperature 1, low-confidence, $T_B = 4$), scored
# every way the library offers. Forward passes are counted per response and per model:
#
# - exact trajectory (§1) estimates $\log\pi(\tau)$ of the decoding order (token part), in $T_B$
#   passes of length P + 2L;
# - dTRPO (§3–4), $T_B\,\times$ reduced, estimates the same, unbiased, one random state per block,
#   in 1 pass of length P + 2L;
# - ELBO (§5), $L\,\times$ mean of $\ell^{(j)}$, estimates the random-order bound, unbiased, in n
#   passes of length P + 2L;
# - d1 one-step estimates $\sum_i \log\mu(y_i \mid x', M\ldots M)$, a mean-field guess, in 1 pass
#   of length P + L.
#
# (Functions: `trajectory_logprob`, `reduced_trajectory_logprob`, `elbo_terms`, `one_step_logprob`.)
#
# For the random estimators we draw 200 times (50 in quick mode) and print the mean ± the standard
# deviation of one draw. The log-likelihoods answer different questions. The decoding order chosen
# by a low-confidence sampler is not a random order, so the trajectory log-probability and the ELBO
# need not agree. d1's one-step value ignores the order entirely. What RL uses is the log-*ratio*
# between two nearby policies, in the second table.

# %%
traj_c = rollout(ref, 8, 4, seed=5)
xc, yc = traj_c.prompts, traj_c.responses
Bc, D = len(yc), 50 if QUICK else 200
rep = traj_c.index(torch.arange(Bc).repeat(D))  # every response D times
gen = torch.Generator().manual_seed(6)
rep_steps = sample_block_steps(rep, gen)
elbo_masks = sample_elbo_masks(Bc * D, L, 4, gen)  # n = 4
prompt_masks = sample_prompt_mask(xc.repeat(D, 1), 0.15, gen)


def scores(model):
    """Per response: each estimator's value, (D, Bc) for the random ones."""
    with torch.no_grad():
        return {"exact trajectory": trajectory_logprob(model, traj_c),
                "dTRPO (c = T_B)": traj_c.steps_per_block
                * reduced_trajectory_logprob(model, rep, rep_steps).view(D, Bc),
                "ELBO L·B̂ (n = 4)": elbo_terms(model, rep.prompts, rep.responses, elbo_masks,
                                              normalize=False).mean(1).view(D, Bc),
                "d1 one-step": one_step_logprob(model, rep.prompts, rep.responses,
                                                prompt_masks).view(D, Bc)}


s_ref, s_pol = scores(ref), scores(policy)


def fmt(v):
    return f"{v:8.3f}" if v.dim() == 0 else f"{v.mean():8.3f} ± {v.std():5.3f}"


for title, table in (("log-likelihood of y under π_ref", s_ref),
                     ("log-ratio log π_θ − log π_ref", {k: s_pol[k] - s_ref[k] for k in s_ref})):
    print(f"\n{title}:\n{'response':>8} " + " ".join(f"{k:>18}" for k in table))
    for i in range(Bc):
        print(f"{i:>8} " + " ".join(f"{fmt(v[i] if v.dim() == 1 else v[:, i]):>18}"
                                    for v in table.values()))

# dTRPO's mean over draws is the exact value (within Monte Carlo error): the unbiasedness of §3 on
# these rollouts
d_ratio = s_pol["dTRPO (c = T_B)"] - s_ref["dTRPO (c = T_B)"]  # (D, Bc)
exact_ratio = s_pol["exact trajectory"] - s_ref["exact trajectory"]
assert ((d_ratio.mean(0) - exact_ratio).abs() <= 4 * d_ratio.std(0) / math.sqrt(D) + 1e-9).all()
gap_orders = (s_ref["exact trajectory"] - s_ref["ELBO L·B̂ (n = 4)"].mean(0)).mean()
print(f"\nmean over responses of [decoding-order log-prob − ELBO estimate] = {gap_orders:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
panels = (("log-likelihood under π_ref", s_ref),
          ("log-ratio π_θ / π_ref", {k: s_pol[k] - s_ref[k] for k in s_ref}))
for ax, (title, table) in zip(axes, panels):
    exact_v = table["exact trajectory"]
    for name, v in table.items():
        if v.dim() == 2:  # the random estimators: mean ± std of one draw
            ax.errorbar(exact_v.numpy(), v.mean(0).numpy(), yerr=v.std(0).numpy(), fmt="o", ms=4,
                        capsize=2, label=name)
    lo, hi = exact_v.min().item(), exact_v.max().item()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = exact trajectory")
    ax.set(title=title, xlabel="exact trajectory value",
           ylabel="estimator (mean ± std of one draw)")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "02_estimators.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '02_estimators.png'}")

# %% [markdown]
# ## 7. The dial: K steps per block
#
# §1 scores all $T_B$ steps of every block; §3 one. In between, score K of them, a set $S_b$ drawn
# without replacement for each block, and scale by $c = T_B/K$ (docs/math.md §4.2):
# $$\hat D_K = \frac{T_B}{K}\sum_b \sum_{s \in S_b} r_{b,s}.$$
# Each step is in $S_b$ with probability $K/T_B$, so $\hat D_K$ is unbiased for every K; K = 1 is
# dTRPO's $\hat D$ and K = $T_B$ the exact log-ratio. Within a block, $\frac1K\sum_{s\in S_b}
# r_{b,s}$ is the mean of a sample drawn without replacement from $T_B$ values, so
# $$\mathrm{Var}[\hat D_K] = \sum_b \frac{T_B^2}{K}\,\sigma_b^2\,\frac{T_B - K}{T_B - 1},
#   \qquad \sigma_b^2 = \frac1{T_B}\sum_s (r_{b,s} - \bar r_b)^2,$$
# with the finite-population factor $(T_B-K)/(T_B-1)$ that takes it to 0 at $K = T_B$. The cost
# rises with K: all K copies of every block go into one pass of $[x ; y ; \tilde y^1 \ldots
# \tilde y^K]$, $P + (K+1)L$ tokens, which in the block layout equals K separate passes.
#
# We enumerate every choice of K-subsets for every block (random remasking again, so that the exact
# log-ratio is the full one), and measure the tokens of the one pass and the bytes autograd saves
# for its backward (`meters.SavedBytes`, a proxy for activation memory).

# %%
traj_k = rollout(ref, 2 if QUICK else 3, 4, remasking="random", seed=6)
T_Bk = traj_k.steps_per_block
exact_k = trajectory_logprob(policy, traj_k) - trajectory_logprob(ref, traj_k)  # (B,) Δ(τ)
with torch.no_grad():  # r_{b,s}: the per-step log-ratios, (B, N_B, T_B)
    r_k = (trajectory_logprob(policy, traj_k, per_step=True)
           - trajectory_logprob(ref, traj_k, per_step=True)).view(len(exact_k), N_B, T_Bk)
sigma2 = r_k.var(-1, unbiased=False)  # (B, N_B) σ_b²
policy.requires_grad_(True)  # for the cost of a backward below
dial = {}
for K in range(1, T_Bk + 1):
    subsets = [list(S) for S in itertools.combinations(range(T_Bk), K)]
    combos = torch.tensor(list(itertools.product(subsets, repeat=N_B)))  # (C, N_B, K)
    C, Bk = len(combos), len(exact_k)
    big = traj_k.index(torch.arange(Bk).repeat(C))
    with torch.no_grad():
        d_hat = dtrpo_logratio(policy, ref, big, combos.repeat_interleave(Bk, 0)).view(C, Bk)
    # Var[D̂_K] = Σ_b (T_B²/K)·σ_b²·(T_B − K)/(T_B − 1)
    formula = (T_Bk ** 2 / K * sigma2 * (T_Bk - K) / (T_Bk - 1)).sum(-1)  # (B,)
    assert torch.allclose(d_hat.mean(0), exact_k, rtol=0, atol=1e-9)  # bias 0 for every K
    assert torch.allclose(d_hat.var(0, unbiased=False), formula, rtol=0, atol=1e-9)
    steps_k = combos[:1].expand(Bk, -1, -1)  # one choice, for the cost
    with SavedBytes() as saved:  # the forward saves for backward what backward then frees
        one = reduced_trajectory_logprob(policy, traj_k, steps_k)  # (B,) one pass, K copies
        (dtrpo_scale(traj_k, "steps", K) * one).sum().backward()
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        separate = sum(reduced_trajectory_logprob(policy, traj_k, steps_k[..., k])
                       for k in range(K))
    assert torch.allclose(one.detach(), separate, rtol=0, atol=1e-10)  # == K separate passes
    dial[K] = {"bias": (d_hat.mean(0) - exact_k).abs().max().item(),
               "var": d_hat.var(0, unbiased=False).mean().item(), "tokens": P + (K + 1) * L,
               "saved_mb": saved.peak / 2 ** 20, "sets": C}
    print(f"K = {K}: {C:5d} step sets, max |bias| {dial[K]['bias']:.1e}, mean Var[D̂_K] "
          f"{dial[K]['var']:.4f} (formula {formula.mean():.4f}), one pass of "
          f"{dial[K]['tokens']} tokens, {dial[K]['saved_mb']:.2f} MB saved for backward")
policy.requires_grad_(False)
Ks = sorted(dial)
assert all(dial[a]["var"] > dial[b]["var"] for a, b in zip(Ks, Ks[1:]))  # variance falls ...
assert dial[T_Bk]["var"] < 1e-20  # ... to 0 at K = T_B, the exact trajectory
assert all(dial[a]["saved_mb"] < dial[b]["saved_mb"] for a, b in zip(Ks, Ks[1:]))  # cost rises

fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
a1.plot(Ks, [dial[k]["var"] for k in Ks], "o-", label="enumerated")
a1.plot(Ks, [dial[1]["var"] / k * (T_Bk - k) / (T_Bk - 1) for k in Ks], "k--", lw=1,
        label="Var at K = 1 · (1/K)·(T_B − K)/(T_B − 1)")
a1.set(xlabel="K, steps scored per block", ylabel="mean Var[D̂_K]", xticks=Ks,
       title=f"variance (bias 0 for every K), T_B = {T_Bk}")
a1.legend(fontsize=7)
a2.plot(Ks, [dial[k]["saved_mb"] for k in Ks], "s-", color="tab:red")
a2.set(xlabel="K, steps scored per block", ylabel="MB saved for backward", xticks=Ks,
       title="cost of the one pass, P + (K+1)·L tokens")
fig.tight_layout()
fig.savefig(OUT / "02_dial.png", dpi=110)
plt.close(fig)
print(f"saved {OUT / '02_dial.png'}")

# %% [markdown]
# ## Summary
#
# - The exact trajectory log-probability costs $T_B$ passes per response (block layout) and
#   reproduces the sampler's own numbers.
# - Under random remasking the position term $S_t$ cancels exactly. Under low-confidence remasking
#   it does not, and the printed gap shows by how much.
# - dTRPO's $\hat D$ with $c = T_B$ is unbiased for the exact token log-ratio at the cost of **one**
#   pass; its variance, $T_B^2 \sum_b \mathrm{Var}_s(r_{b,s})$, is zero at $T_B = 1$ and grew with
#   $T_B$ here.
# - The ELBO of VRPO / BGPO is the expected log-likelihood over random decoding orders, below
#   $\log p$, and is estimated without bias by the stratified Monte Carlo average.
# - Scoring K of each block's $T_B$ steps, scaled by $T_B/K$, is a dial between the two: unbiased
#   for every K, its variance falling by the finite-population formula to 0 at $K = T_B$, its one
#   pass growing by L tokens per step scored.
#
# `python -m minidtrpo estimators --help` measures bias, noise, gradient agreement and cost of every
# estimator against the exact log-ratio at a larger scale. Tutorial 3 puts these estimators into the
# RL objectives.

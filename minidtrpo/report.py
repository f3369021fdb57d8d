"""Estimator report: bias, noise, gradient direction and cost of every likelihood estimator of SPEC §4.

    python -m minidtrpo estimators --ckpt=runs/sudoku_block/checkpoint.pt   # ~1-2 CPU minutes

An RL or DPO objective for a diffusion LM never sees log π_θ(τ|x) − log π_ref(τ|x) itself: it sees an
estimate of it. This report puts the estimators side by side on one trained checkpoint and one batch of
its own trajectories, against the exact answer.

Setup:
- reference π_ref = the checkpoint; policy π_θ = the checkpoint with seeded Gaussian noise on every
  weight, p ← p + σ·rms(p)·ε, ε ~ N(0, 1), σ = `perturb` (1e-2): two nearby policies, as in one RL step.
- trajectories τ_i: the reference decodes `n_prompts` test prompts (temperature τ, low-confidence
  remasking, one token per step: T_B = b).
- target Δ_i = log π_θ(τ_i|x_i) − log π_ref(τ_i|x_i) from `estimators.trajectory_logprob` (token terms
  only, as every practical method), and its gradient g* = ∇_θ mean_i Δ_i.

What each estimator targets (so what its "bias" means):
- exact trajectory (§4.1): Δ itself, T passes; zero bias and noise by construction, the anchor.
- exact + log S_t: the true probability of the decoded trajectory under low-confidence remasking, whose
  position-selection term S_t depends on θ; its distance to Δ is what dropping S_t costs.
- dTRPO reduced, c = T_B (§4.2): the probability of the trajectory actually decoded; one sampled step
  per block, E_s[D̂] = Δ (unbiased) in one pass. Full layout: the single pass is an approximation (its
  bias is real error), the per-block variant (N_B passes) is exact.
- ELBO, n MC samples (§4.3, VRPO / BGPO): L·(B̂_θ − B̂_ref) on shared masks, B̂ per-token normalised: a
  bound on the order-marginal likelihood log p(y|x) = log Σ_orders π(τ|x), not on the decoded τ.
- one-step mean-field (§4.4, d1): a mean-field proxy of log p(y|x) from one all-masked pass.
The "bias" of the last two against Δ is partly a different target, not only an error: it is reported
anyway, because Δ is what the sampler actually did and what a trust region should bound.

Metrics (draws = independent re-draws of an estimator's randomness: s_b, ELBO masks, prompt mask):
  bias     = mean_i (mean_draws[estimate_i] − Δ_i), ± its standard error sqrt(Σ_i var_i / K) / B
  std      = mean_i std_draws[estimate_i]                  (the estimator's own noise per trajectory)
  corr     = Pearson correlation of one draw's estimates with Δ across trajectories, averaged over draws
  grad cos = cos(∇_θ mean_i estimate_i of one draw, g*), averaged over `grad_draws` draws
  passes   = forward rows per response per model × tokens per row (counted by a forward hook)
  fwd ms / fwd+bwd ms = median wall time of one draw on the batch (policy and reference; + backward)
  saved MB = peak bytes autograd saves for backward (saved_tensors_hooks) during one gradient draw

Departures / choices:
1. The perturbation is random noise, not an RL step: the report is about estimators, not about a
   particular update direction.
2. Estimates are taken at the rollout temperature (`traj.logp_temperature`), as the sampler records them.
3. Deterministic estimators (exact) are evaluated once: their std is 0 by construction.

Shapes: B trajectories, K draws, L response length.
"""

import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm import tqdm

from .config import arg, parse, pick_device, write_json
from .estimators import (dtrpo_logratio, elbo_terms, one_step_logprob, sample_block_steps, sample_elbo_masks,
                         sample_prompt_mask, trajectory_logprob)
from .sampling import generate
from .training import load


@dataclass
class ReportConfig:
    """Bias, noise, gradient cosine and cost of each likelihood estimator on one checkpoint (SPEC §4)."""
    ckpt: str = arg("runs/sudoku_block/checkpoint.pt", "checkpoint: the reference policy (block or full layout)")
    n_prompts: int = arg(64, "trajectories B: test prompts decoded once by the reference")
    temperature: float = arg(1.0, "rollout temperature τ (> 0 for a sampled trajectory)")
    draws: int = arg(16, "K: independent draws of each random estimator (for bias and std)")
    grad_draws: int = arg(3, "draws whose gradient is compared with the exact one")
    perturb: float = arg(1e-2, "σ: policy = reference + σ·rms(p)·N(0, 1) on every weight tensor p")
    prompt_mask_p: float = arg(0.15, "one-step estimator: probability of masking each prompt token (d1)")
    seed: int = arg(0, "seed of prompts, rollouts, perturbation and estimator draws")
    out_dir: str = arg("runs/estimators", "folder for estimators.md, estimators.json and estimators.png")
    device: str = arg("auto", "auto | cpu | cuda | mps")
    threads: int = arg(1, "CPU intra-op threads while the report runs (0: torch's default); on a busy shared "
                          "CPU one thread is the fastest and keeps the timings comparable")


# ----------------------------------------------------------------------------------------------------
# The estimators, each as a log-ratio estimate (B,) with the gradient through the policy only


@dataclass
class Estimator:
    name: str
    targets: str  # what its expectation is: "decoded τ" or "log p(y|x)"
    fn: Callable  # (policy, ref, traj, generator) -> (B,) estimate of Δ
    random: bool  # False: one evaluation is exact, no draws needed


def exact(position_term=False):
    def fn(policy, ref, traj, gen):
        with torch.no_grad():
            ref_logp = trajectory_logprob(ref, traj, position_term=position_term)
        # Δ = log π_θ(τ|x) − log π_ref(τ|x), T states scored exactly
        return trajectory_logprob(policy, traj, position_term=position_term) - ref_logp
    return fn


def dtrpo(single_pass=True):
    # D̂ = T_B · Σ_b [log μ_θ − log μ_ref] at one sampled step s_b per block; E_s[D̂] = Δ
    return lambda policy, ref, traj, gen: dtrpo_logratio(policy, ref, traj, sample_block_steps(traj, gen),
                                                         "steps", single_pass=single_pass)


def elbo(n_mc):
    def fn(policy, ref, traj, gen):
        B, L = traj.responses.shape
        masks = sample_elbo_masks(B, L, n_mc, gen, device=traj.tokens.device)  # (B, N, L) shared by both models
        tau = traj.logp_temperature
        with torch.no_grad():
            ell_ref = elbo_terms(ref, traj.prompts, traj.responses, masks, temperature=tau)  # (B, N)
        ell = elbo_terms(policy, traj.prompts, traj.responses, masks, temperature=tau)  # (B, N)
        # L·(B̂_θ − B̂_ref), B̂ = (1/n) Σ_j ℓ^{(j)} per token: the per-sequence ELBO log-ratio
        return L * (ell - ell_ref).mean(1)
    return fn


def one_step(p):
    def fn(policy, ref, traj, gen):
        prompt_mask = sample_prompt_mask(traj.prompts, p, gen)  # (B, P) the same x' for both models
        tau = traj.logp_temperature
        with torch.no_grad():
            ref_logp = one_step_logprob(ref, traj.prompts, traj.responses, prompt_mask, temperature=tau)
        # Σ_i [log μ_θ(y_i | x', M…M) − log μ_ref(y_i | x', M…M)]
        return one_step_logprob(policy, traj.prompts, traj.responses, prompt_mask, temperature=tau) - ref_logp
    return fn


def estimators_for(layout: str, temperature: float, prompt_mask_p: float) -> list[Estimator]:
    rows = [Estimator("exact trajectory", "decoded τ", exact(), False)]
    if temperature > 0:  # S_t is a probability only for a sampled rollout
        rows.append(Estimator("exact + log S_t", "decoded τ with S_t", exact(position_term=True), False))
    if layout == "block":  # single pass == per-block passes here (P3): one row
        rows.append(Estimator("dTRPO c=T_B", "decoded τ", dtrpo(), True))
    else:
        rows.append(Estimator("dTRPO c=T_B, 1 pass", "decoded τ (approx.)", dtrpo(True), True))
        rows.append(Estimator("dTRPO c=T_B, N_B passes", "decoded τ", dtrpo(False), True))
    rows += [Estimator(f"ELBO n={n}", "log p(y|x) bound", elbo(n), True) for n in (1, 4, 16)]
    rows.append(Estimator(f"one-step p={prompt_mask_p:g}", "log p(y|x) mean-field", one_step(prompt_mask_p), True))
    return rows


# ----------------------------------------------------------------------------------------------------
# Measurement plumbing


class SavedBytes:
    """saved_tensors_hooks that track the bytes autograd keeps for backward, alive and at peak."""

    def __init__(self):
        self.alive = self.peak = 0

    def pack(self, t):
        return _Handle(t, self)

    @staticmethod
    def unpack(handle):
        return handle.t


class _Handle:
    def __init__(self, t, meter):
        self.t, self.meter, self.nbytes = t, meter, t.numel() * t.element_size()
        meter.alive += self.nbytes
        meter.peak = max(meter.peak, meter.alive)

    def __del__(self):
        self.meter.alive -= self.nbytes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flat_grad(value, model) -> torch.Tensor:
    """∇_θ value as one flat vector over the model's parameters (zeros where unused)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def perturbed(model, sigma: float, generator) -> torch.nn.Module:
    """A copy of model with p ← p + σ·rms(p)·ε on every weight tensor (ε ~ N(0, 1), seeded)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():  # tied weights appear once
            eps = torch.randn(p.shape, generator=generator, device=generator.device).to(p)
            p.add_(sigma * p.pow(2).mean().sqrt() * eps)
    return other


def measure(est: Estimator, policy, ref, traj, delta, g_star, cfg, gen, bar) -> dict:
    """Draw the estimator K times (values) and grad_draws times (gradient, memory, passes) -> summary."""
    device = traj.tokens.device
    B = len(delta)
    # a deterministic estimator is still run a few times: equal values prove it, the median time is steadier
    K, G = (cfg.draws, cfg.grad_draws) if est.random else (min(3, cfg.draws), 1)
    values, fwd_s = [], []
    for _ in range(K):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            values.append(est.fn(policy, ref, traj, gen))
        _sync(device)
        fwd_s.append(time.perf_counter() - t0)
        bar.update(1)
    values = torch.stack(values).double().cpu()  # (K, B)

    rows = []  # forward rows and tokens per row, counted on the policy only
    hook = policy.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    cosines, step_s, peak = [], [], 0
    for g in range(G):
        meter = SavedBytes()
        _sync(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            grad = flat_grad(est.fn(policy, ref, traj, gen).mean(), policy)  # ∇_θ mean_i estimate_i
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        peak = max(peak, meter.peak)
        # cos(g, g*) = g·g* / (|g| |g*|)
        cosines.append((grad @ g_star / (grad.norm() * g_star.norm()).clamp(min=1e-30)).item())
        if g == 0:
            hook.remove()
        bar.update(1)

    delta = delta.double().cpu()
    mean_i = values.mean(0)  # (B,) E_draws[estimate_i]
    var_i = values.var(0) if K > 1 else torch.zeros(B, dtype=torch.float64)  # (B,)
    corr = [torch.corrcoef(torch.stack([v, delta]))[0, 1].item() for v in values]
    return {
        "name": est.name, "targets": est.targets, "draws": K,
        "bias": (mean_i - delta).mean().item(),
        "bias_se": (var_i.sum() / K).sqrt().item() / B,
        "std": var_i.sqrt().mean().item(),
        "corr": statistics.fmean(corr),
        "grad_cos": statistics.fmean(cosines), "grad_cos_draws": cosines,
        "passes_per_response": sum(r[0] for r in rows) / B, "tokens_per_pass": rows[0][1],
        "fwd_ms": 1e3 * statistics.median(fwd_s), "fwd_bwd_ms": 1e3 * statistics.median(step_s),
        "saved_mb": peak / 2**20,
        "per_trajectory": {"mean": mean_i.tolist(), "std": var_i.sqrt().tolist(), "first_draw": values[0].tolist()},
    }


# ----------------------------------------------------------------------------------------------------
# Output: markdown table, JSON, figure


def markdown(results: list[dict], setup: dict) -> str:
    lines = ["| estimator | targets | bias ± se | std | corr | grad cos | passes × tokens | fwd ms | fwd+bwd ms | saved MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['targets']} | {r['bias']:+.4f} ± {r['bias_se']:.4f} | {r['std']:.4f} | "
                     f"{r['corr']:.3f} | {r['grad_cos']:.3f} | {r['passes_per_response']:g} × {r['tokens_per_pass']} | "
                     f"{r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | {r['saved_mb']:.1f} |")
    s = setup
    lines += [
        "",
        f"Setup: `{s['ckpt']}` ({s['layout']} layout, {s['params'] / 1e6:.2f}M params), B = {s['n_prompts']} test "
        f"prompts decoded by the reference at τ = {s['temperature']:g}, low-confidence remasking, T_B = b = "
        f"{s['block_size']} (T = {s['num_steps']} steps), batch reward {s['reward']:.3f}. Policy = reference + "
        f"{s['perturb']:g}·rms·N(0,1) noise per weight tensor (seed {s['seed']}). Exact log-ratio Δ over the batch: "
        f"mean {s['delta_mean']:+.4f}, std {s['delta_std']:.4f}, mean |Δ| {s['delta_abs']:.4f}. "
        f"K = {s['draws']} draws per random estimator, {s['grad_draws']} gradient draws; {s['device']}.",
        "",
        "Notes:",
        "- Targets. *decoded τ*: the probability of the trajectory actually decoded (token terms; log S_t dropped). "
        "The exact estimator is Δ itself (bias, std 0 and grad cos 1 by construction). dTRPO with c = T_B is "
        "unbiased for it (E over the sampled step per block). *log p(y|x)*: the ELBO is a bound on, and one-step a "
        "mean-field proxy of, the order-marginal likelihood of the response; their 'bias' against Δ is partly this "
        "different target, not only an error.",
        "- *exact + log S_t* adds the θ-dependent position-selection probability of low-confidence remasking: its "
        "distance to Δ is what every practical method (all rows but this one) drops.",
        "- bias = mean_i(mean over draws − Δ_i) ± standard error; std = mean_i of the per-trajectory std over draws; "
        "corr = correlation of one draw with Δ across trajectories; grad cos = cosine of one draw's ∇_θ mean_i "
        "estimate_i with ∇_θ mean_i Δ_i, averaged over draws.",
        "- passes × tokens: forward rows per response per model (the reference costs the same again, without "
        "backward) × sequence length of each row; ms are per batch of B; saved MB = peak bytes autograd keeps "
        "for backward during one gradient draw.",
    ]
    return "\n".join(lines)


def plot(results, delta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    names = [r["name"] for r in results]
    for r in results:
        a.scatter(delta, r["per_trajectory"]["first_draw"], s=10, alpha=0.7, label=r["name"])
    lim = [min(delta), max(delta)]
    a.plot(lim, lim, "k--", lw=0.8)
    a.set(xlabel="exact log-ratio Δ", ylabel="estimate (one draw)", title="estimate vs exact, per trajectory")
    a.legend(fontsize=7)
    ypos = range(len(results))
    b.barh(ypos, [max(r["std"], 1e-6) for r in results], color="tab:orange")
    b.set(yticks=list(ypos), yticklabels=names, xscale="log", xlabel="std over draws (log)", title="noise")
    b.invert_yaxis()
    c.barh(ypos, [r["grad_cos"] for r in results], color="tab:blue")
    c.set(yticks=list(ypos), yticklabels=[], xlim=(min(0, *[r["grad_cos"] for r in results]), 1),
          xlabel="cos(∇ estimate, ∇ Δ)", title="gradient direction")
    c.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------


def run_report(cfg: ReportConfig) -> dict:
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _report(cfg)
    finally:
        torch.set_num_threads(threads)  # leave the process as it was


def _report(cfg: ReportConfig) -> dict:
    start = time.perf_counter()
    device = pick_device(cfg.device)
    print("config:", json.dumps(asdict(cfg)))
    os.makedirs(cfg.out_dir, exist_ok=True)
    ref, task = load(cfg.ckpt, device)
    ref.eval().requires_grad_(False)
    policy = perturbed(ref, cfg.perturb, torch.Generator(device).manual_seed(cfg.seed + 1)).requires_grad_(True)

    # one batch of the reference's own trajectories
    prompts, _ = task.test_set(cfg.n_prompts, seed=cfg.seed)
    traj = generate(ref, prompts.to(device), temperature=cfg.temperature, remasking="low_confidence",
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    reward = task.reward(traj.prompts.cpu(), traj.responses.cpu()).float().mean().item()

    # the target Δ_i and its gradient g* = ∇_θ mean_i Δ_i
    delta = exact()(policy, ref, traj, None)  # (B,)
    g_star = flat_grad(delta.mean(), policy)
    delta = delta.detach()

    ests = estimators_for(ref.config.layout, cfg.temperature, cfg.prompt_mask_p)
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # every estimator's draws
    total = sum(cfg.draws + cfg.grad_draws if e.random else min(3, cfg.draws) + 1 for e in ests)
    results = []
    with tqdm(total=total, desc="estimators", dynamic_ncols=True) as bar:
        for est in ests:
            bar.set_postfix_str(est.name)
            results.append(measure(est, policy, ref, traj, delta, g_star, cfg, gen, bar))

    d = delta.double().cpu()
    setup = {**asdict(cfg), "layout": ref.config.layout, "params": ref.num_params(), "device": str(device),
             "block_size": traj.block_size, "num_steps": traj.num_steps, "reward": reward,
             "delta_mean": d.mean().item(), "delta_std": d.std().item(), "delta_abs": d.abs().mean().item()}
    table = markdown(results, setup)
    print("\n" + table)
    with open(os.path.join(cfg.out_dir, "estimators.md"), "w") as f:
        f.write(table + "\n")
    plot(results, d.tolist(), os.path.join(cfg.out_dir, "estimators.png"))
    setup["seconds"] = time.perf_counter() - start
    out = {"setup": setup, "delta": d.tolist(), "estimators": results}
    write_json(out, os.path.join(cfg.out_dir, "estimators.json"))
    print(f"\nwrote {cfg.out_dir}/estimators.md, .json, .png in {setup['seconds']:.0f} s")
    return out


def cmd_estimators(argv: list[str]):
    """`python -m minidtrpo estimators [--option=value ...]`"""
    return run_report(parse(ReportConfig, argv, "estimators"))

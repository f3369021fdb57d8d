"""Estimator report: bias, noise, gradient direction and cost of every likelihood estimator of
docs/math.md §4 on one checkpoint and a batch of its own trajectories, against the exact answer
(an RL or DPO objective for a diffusion LM only ever sees such an estimate of the log-ratio).

    python -m minidtrpo estimators --ckpt=runs/sudoku_block/checkpoint.pt   # docs/results.md

Setup:
- reference π_ref = the checkpoint; policy π_θ = the checkpoint with seeded Gaussian noise on every
  weight, p ← p + σ·rms(p)·ε, ε ~ N(0, 1), σ = `perturb`: two nearby policies, as in one RL step.
- trajectories τ_i: the reference decodes `n_prompts` test prompts (temperature τ, low-confidence
  remasking, one token per step: T_B = b).
- target Δ_i = log π_θ(τ_i|x_i) − log π_ref(τ_i|x_i) from `estimators.trajectory_logprob` (token
  terms only, as every practical method), and its gradient g* = ∇_θ mean_i Δ_i.
Rows: the estimators as log-ratio estimates, listed in logratios.py. Targets (docs/math.md
§4.1–§4.4): the exact and dTRPO rows estimate the decoded τ; the ELBO and one-step rows log p(y|x),
so their "bias" against Δ is partly a different target (reported anyway: Δ is what the sampler did,
and what a trust region bounds).

Metrics: defined in the notes the report prints under its table (`markdown`); draws are independent
re-draws of an estimator's randomness (s_b, ELBO masks, prompt mask).

Departures / choices:
1. The perturbation is random noise, not an RL step: the report is about estimators, not about a
   particular update direction.
2. Estimates are taken at the rollout temperature (`traj.logp_temperature`), as the sampler records.
3. Deterministic estimators (the exact rows) are evaluated 3 times, not K: equal values show their
   std is 0, and the median time is steadier; their gradient is taken once.

Shapes: B trajectories, K draws, L response length.
"""

import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .config import Config, arg, device_arg, folder_problem, pick_device, write_json
from .logratios import Estimator, estimators_for, exact
from .meters import SavedBytes, elapsed
from .sampling import generate
from .train import load


@dataclass
class ReportConfig(Config):
    """Bias, noise, gradient cosine and cost of each likelihood estimator of docs/math.md §4."""
    ckpt: str = arg("runs/sudoku_block/checkpoint.pt",
                    "checkpoint: the reference policy (block or full layout)")
    n_prompts: int = arg(64, "trajectories B: test prompts decoded once by the reference "
                             "(correlations need 2)", ge=2)
    temperature: float = arg(1.0, "rollout temperature τ (> 0 for a sampled trajectory)", ge=0)
    draws: int = arg(8, "K: independent draws of each random estimator (for bias and std)", ge=1)
    grad_draws: int = arg(2, "draws whose gradient is compared with the exact one", ge=1)
    perturb: float = arg(1e-2, "σ: policy = reference + σ·rms(p)·N(0, 1) on every weight tensor p",
                         ge=0)
    prompt_mask_p: float = arg(
        0.15, "one-step estimator: probability of masking each prompt token (d1)", ge=0, le=1)
    seed: int = arg(0, "seed of prompts, rollouts, perturbation and estimator draws", ge=0,
                    lt=2**31)
    out_dir: str = arg(
        "runs/estimators", "folder for estimators.md, estimators.json and estimators.png",
        valid=folder_problem)
    device: str = device_arg()
    threads: int = arg(1, "CPU intra-op threads while the report runs (0: torch's default); on a "
                          "busy shared CPU one thread is the fastest and keeps the timings "
                          "comparable", ge=0)


# --------------------------------------------------------------------------------------------------
# Measurement plumbing


def flat_grad(value, model) -> torch.Tensor:
    """∇_θ value as one flat vector over the model's parameters (zeros where unused)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for p, g in zip(params, grads)])
    return flat.double()  # cosines over ~1M entries: accumulate in float64


def perturbed(model, sigma: float, generator) -> torch.nn.Module:
    """A copy of model with p ← p + σ·rms(p)·ε on every weight tensor (ε ~ N(0, 1), seeded)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():  # tied weights appear once
            eps = torch.randn(p.shape, generator=generator, device=generator.device).to(p)
            p.add_(sigma * p.pow(2).mean().sqrt() * eps)
    return other


def measure(est: Estimator, policy, ref, traj, delta, g_star, cfg, gen, bar) -> dict:
    """Draw the estimator K times (values) and grad_draws times (gradient, memory, passes)."""
    device = traj.tokens.device
    B = len(delta)
    # a deterministic estimator still runs a few times: equal values prove it, steadier median
    K, G = (cfg.draws, cfg.grad_draws) if est.random else (min(3, cfg.draws), 1)
    values, fwd_s = [], []
    for _ in range(K):
        t0 = time.perf_counter()
        with torch.no_grad():
            values.append(est.fn(policy, ref, traj, gen))
        fwd_s.append(elapsed(t0, device))
        bar.update(1)
    values = torch.stack(values).double().cpu()  # (K, B)

    rows = []  # forward rows and tokens per row, counted on the policy only
    hook = policy.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    cosines, step_s, peak = [], [], 0
    for g in range(G):
        t0 = time.perf_counter()
        with SavedBytes() as meter:
            # ∇_θ mean_i estimate_i
            grad = flat_grad(est.fn(policy, ref, traj, gen).mean(), policy)
        step_s.append(elapsed(t0, device))
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
        "bias": (mean_i - delta).mean().item(), "bias_se": (var_i.sum() / K).sqrt().item() / B,
        "max_abs_err": (mean_i - delta).abs().max().item(), "std": var_i.sqrt().mean().item(),
        "corr": statistics.fmean(corr),
        "corr_of_mean": torch.corrcoef(torch.stack([mean_i, delta]))[0, 1].item(),  # corr K-mean
        "grad_cos": statistics.fmean(cosines), "grad_cos_draws": cosines,
        "passes_per_response": sum(r[0] for r in rows) / B, "tokens_per_pass": rows[0][1],
        "fwd_ms": 1e3 * statistics.median(fwd_s), "fwd_bwd_ms": 1e3 * statistics.median(step_s),
        "saved_mb": peak / 2**20,
        "per_trajectory": {"mean": mean_i.tolist(), "std": var_i.sqrt().tolist(),
                           "first_draw": values[0].tolist()},
    }


# --------------------------------------------------------------------------------------------------
# Output: markdown table, JSON, figure


def markdown(results: list[dict], setup: dict) -> str:
    lines = ["| estimator | targets | bias ± se | std | corr | corr K-mean | grad cos | "
             "passes × tokens | fwd ms | fwd+bwd ms | saved MB |", "|---" * 11 + "|"]
    for r in results:
        targets = r["targets"].replace("|", "\\|")  # a literal | would end the markdown cell
        lines.append(f"| {r['name']} | {targets} | {r['bias']:+.4f} ± {r['bias_se']:.4f} | "
                     f"{r['std']:.4f} | {r['corr']:.3f} | {r['corr_of_mean']:.3f} | "
                     f"{r['grad_cos']:.3f} | {r['passes_per_response']:g} × "
                     f"{r['tokens_per_pass']} | {r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | "
                     f"{r['saved_mb']:.1f} |")
    s = setup
    lines += [
        "",
        f"Setup: `{s['ckpt']}` ({s['layout']} layout, {s['params'] / 1e6:.2f}M params), "
        f"B = {s['n_prompts']} test prompts decoded by the reference at τ = {s['temperature']:g}, "
        f"low-confidence remasking, T_B = b = {s['block_size']} (T = {s['num_steps']} steps), "
        f"batch reward {s['reward']:.3f}. Policy = reference + {s['perturb']:g}·rms·N(0,1) noise "
        f"per weight tensor (seed {s['seed']}). Exact log-ratio Δ over the batch: "
        f"mean {s['delta_mean']:+.4f}, std {s['delta_std']:.4f}, mean |Δ| {s['delta_abs']:.4f}. "
        f"K = {s['draws']} draws per random estimator ({min(3, s['draws'])} for the deterministic "
        f"exact rows), {s['grad_draws']} gradient draws; {s['device']}, {s['threads']} thread(s), "
        f"{s['seconds']:.0f} s to measure.",
        "",
        "Notes:",
        "- Targets. *decoded τ*: the probability of the trajectory actually decoded (token terms; "
        "log S_t dropped). The exact estimator is Δ itself (bias, std 0 and grad cos 1 by "
        "construction). dTRPO with c = T_B is unbiased for it (E over the sampled step per block), "
        "and so is the dial with K steps per block and c = T_B/K (docs/math.md §4.2, P16). "
        "*log p(y|x)*: the ELBO is a bound on, and one-step a mean-field proxy of, the "
        "order-marginal likelihood of the response; their 'bias' against Δ is partly this "
        "different target, not only an error. *visited-state ELBO*: the ELBO's per-token terms "
        "on the states the sampler visited (BGPO's default masks in the block layout, §4.3); "
        "the same ELBO under random remasking, not a bound of any sampler under low confidence.",
        "- dTRPO single pass: exact in the block layout (== one pass per block state, P3)."
        if s["layout"] == "block" else
        "- dTRPO in the full layout: the single [x ; y ; ỹ] pass hides the later, masked blocks "
        "that the true state shows, so its bias is a real error; the N_B-pass variant scores the "
        "true states and is unbiased.",
        "- bias = mean_i(mean over draws − Δ_i) ± standard error; std = mean_i of the "
        "per-trajectory std over draws; corr = correlation of one draw with Δ across trajectories, "
        "corr K-mean = the same for the mean of the K draws (noise averaged out: it tends to 1 for "
        "an estimator of Δ, to the correlation of its own target with Δ otherwise); grad cos = "
        "cosine of one draw's ∇_θ mean_i estimate_i with ∇_θ mean_i Δ_i, averaged over draws.",
        *[f"- *exact + log S_t* adds the θ-dependent position-selection term log S_t of "
          f"low-confidence remasking, which every other row (and every practical method) drops: "
          f"here it moves the log-ratio by {r['bias']:+.3f} on average and by up to "
          f"{r['max_abs_err']:.2f} nats on one trajectory (max |Δ| = {s['delta_absmax']:.3f})."
          for r in results if r["name"] == "exact + log S_t"],
        "- passes × tokens: forward rows per response per model (the reference costs the same "
        "again, without backward) × sequence length of each row; ms are per batch of B; saved MB "
        "= peak bytes autograd keeps for backward during one gradient draw, a proxy for "
        "activation memory (`meters.SavedBytes`).",
    ]
    return "\n".join(lines)


def plot(results, delta, path):
    """Top: one scatter per estimator, one draw per trajectory against Δ (dashed: y = x, each panel
    on its own scale). Bottom: noise (std over draws) and gradient cosine per estimator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    fig = plt.figure(figsize=(2.3 * n, 7.5))
    grid = fig.add_gridspec(2, 2 * n, height_ratios=[1, 1.2])
    lim = [min(delta), max(delta)]
    for k, r in enumerate(results):
        ax = fig.add_subplot(grid[0, 2 * k:2 * k + 2])
        ax.scatter(delta, r["per_trajectory"]["first_draw"], s=8, alpha=0.7, color=f"C{k}")
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_title(f"{r['name']}\ncorr {r['corr']:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.locator_params(axis="x", nbins=4)
        ax.set_xlabel("exact Δ", fontsize=7)
        if k == 0:
            ax.set_ylabel("estimate (one draw)", fontsize=7)
    names, ypos = [r["name"] for r in results], list(range(n))
    b = fig.add_subplot(grid[1, :n])
    stds = [r["std"] for r in results]
    # deterministic rows: drawn at a floor, labelled 0
    floor = min([x for x in stds if x > 0], default=1.0) / 10
    b.barh(ypos, [max(x, floor) for x in stds], color=[f"C{k}" for k in ypos])
    for k, x in enumerate(stds):
        b.text(max(x, floor), k, f" {x:.3g}", va="center", fontsize=7)
    b.set(yticks=ypos, yticklabels=names, xscale="log",
          xlabel="std over draws per trajectory (log)", title="estimator noise")
    b.invert_yaxis()
    c = fig.add_subplot(grid[1, n:])
    cos = [r["grad_cos"] for r in results]
    c.barh(ypos, cos, color=[f"C{k}" for k in ypos])
    for k, x in enumerate(cos):
        c.text(max(x, 0), k, f" {x:.2f}", va="center", fontsize=7)
    c.set(yticks=ypos, yticklabels=[], xlim=(min(0, *cos), 1.1),
          xlabel="cos(∇ estimate, ∇ Δ), one draw", title="gradient direction")
    c.axvline(0, color="k", lw=0.5)
    c.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    policy = perturbed(ref, cfg.perturb,
                       torch.Generator(device).manual_seed(cfg.seed + 1)).requires_grad_(True)

    # one batch of the reference's own trajectories
    prompts, _ = task.test_set(cfg.n_prompts, seed=cfg.seed)
    traj = generate(ref, prompts.to(device), temperature=cfg.temperature,
                    remasking="low_confidence",
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    reward = task.reward(traj.prompts.cpu(), traj.responses.cpu()).float().mean().item()

    # the target Δ_i and its gradient g* = ∇_θ mean_i Δ_i
    delta = exact()(policy, ref, traj, None)  # (B,)
    g_star = flat_grad(delta.mean(), policy)
    delta = delta.detach()

    ests = estimators_for(ref.config.layout, cfg.temperature, cfg.prompt_mask_p,
                          traj.steps_per_block)
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # every estimator's draws
    total = sum(cfg.draws + cfg.grad_draws if e.random else min(3, cfg.draws) + 1 for e in ests)
    results = []
    with tqdm(total=total, desc="estimators", dynamic_ncols=True, mininterval=1.0,
              disable=None) as bar:  # no bar when the output is not a terminal
        for est in ests:
            bar.set_postfix_str(est.name)
            results.append(measure(est, policy, ref, traj, delta, g_star, cfg, gen, bar))

    d = delta.double().cpu()
    setup = {**asdict(cfg), "layout": ref.config.layout, "params": ref.num_params(),
             "device": str(device), "block_size": traj.block_size, "num_steps": traj.num_steps,
             "reward": reward, "delta_mean": d.mean().item(), "delta_std": d.std().item(),
             "delta_abs": d.abs().mean().item(), "delta_absmax": d.abs().max().item()}
    setup["seconds"] = time.perf_counter() - start  # measurement time; the figure and files follow
    table = markdown(results, setup)
    print("\n" + table)
    with open(os.path.join(cfg.out_dir, "estimators.md"), "w") as f:
        f.write(table + "\n")
    plot(results, d.tolist(), os.path.join(cfg.out_dir, "estimators.png"))
    out = {"setup": setup, "delta": d.tolist(), "estimators": results}
    write_json(out, os.path.join(cfg.out_dir, "estimators.json"))
    print(f"\nwrote {cfg.out_dir}/estimators.md, .json, .png; "
          f"{time.perf_counter() - start:.0f} s in all")
    return out

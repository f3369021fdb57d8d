"""Online RL of the masked-diffusion policy with four objectives (SPEC §5.1, §5.2, §5.4).

One iteration: sample prompts, G rollouts per prompt from the current policy (LLaDA's sampler, trajectories
recorded), score them, GRPO advantages, old-policy values without grad on the draws every optimizer step
shares, then `num_iterations` optimizer steps (1 = on-policy). The objectives differ only in how they score
a response:
- full_trajectory: exact trajectory log-prob (SPEC §4.1) in the clipped surrogate: TraceRL, arXiv
  2509.06949; CJ-GRPO, arXiv 2509.23924. Sequence-level ratio by default, step-level (TraceRL) as option.
- diffu_grpo: d1's one-step mean-field log-prob with a random prompt mask (arXiv 2504.12216, SPEC §4.4).
- bgpo: BGPO's linear lower bound of the ELBO-ratio objective, backpropagated one Monte Carlo sample at a
  time so memory does not grow with n_mc (arXiv 2510.11683, SPEC §5.4).
- vrpo_ol: the exp-of-mean ELBO-ratio objective BGPO bounds, all n_mc graphs alive (BGPO's baseline, with
  VRPO's stratified coupled masks, arXiv 2505.19223).
The rollout function and the run loop at the bottom (log, evaluate, checkpoint, resume) are shared with
the offline preference runs of preference.py (dTRPO, arXiv 2603.18806).

Departures:
1. full_trajectory's old values are Σ logp_at_reveal recorded by the sampler: the old policy *is* the
   sampling policy and §4.1 reproduces those numbers exactly (P1), so the old policy costs no pass, for any
   num_iterations. (Block layout: the sampler's KV cache and the estimator's [x ; y ; ỹ] pass agree to ~1e-5;
   ρ differs from 1 by that much on-policy.)
2. Estimators score at the rollout temperature τ (μ_θ = softmax(logits/τ)), the distribution that sampled.
3. diffu_grpo draws one prompt mask per optimizer step, all up front, so old, new and reference share it
   (as d1); bgpo and vrpo_ol draw one set of ELBO masks per rollout batch, shared by all steps. With
   num_iterations > 1 each pays one no-grad pass of its estimator for the old values up front (departure 7
   for the on-policy case). d1's per-token ratio is replaced by a sequence ratio.
4. The k3 KL penalty (β) exists where the objective takes it, clipped_pg_loss (full_trajectory,
   diffu_grpo); bgpo and vrpo_ol refuse β > 0 (BGPO trains without KL).
5. Groups whose rewards are all equal (A = 0) are dropped before the update; if none is left the update is
   skipped. A constant learning rate (no schedule), AdamW, gradient clipping.
6. `nll_revealed` = −mean log μ_θ of the revealed tokens at reveal time, a cheap stand-in for entropy (it
   needs no extra pass); low-confidence decoding reveals the surest tokens first, so it is below the mean
   entropy of the predictions. `kl_ref` = mean of log π_θ(τ) − log π_init(τ) (k1, token part of §4.1) on
   the first `kl_rollouts` rollouts, an untimed diagnostic.
7. On-policy (num_iterations = 1) diffu_grpo, bgpo and vrpo_ol take the old values from the graph pass,
   detached: θ_old = θ, so they are the numbers a separate no-grad pass would give (tests check this), and
   the update costs one estimator pass less per response.
Logged metrics are defined in `METRICS`. A policy-gradient loss value is not a progress signal: ρ ≡ 1
on-policy makes it ≈ 0 by construction; watch reward and test accuracy.

Shapes: B responses in the update (prompts × G), G group size, P prompt length, L response length,
N MC samples, T decoding steps, N_B blocks.
"""

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .config import SavedBytes, arg, atomic_save, autocast, fail, pick_device, write_json
from .estimators import (ELBO_MASKS, elbo_mask_block, elbo_terms, one_step_logprob, sample_elbo_masks,
                         sample_prompt_mask, trajectory_logprob)
from .objectives import bgpo_accumulate, clipped_pg_loss, elbo_ratio_loss, grpo_advantages
from .sampling import REMASKING, Trajectory, generate
from .training import evaluate, load

OBJECTIVES = ("full_trajectory", "bgpo", "diffu_grpo", "vrpo_ol")
METRICS = {  # what each line of metrics.jsonl holds (iteration lines; evaluation lines hold test_*)
    "reward_mean / reward_std": "task reward of this iteration's rollouts",
    "exact": "fraction of rollouts fully correct (sampled at the rollout temperature)",
    "zero_adv_frac": "fraction of groups whose rewards were all equal (A = 0, dropped)",
    "clip_frac": "fraction of ratios where the clipped side of min() was taken (clipped_pg_loss)",
    "kl": "k3 KL to the initial model inside the loss (only when beta > 0)",
    "kl_ref": "k1 estimate of KL(π_θ ‖ π_init) on trajectories (departure 6)",
    "nll_revealed": "−mean log μ_θ of revealed tokens at reveal, an entropy stand-in (departure 6)",
    "rollout_s / update_s": "seconds of sampling + scoring / of old values + optimizer steps",
    "passes_per_response": "model rows run forward in the update (policy, old, reference) per response",
    "peak_saved_mb": "peak MB that autograd saved for backward during the update (activation memory, P7)",
    "rss_mb / cuda_peak_mb": "peak resident memory of the process (monotone) / peak CUDA allocation",
    "test_exact / test_reward": "greedy (temperature 0) decoding of the fixed test set",
}


@dataclass
class RLConfig:
    """Online RL from a supervised checkpoint with one of four objectives."""
    init: str = arg("runs/sft/checkpoint.pt", "checkpoint to start from; also the frozen reference of the KL")
    objective: str = arg("full_trajectory", "how a response is scored (module docstring)", OBJECTIVES)
    seed: int = arg(0, "seed of the prompt, rollout and estimator generators (one per purpose)")
    num_prompts: int = arg(16, "training prompts per iteration")
    num_generations: int = arg(8, "rollouts per prompt G (the GRPO group)")
    temperature: float = arg(1.0, "rollout temperature τ; 0 = greedy (every group would be flat)")
    remasking: str = arg("low_confidence", "which positions a sampler step reveals", REMASKING)
    steps_per_block: int = arg(0, "sampler steps per block T_B for rollouts and evaluation (0: block_size)")
    num_iterations: int = arg(1, "optimizer steps per rollout batch μ (1 = on-policy)")
    lr: float = arg(1e-4, "AdamW learning rate, constant (tune per objective: README)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "gradient norm clip (0: off)")
    clip_eps: float = arg(0.2, "PPO clip ε of the ratio (bgpo: per MC sample; inert on-policy)")
    beta: float = arg(0.0, "β of the k3 KL to the initial model (full_trajectory and diffu_grpo only)")
    scale_std: bool = arg(True, "divide advantages by the group std (false: d1 / Dr. GRPO)")
    ratio_level: str = arg("sequence", "full_trajectory: one ratio per sequence, or per step (TraceRL)",
                           ("sequence", "step"))
    aggregation: str = arg("sequence_mean", "loss aggregation (objectives.clipped_pg_loss)",
                           ("token_mean", "sequence_mean", "constant"))
    n_mc: int = arg(16, "ELBO Monte Carlo samples per response n (bgpo, vrpo_ol)")
    elbo_per_token: bool = arg(True, "ℓ^(j) per masked token as in BGPO's code (false: × L)")
    elbo_masks: str = arg("auto", "bgpo, vrpo_ol: ELBO masks uniform over the response (SPEC §4.3) or blockwise "
                          "(earlier blocks clean, later masked; auto: in the full layout; estimators departure 4)",
                          ELBO_MASKS)
    prompt_mask_p: float = arg(0.15, "diffu_grpo: probability of masking each prompt token")
    kl_rollouts: int = arg(16, "rollouts per iteration scored by the initial model for kl_ref (0: off)")
    max_iters: int = arg(1000, "stop after this many iterations")
    time_budget: float = arg(0.0, "stop after this many seconds of rollout + update (0: no limit)")
    eval_every: int = arg(10, "evaluate and checkpoint every this many iterations (0: only at the end)")
    eval_every_s: float = arg(0.0, "also evaluate each time this many more training seconds have passed")
    eval_n: int = arg(500, "fixed test problems per evaluation (greedy decoding)")
    device: str = arg("auto", "auto | cpu | cuda | mps")
    out_dir: str = arg("runs/rl", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves.png")
    resume: bool = arg(False, "continue the run saved in out_dir")


@torch.no_grad()
def rollout(model, task, prompts, *, temperature, remasking, steps_per_block, generator, chunk=1024):
    """Decode one response per prompt row (B, P) -> (Trajectory, rewards (B,), exact (B,)) on prompts' device."""
    with autocast(prompts.device):
        traj = Trajectory.cat([generate(model, prompts[i:i + chunk], steps_per_block=steps_per_block or None,
                                        temperature=temperature, remasking=remasking, generator=generator)
                               for i in range(0, len(prompts), chunk)])
    p, r = traj.prompts.cpu(), traj.responses.cpu()
    return traj, task.reward(p, r).to(prompts.device), task.exact(p, r).to(prompts.device)


# ----------------------------------------------------------------------------------------------------
# The four objectives. Each computes its old-policy (and reference) values without grad, then takes
# cfg.num_iterations optimizer steps: loss, backward, `step()`. Returns the last step's stats.


def update_full_trajectory(cfg, policy, ref, traj, adv, gen, step):
    per_step = cfg.ratio_level == "step"
    # log π_old(τ) = Σ_i logp_at_reveal_i: recorded by the sampler (P1), no pass needed (departure 1)
    logp_old = traj.logp_at_reveal.sum(1)  # (B,)
    if per_step:  # log π_old(τ_{t−1} | τ_t) = Σ_{i∈I_t} logp_at_reveal_i, placed at step t = unmask_step_i
        logp_old = torch.zeros(len(adv), traj.num_steps, device=adv.device).scatter_add(
            1, traj.unmask_step, traj.logp_at_reveal)  # (B, T)
    with torch.no_grad(), autocast(adv.device):
        logp_ref = trajectory_logprob(ref, traj, per_step=per_step) if cfg.beta > 0 else None
    for _ in range(cfg.num_iterations):
        with autocast(adv.device):  # T passes (full layout) or T_B passes of [x ; y ; ỹ] (block layout)
            logp = trajectory_logprob(policy, traj, per_step=per_step)  # (B,) or (B, T)
        loss, stats = clipped_pg_loss(logp, logp_old, adv, cfg.clip_eps, aggregation=cfg.aggregation,
                                      logp_ref=logp_ref, beta=cfg.beta)
        loss.backward()
        step()
    return stats


def update_diffu_grpo(cfg, policy, ref, traj, adv, gen, step):
    x, y, tau = traj.prompts, traj.responses, traj.logp_temperature
    # one fresh prompt mask per optimizer step, drawn up front so old, new and reference share it (d1)
    prompt_masks = [sample_prompt_mask(x, cfg.prompt_mask_p, gen) for _ in range(cfg.num_iterations)]
    with torch.no_grad(), autocast(adv.device):
        logp_old = [one_step_logprob(policy, x, y, m, temperature=tau) if cfg.num_iterations > 1 else None
                    for m in prompt_masks]  # (B,) each; on-policy: from the graph pass (departure 7)
        logp_ref = [one_step_logprob(ref, x, y, m, temperature=tau) if cfg.beta > 0 else None for m in prompt_masks]
    for k, m in enumerate(prompt_masks):
        with autocast(adv.device):  # one pass: every response token predicted from x' and an all-masked y
            logp = one_step_logprob(policy, x, y, m, temperature=tau)  # (B,)
        old = logp.detach() if logp_old[k] is None else logp_old[k]
        loss, stats = clipped_pg_loss(logp, old, adv, cfg.clip_eps, aggregation=cfg.aggregation,
                                      logp_ref=logp_ref[k], beta=cfg.beta)
        loss.backward()
        step()
    return stats


def _elbo(cfg, model, traj, masks):
    """ℓ^(j) of every response on masks (B, N, L) -> (B, N) (SPEC §4.3), at the rollout temperature."""
    with autocast(traj.tokens.device):
        return elbo_terms(model, traj.prompts, traj.responses, masks, normalize=cfg.elbo_per_token,
                          temperature=traj.logp_temperature, block_size=_elbo_block(cfg, model, traj))


def _elbo_block(cfg, model, traj):
    """block_size of the ELBO masks: None (uniform, SPEC §4.3) or the trajectory's block (blockwise)."""
    return elbo_mask_block(cfg.elbo_masks, model.config.layout, traj.block_size)


def update_bgpo(cfg, policy, ref, traj, adv, gen, step):
    B, L = traj.responses.shape
    blk = _elbo_block(cfg, policy, traj)  # None: uniform masks; b: blockwise
    masks = sample_elbo_masks(B, L, cfg.n_mc, gen, adv.device, blk)  # (B, N, L) stratified, shared by all steps
    ell_old = None  # on-policy: ℓ_old^(j) = ℓ_θ^(j) detached, taken from the graph pass (departure 7)
    if cfg.num_iterations > 1:
        with torch.no_grad():
            ell_old = _elbo(cfg, policy, traj, masks)  # (B, N) ℓ_old^(j) on the same masks
    for _ in range(cfg.num_iterations):
        # R̂_lb = Σ_j g_j: sample j's graph is built, backpropagated and freed before sample j+1 (memory of one)
        _, stats = bgpo_accumulate(lambda j: _elbo(cfg, policy, traj, masks[:, j:j + 1])[:, 0], ell_old, adv,
                                   n_mc=cfg.n_mc, clip_eps=cfg.clip_eps)
        step()
    return stats


def update_vrpo_ol(cfg, policy, ref, traj, adv, gen, step):
    B, L = traj.responses.shape
    blk = _elbo_block(cfg, policy, traj)  # None: uniform masks; b: blockwise
    masks = sample_elbo_masks(B, L, cfg.n_mc, gen, adv.device, blk)  # (B, N, L)
    ell_old = None  # on-policy: ℓ_old = ℓ_θ detached (departure 7)
    if cfg.num_iterations > 1:
        with torch.no_grad():
            ell_old = _elbo(cfg, policy, traj, masks)  # (B, N)
    for _ in range(cfg.num_iterations):
        ell = _elbo(cfg, policy, traj, masks)  # (B, N): all n graphs alive until backward (memory ∝ n)
        # R̂ = A · exp((1/n) Σ_j (ℓ_θ^(j) − ℓ_old^(j)))
        loss, stats = elbo_ratio_loss(ell, ell.detach() if ell_old is None else ell_old, adv)
        loss.backward()
        step()
    return stats


UPDATES = {"full_trajectory": update_full_trajectory, "diffu_grpo": update_diffu_grpo, "bgpo": update_bgpo,
           "vrpo_ol": update_vrpo_ol}


def train_rl(cfg: RLConfig) -> dict:
    """Run online RL as configured; returns the final test metrics. Ctrl-C saves a checkpoint first."""
    if cfg.beta > 0 and cfg.objective in ("bgpo", "vrpo_ol"):
        fail(f"--beta={cfg.beta}: the KL penalty exists for full_trajectory and diffu_grpo only (departure 4)")
    device = pick_device(cfg.device)
    policy, task = load(cfg.init, device)
    ref, _ = load(cfg.init, device)  # the initial model, frozen: reference of the KL and of kl_ref
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gens = {"prompts": torch.Generator().manual_seed(cfg.seed),  # task.sample draws on the CPU
            "rollout": torch.Generator(device).manual_seed(cfg.seed + 1),  # candidates and random remasking
            "estimator": torch.Generator(device).manual_seed(cfg.seed + 2)}  # ELBO and prompt masks
    G = cfg.num_generations

    def iteration(it):
        # ---- rollouts: G responses per prompt from the current policy, scored by the task
        t0 = time.perf_counter()
        prompts, _ = task.sample(cfg.num_prompts, "train", generator=gens["prompts"])
        prompts = prompts.repeat_interleave(G, 0).to(device)  # (B, P), groups of G contiguous
        traj, rewards, exact = rollout(policy, task, prompts, temperature=cfg.temperature, remasking=cfg.remasking,
                                       steps_per_block=cfg.steps_per_block, generator=gens["rollout"])
        adv, adv_stats = grpo_advantages(rewards, G, scale_std=cfg.scale_std)  # (B,)
        keep = (adv.view(-1, G) != 0).any(1).repeat_interleave(G)  # (B,) groups that carry a signal
        row = {**adv_stats, "exact": exact.float().mean().item(), "kept": int(keep.sum()),
               "nll_revealed": -traj.logp_at_reveal.mean().item(), "rollout_s": elapsed(t0, device)}
        if cfg.kl_rollouts > 0:  # untimed diagnostic: k1 = log π_θ(τ) − log π_init(τ) on trajectories of π_θ
            with torch.no_grad(), autocast(device):
                few = traj.index(slice(0, cfg.kl_rollouts))
                row["kl_ref"] = (few.logp_at_reveal.sum(1) - trajectory_logprob(ref, few)).mean().item()
        # ---- update on the groups with signal
        if not keep.any():
            return {**row, "update_s": 0.0, "skipped": 1}
        t0, grad_norms = time.perf_counter(), []

        def step():
            grad_norms.append(clip_and_step(policy, opt, cfg.grad_clip))

        with Meters(device, policy, ref) as meters:
            stats = UPDATES[cfg.objective](cfg, policy, ref, traj.index(keep), adv[keep], gens["estimator"], step)
        return {**row, **stats, "grad_norm": grad_norms[-1], "update_s": elapsed(t0, device),
                **meters.summary(responses=int(keep.sum()))}

    return run_loop(cfg, "rl", policy=policy, ref=ref, task=task, opt=opt, generators=gens, iteration=iteration,
                    max_iters=cfg.max_iters, device=device, bar_keys=("reward_mean", "exact", "zero_adv_frac"))


# ----------------------------------------------------------------------------------------------------
# Plumbing shared with preference.py: optimizer step, meters, and the run loop (log, evaluate, checkpoint).


def clip_and_step(model, opt, grad_clip) -> float:
    """Clip the gradient norm (0: off), step, zero the gradients; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def elapsed(t0, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - t0


class Meters:
    """Cost of an update: rows through the models' forward, bytes autograd saves for backward (the
    activation memory P7 measures, on any device), the process's peak RSS and, on CUDA, peak allocation."""

    def __init__(self, device, *models):
        self.device, self.models, self.rows = device, models, 0

    def _count(self, module, args, kwargs):
        self.rows += (args[0] if args else kwargs["tokens"]).shape[0]

    def __enter__(self):
        self.hooks = [m.register_forward_pre_hook(self._count, with_kwargs=True) for m in self.models]
        self.saved = SavedBytes().__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.saved.__exit__(*exc)
        for h in self.hooks:
            h.remove()

    def summary(self, responses: int) -> dict:
        out = {"passes_per_response": self.rows / max(responses, 1), "peak_saved_mb": self.saved.peak / 2**20}
        try:
            import resource  # Unix only; ru_maxrss is in KiB on Linux
            out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except ImportError:
            pass
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run_loop(cfg, kind, *, policy, ref, task, opt, generators, iteration, max_iters, device, bar_keys=()) -> dict:
    """Call iteration(it) for it = 0, 1, ... until max_iters or cfg.time_budget; log, evaluate, checkpoint.

    iteration(it) -> the metrics of iteration it, with its timed seconds in rollout_s / update_s. Every random
    draw must come from `generators`; their states, model, reference and optimizer go into every checkpoint,
    so a run interrupted and resumed (cfg.resume) writes the same metrics as an uninterrupted one. Ctrl-C
    saves the state as of the last finished iteration (a snapshot), then re-raises.
    """
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "checkpoint.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    run = {"iter": 0, "train_seconds": 0.0, "pending_eval": True}  # pending_eval: evaluate before going on
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        policy.load_state_dict(state["model"])
        ref.load_state_dict(state["ref_model"])
        opt.load_state_dict(state["optimizer"])
        for name, g in generators.items():
            g.set_state(state["rng"][name].cpu())
        run = {k: state[k] for k in run}
        # lines written after the checkpoint are redone: drop them (and an unfinished evaluation's line)
        rows = [r for r in read_metrics(metrics_path) if r["iter"] < run["iter"] or
                (r["iter"] == run["iter"] and not (run["pending_eval"] and "test_exact" in r))]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"resumed {ckpt_path} at iteration {run['iter']}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log
    write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    print("config:", json.dumps(asdict(cfg)))
    test_prompts, test_answers = (x.to(device) for x in task.test_set(cfg.eval_n))

    def mutable():  # what changes during a run (a snapshot copies it)
        return {"model": policy.state_dict(), "optimizer": opt.state_dict(),
                "rng": {name: g.get_state() for name, g in generators.items()}, **run}

    def save(state):  # "finished" tells a caller (compare) a complete run from an interrupted one
        atomic_save({**state, "finished": done(state) and not state["pending_eval"], "kind": kind,
                     "model_config": asdict(policy.config), "task": task.name, "task_options": dict(task.options),
                     "config": asdict(cfg), "ref_model": ref.state_dict()}, ckpt_path)

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def done(state=None):
        state = run if state is None else state
        return state["iter"] >= max_iters or (cfg.time_budget > 0 and state["train_seconds"] >= cfg.time_budget)

    bar = tqdm(total=None if cfg.time_budget else max_iters, initial=run["iter"], desc=kind, dynamic_ncols=True,
               mininterval=1.0, disable=None)  # no bar when the output is not a terminal
    snapshot, metrics = None, {}
    try:
        while True:
            if run["pending_eval"]:  # temperature 0: no randomness, so an evaluation never changes the run
                with autocast(device):
                    metrics = evaluate(policy, task, test_prompts, test_answers, steps_per_block=cfg.steps_per_block)
                log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3),
                     "test_exact": metrics["exact"], "test_reward": metrics["reward"]})
                run["pending_eval"] = False
                save(mutable())
            if done():
                break
            snapshot = copy.deepcopy(mutable())  # Ctrl-C inside the iteration goes back to here
            row = iteration(run["iter"])
            before = run["train_seconds"]
            run["train_seconds"] += row.get("rollout_s", 0.0) + row["update_s"]
            run["iter"] += 1
            log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3), **row})
            every_s = cfg.eval_every_s > 0 and run["train_seconds"] // cfg.eval_every_s > before // cfg.eval_every_s
            run["pending_eval"] = bool((cfg.eval_every and run["iter"] % cfg.eval_every == 0) or every_s or done())
            snapshot = None
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in bar_keys if k in row} |
                            {"test": f"{metrics.get('exact', float('nan')):.3f}", "s": f"{run['train_seconds']:.0f}"})
    except KeyboardInterrupt:
        print(f"\ninterrupted: saving {ckpt_path} at iteration {(snapshot or run)['iter']} (continue with --resume)")
        save(snapshot if snapshot is not None else mutable())
        raise
    finally:
        bar.close()
        if os.path.exists(metrics_path):
            plot_run(metrics_path, os.path.join(cfg.out_dir, "curves.png"), bar_keys)
    if not metrics:  # resumed a finished run: report its last evaluation
        last = [r for r in read_metrics(metrics_path) if "test_exact" in r][-1]
        metrics = {"exact": last["test_exact"], "reward": last["test_reward"], "n": cfg.eval_n}
    print(json.dumps({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 1), **metrics}))
    return metrics


def plot_run(metrics_path, out_path, keys):
    """Test scores against training seconds, and each of `keys` against iterations, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    test, train = [r for r in rows if "test_exact" in r], [r for r in rows if "test_exact" not in r]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.3), squeeze=False)
    a = axes[0, 0]
    a.plot([r["train_seconds"] for r in test], [r["test_exact"] for r in test], "o-", label="exact")
    a.plot([r["train_seconds"] for r in test], [r["test_reward"] for r in test], "s--", label="reward")
    a.set(xlabel="training seconds", ylabel="test score (greedy)", ylim=(0, 1), title="test set")
    a.legend()
    for a, key in zip(axes[0, 1:], keys):
        a.plot([r["iter"] for r in train if key in r], [r[key] for r in train if key in r], lw=0.8)
        a.set(xlabel="iteration", title=key)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)

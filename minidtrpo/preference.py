"""Offline preference optimisation: DPO on pairs sampled once from a frozen reference.

docs/math.md §5.3. `make_pairs`: for each training prompt, G responses with their decoding
trajectories from the reference, scored by the task; the best and the worst form a pair when their
rewards differ. `train_dpo` minimises
    L = −E log σ( β · [ D(x, y_w) − D(x, y_l) ] )
with one of three estimates of the trajectory log-ratio D = log π_θ(τ) − log π_ref(τ):
- dtrpo: dTRPO's reduced trajectory (arXiv 2603.18806, docs/math.md §4.2): one sampled step s_b
  per block, all blocks in one [x ; y ; ỹ] pass, c = T_B (`scale=steps`, unbiased) or 1
  (`scale=one`, the paper's form); per response one policy pass with grad, none for the reference.
  steps_scored=K turns the dial: K steps per block without replacement, c = T_B/K, all K copies
  in one [x ; y ; ỹ¹ … ỹᴷ] pass (K = T_B: the exact log-ratio).
- full_trajectory: the exact token log-ratio, §4.1 (TraceRL, arXiv 2509.06949; CJ-GRPO, arXiv
  2509.23924); the full log-ratio under random remasking, where log S_t cancels.
- vrpo: VRPO's ELBO difference B̂_θ − B̂_ref on masks shared by θ and ref (antithetic sampling;
  LLaDA 1.5, arXiv 2505.19223), their counts stratified (this project's addition, §4.3).
The run loop and checkpoints are train.py's.

Departures:
1. Exact-trajectory DPO at flat memory (docs/math.md §5.3): the DPO weight ∂L/∂D first, without
   grad, then log π_θ(τ) backpropagated one within-block step at a time: N_B states alive instead
   of T, for one extra no-grad pass (exact, tested). `flat_memory=false`: plain autograd.
2. The reference costs no pass: it sampled the pair, so its log-probs at every state are the
   recorded logp_at_reveal (P1; dTRPO reads them at its sampled steps, docs/math.md §4.2). `dpo`
   checks that --init is the model that sampled the pairs (a hash of its weights).
3. dTRPO draws a fresh s_b per block, response and visit; VRPO fresh masks per visit. The log S_t
   terms are dropped: they cancel under random remasking (P2), approximately under low confidence.
4. vrpo defaults to the sequence-level ELBO (elbo_per_token=false: (L/m_j)·Σ), which estimates a
   log-likelihood like the other two estimators, so one β means the same for all three.
5. Epochs are capped (default 10, the recipe measured in docs/results.md): the pairs are fixed,
   and more passes over them are not more data; the test reward is logged at every evaluation.
6. dtrpo's single pass is used by default only where it is exact (block layout). A full-layout
   model was never trained on the [x ; y ; ỹ] layout, so there each sampled block state gets its
   own pass (N_B passes per response, still T_B times fewer than the exact trajectory).
7. Data parallel (torchrun): each process takes its share of every batch of pairs, with its own
   draws of s_b and of VRPO's masks; the exact trajectory draws nothing, so there the step is the
   one-process step (tests/test_distributed.py).

Shapes: B pairs per update, P prompt length, L response length, N MC samples, N_B blocks,
T_B steps per block.
"""

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from einops import rearrange, repeat

from .config import (BadInput, RunStopped, arg, atomic_save, autocast, device_arg,
                     file_problem, folder_problem, pick_device, read_saved)
from .elbo import ELBO_MASKS, elbo_mask_block, elbo_masks_for, elbo_terms
from .estimators import (dtrpo_scale, entropy_at_reveal, reduced_recorded_logprob,
                         reduced_trajectory_logprob, sample_block_steps, trajectory_logprob)
from .meters import Meters, elapsed
from .objectives import dpo_loss
from .sampling import Trajectory
from .parallel import data_parallel, init_parallel, no_sync, share, weigh
from .train import (DecodingConfig, RunConfig, check_steps, clip_and_step, load, rollout,
                    run_loop)

ESTIMATORS = ("dtrpo", "full_trajectory", "vrpo")
HEALTH = ("reward_accuracy", "kl_ref", "grad_norm", "clip_frac", "zero_adv_frac",
          "entropy_revealed")  # curves.png beside the test scores; docs/math.md §5.5 defines them


@dataclass
class PairsConfig(DecodingConfig):
    """Sample (best, worst) response pairs with trajectories from a frozen reference model."""
    init: str = arg("runs/sft/checkpoint.pt", "the reference model that samples the pairs")
    num_prompts: int = arg(4096, "training prompts (one pair each, where the group has "
                           "a best and a worst)", ge=1)
    num_generations: int = arg(8, "responses per prompt G; the best and the worst become a pair",
                               ge=2)
    temperature: float = arg(1.0, "sampling temperature τ (> 0: greedy pairs would be equal)",
                             gt=0)
    batch_size: int = arg(64, "prompts decoded together", ge=1)
    seed: int = arg(0, "seed of the prompts and of the sampler", ge=0, lt=2**31)
    device: str = device_arg()
    out: str = arg("runs/pairs.pt", "output file (torch.load(..., weights_only=True))",
                   valid=file_problem)


@dataclass
class DPOConfig(RunConfig):
    """Offline DPO on saved pairs with a trajectory log-ratio estimator (dTRPO, exact, or VRPO)."""
    init: str = arg("runs/sft/checkpoint.pt",
                    "the model that sampled the pairs: frozen reference, start of θ")
    pairs: str = arg("runs/pairs.pt", "pairs file written by `pairs`")
    estimator: str = arg("dtrpo", "trajectory log-ratio estimator D (module docstring)", ESTIMATORS)
    lr: float = arg(3e-5, "AdamW learning rate, constant (offline DPO drifts from "
                    "its pairs' policy: a small rate)", gt=0)
    beta: float = arg(1.0, "DPO β", gt=0)
    scale: str = arg("steps", "dtrpo: c = T_B (steps, unbiased) or 1 (one, the paper's)",
                     ("steps", "one"), group="estimator")
    steps_scored: int = arg(1, "dtrpo: K of each block's T_B steps scored, drawn without "
                            "replacement, c = T_B/K (1: dTRPO; T_B: exact; docs/math.md §4.2)",
                            ge=1, group="estimator")
    stratified_steps: bool = arg(False, "dtrpo: the K steps spread evenly over the block (one "
                                 "random offset), not a uniform K-subset", group="estimator")
    single_pass: str = arg("auto", "dtrpo: all blocks in one [x ; y ; ỹ] pass; auto = in the block "
                           "layout, where it is exact, one pass per block state in the full layout "
                           "(departure 6)", ("auto", "true", "false"), group="estimator")
    flat_memory: bool = arg(
        True, "full_trajectory: DPO weight first, then backward step by step (dep. 1)",
        group="estimator")
    n_mc: int = arg(8, "vrpo: ELBO Monte Carlo samples per response", ge=1, group="estimator")
    elbo_per_token: bool = arg(False, "vrpo: per-token ELBO (false: sequence-level, departure 4)",
                               group="estimator")
    elbo_masks: str = arg("auto", "vrpo: ELBO masks uniform, blockwise or the pair's own states "
                          "(trajectory); auto: blockwise in the full layout, trajectory in the "
                          "block layout; docs/math.md §4.3",
                          ELBO_MASKS, group="estimator")
    batch_size: int = arg(16, "pairs per optimizer step", ge=1)
    epochs: float = arg(10.0, "passes over the pairs (capped: departure 5)", gt=0)
    max_iters: int = arg(100_000, "stop after this many optimizer steps (also capped by epochs)",
                         ge=1)
    eval_every: int = arg(250, "evaluate and checkpoint every this many steps (0: at the end)",
                          ge=0, group="evaluation")
    kl_pairs: int = arg(4, "pairs per step whose trajectories (both responses) are scored for "
                        "kl_ref and entropy_revealed, untimed (0: off)", ge=0,
                        group="diagnostics")
    out_dir: str = arg(
        "runs/dpo", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves.png",
        valid=folder_problem)


def fingerprint(model) -> str:
    """A short hash of the weights: which model sampled a pairs file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def make_pairs(cfg: PairsConfig) -> dict:
    """Sample, score and save the pairs; returns a summary (also printed as one JSON line)."""
    device = pick_device(cfg.device)
    ref, task = load(cfg.init, device)
    check_steps(cfg.steps_per_block, ref)
    data_gen, sample_gen = (torch.Generator().manual_seed(cfg.seed),
                            torch.Generator(device).manual_seed(cfg.seed + 1))
    G, t0, chosen, rejected, rewards = cfg.num_generations, time.perf_counter(), [], [], []
    for start in range(0, cfg.num_prompts, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_prompts - start)
        prompts, _ = task.sample(n, "train", generator=data_gen)
        prompts = repeat(prompts, "p l -> (p g) l", g=G).to(device)  # (n·G, P), groups of G
        traj, r, _ = rollout(ref, task, prompts, temperature=cfg.temperature,
                             steps_per_block=cfg.steps_per_block, generator=sample_gen,
                             **cfg.decoding(task))
        r = rearrange(r, "(p g) -> p g", g=G)  # (n, G) one row per prompt
        differ = r.amax(1) > r.amin(1)  # groups whose rewards differ: the only informative pairs
        first = torch.arange(n, device=device) * G  # row of each group's first response
        chosen.append(traj.index((first + r.argmax(1))[differ]))  # y_w: the best of the group
        rejected.append(traj.index((first + r.argmin(1))[differ]))  # y_l: the worst
        rewards.append(torch.stack([r.amax(1), r.amin(1), r.mean(1)], 1)[differ])
    chosen, rejected, rewards = (Trajectory.cat(chosen).to("cpu"),
                                 Trajectory.cat(rejected).to("cpu"), torch.cat(rewards))
    if len(chosen.tokens) == 0:
        raise RunStopped(f"no pair: all {cfg.num_prompts} groups had equal rewards "
                         "(raise temperature or num_generations)")
    n_pairs = len(chosen.tokens)
    summary = {"pairs": n_pairs, "prompts": cfg.num_prompts, "pair_frac": n_pairs / cfg.num_prompts,
               "chosen_reward": rewards[:, 0].mean().item(),
               "rejected_reward": rewards[:, 1].mean().item(),
               "seconds": round(time.perf_counter() - t0, 2)}
    atomic_save({"chosen": chosen.to_dict(), "rejected": rejected.to_dict(),
                 "rewards": rewards.cpu(), "task": task.name, "task_options": dict(task.options),
                 "ref_fingerprint": fingerprint(ref), "config": asdict(cfg), "summary": summary},
                cfg.out)
    print(json.dumps(summary))
    return summary


# --------------------------------------------------------------------------------------------------
# The three estimators of D inside the DPO loss. `both` = chosen trajectories then rejected ones
# (2B rows). Each backpropagates the loss of one optimizer step and returns its stats.


def dpo_dtrpo(cfg, policy, ref, both, gen):
    B = len(both.tokens) // 2
    # (2B, N_B, K) fresh steps per block and response: K = 1, dTRPO's s_b ~ U{0..T_B−1}
    steps = sample_block_steps(both, gen, cfg.steps_scored, cfg.stratified_steps)
    single = cfg.single_pass == "true" or (cfg.single_pass == "auto"
                                           and policy.config.layout == "block")
    c = dtrpo_scale(both, cfg.scale, cfg.steps_scored)  # T_B/K (unbiased) or 1/K
    # log μ_ref at the sampled states = recorded logp_at_reveal: the reference decoded it (dep. 2)
    ref_logp = reduced_recorded_logprob(both, steps)  # (2B,)
    if single and policy.config.layout == "full":
        # forced single pass: the record holds the true states, so score the reference the same way
        with torch.no_grad(), autocast(both.tokens.device):
            ref_logp = reduced_trajectory_logprob(ref, both, steps, single_pass=True)  # (2B,)
    with autocast(both.tokens.device):
        # D̂ = c · Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} [log μ_θ − log μ_ref](y_i | x, y_{<b}, ỹ_b^(s))
        d = c * (reduced_trajectory_logprob(policy, both, steps, single_pass=single)
                 - ref_logp)  # (2B,)
    loss, stats = dpo_loss(d[:B], d[B:], cfg.beta)
    loss.backward()
    return {"loss": loss.item(), **stats}


def dpo_full_trajectory(cfg, policy, ref, both, gen):
    B, device = len(both.tokens) // 2, both.tokens.device
    # log π_ref(τ) = Σ_i logp_at_reveal_i: recorded when the reference sampled the pair (P1, dep. 2)
    logp_ref = both.logp_at_reveal.sum(1)  # (2B,)
    if not cfg.flat_memory:  # plain autograd: the graphs of all T states stay alive until backward
        with autocast(device):
            d = trajectory_logprob(policy, both) - logp_ref  # (2B,)
        loss, stats = dpo_loss(d[:B], d[B:], cfg.beta)
        loss.backward()
        return {"loss": loss.item(), **stats}
    with torch.no_grad(), autocast(device):
        d = trajectory_logprob(policy, both) - logp_ref  # (2B,) exact D = log π_θ(τ) − log π_ref(τ)
    loss, stats = dpo_loss(d[:B], d[B:], cfg.beta)
    # ∂L/∂D_w = −(β/B)·σ(−β·[D_w − D_l]) = −∂L/∂D_l (the DPO weight, fixed before any graph exists)
    w = -cfg.beta / B * torch.sigmoid(-cfg.beta * (d[:B] - d[B:]))  # (B,)
    dL_dD = torch.cat([w, -w])  # (2B,)
    exact_states = policy.config.layout == "block"  # the [x ; y ; ỹ] pass is the true state (P3)
    T_B = both.steps_per_block
    for s in range(T_B):
        steps = torch.full((2 * B, both.num_blocks), s, device=device)  # every block at step s
        # data parallel: steps 0..T_B−2 only accumulate, the last backward all-reduces the sum
        with no_sync(policy)() if s < T_B - 1 else contextlib.nullcontext(), autocast(device):
            # step s's share of log π_θ(τ): Σ_b Σ_{i∈I_{b,s}} log μ_θ(y_i | state before b·T_B + s)
            logp_s = reduced_trajectory_logprob(policy, both, steps,
                                                single_pass=exact_states)  # (2B,)
            # ∇L = Σ_s Σ_r (∂L/∂D_r) · ∇logp_s,r: backward frees step s's graph (N_B states, not T)
            (dL_dD * logp_s).sum().backward()
    return {"loss": loss.item(), **stats}


def dpo_vrpo(cfg, policy, ref, both, gen):
    B2 = len(both.tokens)
    blk = elbo_mask_block(cfg.elbo_masks, policy.config.layout, both.block_size)  # None: uniform
    # (2B, N, L) shared by θ and ref
    masks = elbo_masks_for(cfg.elbo_masks, policy.config.layout, both, cfg.n_mc, gen)

    def elbo(model):
        with autocast(both.tokens.device):
            return elbo_terms(model, both.prompts, both.responses, masks,
                              normalize=cfg.elbo_per_token, temperature=both.logp_temperature,
                              block_size=blk)  # (2B, N)

    with torch.no_grad():
        ell_ref = elbo(ref)
    # D = B̂_θ − B̂_ref = (1/n) Σ_j (ℓ_θ^(j) − ℓ_ref^(j)) on the same masks (VRPO's coupling)
    d = (elbo(policy) - ell_ref).mean(1)  # (2B,)
    loss, stats = dpo_loss(d[:B2 // 2], d[B2 // 2:], cfg.beta)
    loss.backward()
    return {"loss": loss.item(), **stats}


DPO_ESTIMATORS = {"dtrpo": dpo_dtrpo, "full_trajectory": dpo_full_trajectory, "vrpo": dpo_vrpo}


def train_dpo(cfg: DPOConfig) -> dict:
    """Run offline DPO as configured; returns the final test metrics. Ctrl-C saves a checkpoint."""
    rank, world, device = init_parallel(cfg.device)
    share(cfg.batch_size, rank, world, "batch_size")  # refused unless the shares are equal
    policy, task = load(cfg.init, device)
    ref, _ = load(cfg.init, device)  # frozen
    ref.requires_grad_(False)
    data = read_saved(cfg.pairs, "a pairs file written by `pairs`",
                      ("chosen", "rejected", "task", "task_options", "ref_fingerprint"), device)
    if (data["task"], data["task_options"]) != (task.name, dict(task.options)):
        raise BadInput(f"{cfg.pairs} holds {data['task']} {data['task_options']} pairs; "
                       f"--init is a {task!r} model")
    if data["ref_fingerprint"] != fingerprint(ref):
        raise BadInput(f"{cfg.pairs} was sampled by another model than --init={cfg.init}: "
                       "DPO needs that model as reference")
    check_steps(cfg.steps_per_block, policy)
    chosen, rejected = Trajectory(**data["chosen"]), Trajectory(**data["rejected"])
    if cfg.estimator == "dtrpo" and cfg.steps_scored > chosen.steps_per_block:
        raise BadInput(f"--steps_scored={cfg.steps_scored} is not valid: {cfg.pairs} was decoded "
                       f"with {chosen.steps_per_block} steps per block")
    n_pairs = len(chosen.tokens)
    per_epoch = math.ceil(n_pairs / cfg.batch_size)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gens = {"estimator": torch.Generator(device).manual_seed(cfg.seed)}  # s_b draws and ELBO masks
    fwd = data_parallel(policy, world)  # the estimators' forwards and backwards (DDP: all-reduced)
    if rank == 0:
        print(f"{n_pairs} pairs, {per_epoch} steps per epoch")

    def iteration(it):
        epoch, b = divmod(it, per_epoch)
        # the order of epoch e is a function of (seed, e) alone: nothing to save for an exact resume
        order = torch.randperm(n_pairs,
                               generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].to(device)
        mine = idx.tensor_split(world)[rank]  # this process's pairs (an epoch's last batch: fewer)
        # dpo_loss is a mean over this process's pairs: its gradient weighs its share of the batch
        weigh(fwd, len(mine), len(idx))
        if len(mine) == 0:  # every process must join each backward: this one adds 0 × a pair
            mine = idx[:1]
        if world > 1:  # own draws per process, a function of (seed, iteration, rank): resumable
            gens["estimator"].manual_seed((cfg.seed * 1_000_003 + it) * world + rank)
        both = Trajectory.cat([chosen.index(mine), rejected.index(mine)])  # (2B rows) chosen first
        t0 = time.perf_counter()
        with Meters(device, policy, ref) as meters:
            stats = DPO_ESTIMATORS[cfg.estimator](cfg, fwd, ref, both, gens["estimator"])
            grad_norm = clip_and_step(policy, opt, cfg.grad_clip)
        row = {"epoch": round((it + 1) / per_epoch, 4), **stats, "grad_norm": grad_norm,
               "skipped_steps": int(not math.isfinite(grad_norm)),  # a non-finite step: skipped
               "update_s": elapsed(t0, device), **meters.summary(responses=len(both.tokens))}
        if cfg.kl_pairs > 0:  # untimed diagnostics on the reference's own trajectories
            n = min(cfg.kl_pairs, len(idx))
            few = Trajectory.cat([chosen.index(idx[:n]), rejected.index(idx[:n])])
            with torch.no_grad(), autocast(device):
                # k1 on the reference's samples: KL(π_ref ‖ π_θ) ≈ mean[log π_ref(τ) − log π_θ(τ)]
                row["kl_ref"] = (few.logp_at_reveal.sum(1)
                                 - trajectory_logprob(policy, few)).mean().item()
                row["entropy_revealed"] = entropy_at_reveal(policy, few)[few.unmask_step >= 0] \
                    .mean().item()
        return row

    max_iters = min(cfg.max_iters, math.ceil(cfg.epochs * per_epoch))
    return run_loop(cfg, "dpo", models={"model": policy}, frozen={"ref_model": ref}, task=task,
                    opt=opt, generators=gens, iteration=iteration, max_iters=max_iters,
                    device=device, bar_keys=("loss", "reward_accuracy", "margin"),
                    curve_keys=HEALTH)

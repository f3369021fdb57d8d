"""The one run loop of every kind of run (sft, rl, dpo), and what it needs around it.

`run_loop` calls an algorithm's `iteration(it)` until a step or time budget is
spent and does the rest the same way for every kind of run: the metrics log, periodic greedy
evaluation, atomic checkpoints, exact resume, Ctrl-C, the progress bar and the figure. An
algorithm module (sft.py, rl.py, preference.py) only says what one iteration is. The run folder's
lock, log, figure and resume checks are in folders.py.

Data parallel (parallel.py): launched by torchrun, each process runs the same loop on its share of
every global batch, and rank 0 alone evaluates, logs, checkpoints and plots (docs/distributed.md).

Shapes: B batch, P prompt length, L response length.
"""

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import (BadInput, Config, RunStopped, arg, atomic_save, autocast, check,
                     device_arg, folder_problem, read_saved, write_json)
from .folders import (CHECKPOINT, FolderLock, interrupt_on_sigterm, plot_run, read_metrics,
                      remove_stale_files, resume_state)
from .model import MaskedDiffusionTransformer, ModelConfig
from .parallel import all_ranks, is_main
from .sampling import PARALLEL, REMASKING, SCHEDULES, Trajectory, generate
from .tasks import get_task


@dataclass
class StepsConfig(Config):
    """The sampler's steps per block: every command that decodes has this option."""
    steps_per_block: int = arg(0, "sampler steps per block T_B of rollouts, pairs and evaluation "
                               "(0: the block size b, one token per step)", ge=0, group="decoding")


@dataclass
class RunConfig(StepsConfig):
    """What every kind of run (sft, rl, dpo) shares."""
    seed: int = arg(0, "seed of every generator of the run (one per purpose)", ge=0, lt=2**31)
    lr: float = arg(1e-4, "AdamW learning rate (the peak, where a schedule decays it)", gt=0)
    time_budget: float = arg(0.0, "also stop after this many training seconds, evaluation "
                                  "excluded (0: no limit); the schedule stays set by the count",
                             ge=0)
    device: str = device_arg()
    out_dir: str = arg("runs/run", "run folder: config.json, metrics.jsonl, checkpoint.pt, curves",
                       valid=folder_problem)
    resume: bool = arg(False, "continue the run saved in out_dir")
    eval_every: int = arg(10, "evaluate and checkpoint every this many iterations (0: at the end)",
                          ge=0, group="evaluation")
    eval_every_s: float = arg(0.0, "also evaluate each time this many more training seconds passed",
                              ge=0, group="evaluation")
    eval_n: int = arg(500, "fixed test problems per evaluation (greedy decoding)", ge=1,
                      group="evaluation")
    weight_decay: float = arg(0.0, "AdamW weight decay", ge=0, group="optimizer")
    grad_clip: float = arg(1.0, "gradient norm clip (0: off)", ge=0, group="optimizer")


@dataclass
class DecodingConfig(StepsConfig):
    """How rollouts and pairs are decoded (sampling.generate, docs/math.md §3 "Decoding rules")."""
    remasking: str = arg("low_confidence", "position rule: which positions a step reveals",
                         REMASKING, group="decoding")
    schedule: str = arg("uniform", "tokens per step: uniform (LLaDA) or ascending (CJ-GRPO: "
                                   "1, 2, 4, ..., the rest last; ⌊log₂ b⌋ steps)", SCHEDULES,
                       group="decoding")
    threshold: float = arg(0.9, "remasking=threshold or credit: reveal every position at least "
                                "this confident", gt=0, le=1, group="decoding")
    eos_factor: float = arg(1.0, "EOS early rejection (CJ-GRPO): an EOS candidate's confidence "
                                 "× a factor ramping from this to 1 (1: off)", gt=0, le=1,
                            group="decoding")

    def __post_init__(self):
        super().__post_init__()
        check(self.remasking not in PARALLEL or self.schedule == "uniform", "schedule",
              self.schedule, f"uniform with remasking={self.remasking} (it sets its own counts)")
        check((self.remasking not in PARALLEL and self.schedule == "uniform")
              or self.steps_per_block == 0, "steps_per_block", self.steps_per_block,
              f"0 with remasking={self.remasking} and schedule={self.schedule} "
              "(they set their own steps)")

    def decoding(self, task) -> dict:
        """`generate`'s keyword arguments for these options (the task gives the EOS token)."""
        return dict(remasking=self.remasking, schedule=self.schedule, threshold=self.threshold,
                    eos_factor=self.eos_factor, eos_id=task.vocab.eos_id)


# --------------------------------------------------------------------------------------------------
# Checkpoints, decoding and evaluation


def load(path: str, device="cpu"):
    """Reload a checkpoint of any minidtrpo run -> (model, task). Weights only, no pickled code;
    a missing, damaged or wrong-kind file raises BadInput naming the path."""
    ckpt = read_saved(path, "a minidtrpo checkpoint", CHECKPOINT, device)
    try:
        task = get_task(ckpt["task"], **ckpt["task_options"])
        model = MaskedDiffusionTransformer(ModelConfig(**ckpt["model_config"]), verbose=False)
        model.to(device).load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # fields or weights that do not fit
        raise BadInput(f"{path}: a damaged checkpoint ({type(e).__name__}); expected a minidtrpo "
                       "checkpoint") from None
    return model, task


def check_steps(steps_per_block: int, model):
    """--steps_per_block must fit the model's block (0: one token per step): else BadInput."""
    b = model.config.block_size
    if steps_per_block > b:
        raise BadInput(f"--steps_per_block={steps_per_block} is not valid; valid: 0..{b}, the "
                       "block size of the checkpoint")


@torch.no_grad()
def rollout(model, task, prompts, *, temperature=0.0, steps_per_block=0, generator=None,
            chunk=1024, hints=None, **decoding):
    """Decode one response per prompt (B, P), recording the trajectory, and score it with the task.

    hints: (B, L) tokens fixed before decoding, mask_id where free (`generate`; IGPO); decoding:
    more of `generate`'s options (`DecodingConfig.decoding`).
    Returns (Trajectory, rewards (B,), exact (B,)) on the prompts' device."""
    with autocast(prompts.device):
        traj = Trajectory.cat([
            generate(model, prompts[i:i + chunk], temperature=temperature,
                     steps_per_block=steps_per_block or None, generator=generator,
                     hints=None if hints is None else hints[i:i + chunk], **decoding)
            for i in range(0, len(prompts), chunk)])
    p, r = traj.prompts.cpu(), traj.responses.cpu()
    return traj, task.reward(p, r).to(prompts.device), task.exact(p, r).to(prompts.device)


def evaluate(model, task, prompts, *, steps_per_block=0, temperature=0.0, generator=None,
             **decoding) -> dict:
    """Decode and score every prompt: {"exact": share fully correct, "reward": mean, "n": count}.
    decoding: more of `generate`'s options (the decoding rule; default one token per step)."""
    _, reward, exact = rollout(model, task, prompts, temperature=temperature, generator=generator,
                               steps_per_block=steps_per_block, chunk=500, **decoding)
    return {"exact": exact.float().mean().item(), "reward": reward.mean().item(), "n": len(prompts)}


# --------------------------------------------------------------------------------------------------
# The optimizer step and the run loop


def lr_at(lr: float, step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to min_ratio·lr over the run's
    max_steps (min_ratio = 1: constant). A function of the step count alone, so the same command
    follows the same rates on any machine; a time budget only stops a run early."""
    if step < warmup:
        return lr * (step + 1) / warmup
    # lr_t = lr · (r + (1 − r) · ½(1 + cos(π · step / max_steps)))  (SGDR, arXiv 1608.03983)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step / max_steps, 1.0)))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


def clip_and_step(model, opt, grad_clip) -> float:
    """Clip the gradient norm (0: off), step, zero the gradients; return the unclipped norm. A
    non-finite norm (a NaN or inf loss or gradient) skips the step: the run loop counts it."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def finite(modules) -> bool:
    return all(torch.isfinite(p).all() for m in modules for p in m.parameters())


MAX_BAD_ITERS = 10  # a run stops after this many iterations in a row with a non-finite step


def run_loop(cfg, kind, *, models, task, opt, generators, iteration, max_iters, device,
             frozen=None, bar_keys=(), curve_keys=None, eval_at_start=True) -> dict:
    """Call iteration(it) for it = 0, 1, ... until max_iters or cfg.time_budget; log,
    evaluate, checkpoint. Returns the last evaluation's metrics.

    models: {name: module} that training changes, saved in every checkpoint; models["model"] is
    evaluated and is what `load` returns. frozen: {name: module} saved too, never changed (the
    reference), so left out of snapshots. iteration(...) -> the metrics row of that iteration, its
    timed seconds in rollout_s and update_s and its non-finite (skipped) optimizer steps in
    skipped_steps. Every random draw must come from `generators`: their states, the models and the
    optimizer go into every checkpoint, so a run interrupted and resumed (cfg.resume) writes the
    same metrics as an uninterrupted one. Ctrl-C saves the state as of the last finished iteration
    (a snapshot) and re-raises; after a kill, the rows logged since the last checkpoint are dropped
    on resume and written again. An iteration that skipped a step or left a non-finite weight is
    undone (weights and optimizer back to the snapshot); MAX_BAD_ITERS in a row raise RunStopped.
    curves.png draws the test scores and each of curve_keys (default: bar_keys) per iteration.
    Data parallel, every rank runs this loop and resumes from the checkpoint; rank 0 alone holds
    the folder's lock, evaluates, logs and saves, so the generators must be alike on every rank.
    """
    state = resume_state(cfg, kind, models, task, device) if cfg.resume else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    interrupt_on_sigterm()
    with FolderLock(cfg.out_dir) if is_main() else contextlib.nullcontext():
        return _loop(cfg, kind, models, frozen or {}, task, opt, generators, iteration, max_iters,
                     device, bar_keys, curve_keys or bar_keys, eval_at_start, state)


def _loop(cfg, kind, models, frozen, task, opt, generators, iteration, max_iters, device,
          bar_keys, curve_keys, eval_at_start, state):
    main = is_main()
    if main:
        remove_stale_files(cfg.out_dir)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    run = {"iter": 0, "train_seconds": 0.0, "pending_eval": eval_at_start,  # evaluate next?
           "bad_streak": 0, "skipped_steps": 0}  # non-finite iterations in a row, steps in all
    if state is not None:
        load_run_state(state, {**models, **frozen}, opt, generators)
        run.update({k: state.get(k, v) for k, v in run.items()})
    if state is not None and main:
        # rows written after the checkpoint are redone: drop them (and an unfinished evaluation's)
        rows = [r for r in read_metrics(metrics_path) if r.get("iter", -1) < run["iter"] or
                (r["iter"] == run["iter"] and not (run["pending_eval"] and "test_exact" in r))]
        tmp = f"{metrics_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, metrics_path)  # a kill during the rewrite leaves the old log whole
        print(f"resumed {ckpt_path} at iteration {run['iter']}")
    elif main:  # a fresh run starts a fresh log, and an old run's checkpoint must not be resumed
        for path in (metrics_path, ckpt_path):
            if os.path.exists(path):
                os.remove(path)
    if dist.is_initialized():  # every rank has read the checkpoint before rank 0 writes one
        dist.barrier()
    if main:
        write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
        print("config:", json.dumps(asdict(cfg)))
    test_prompts = task.test_set(cfg.eval_n)[0].to(device)

    def mutable():  # what changes during a run (a snapshot copies it)
        return {**{name: m.state_dict() for name, m in models.items()},
                "optimizer": opt.state_dict(),
                "rng": {name: g.get_state() for name, g in generators.items()}, **run}

    def save(state):  # "finished" tells a caller (compare) a complete run from an interrupted one
        if not finite(models.values()):  # never reached (bad iterations are undone): a guard
            raise RunStopped(f"not saving {ckpt_path}: a weight is not finite")
        atomic_save({**state, **{name: m.state_dict() for name, m in frozen.items()},
                     "finished": done(state) and not state["pending_eval"], "kind": kind,
                     "model_config": asdict(models["model"].config), "task": task.name,
                     "task_options": dict(task.options), "config": asdict(cfg)}, ckpt_path)

    def log(row):
        if not main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def done(state=None):
        state = run if state is None else state
        return state["iter"] >= max_iters or 0 < cfg.time_budget <= state["train_seconds"]

    bar = tqdm(total=max_iters, initial=run["iter"], desc=kind, dynamic_ncols=True,
               mininterval=1.0, disable=None if main else True)  # None: no bar off a tty; rank 0's
    snapshot, metrics, stopped = None, {}, None
    try:
        while True:
            if run["pending_eval"] and not main:
                run["pending_eval"] = False  # rank 0 evaluates; the others go on to the next batch
            if run["pending_eval"]:
                # temperature 0: no randomness, so an evaluation never changes the run
                metrics = evaluate(models["model"], task, test_prompts,
                                   steps_per_block=cfg.steps_per_block)
                log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3),
                     "test_exact": metrics["exact"], "test_reward": metrics["reward"]})
                run["pending_eval"] = False
                if run["bad_streak"] == 0:  # during a non-finite streak the weights are suspect
                    save(mutable())
            if done():
                break
            snapshot = copy.deepcopy(mutable())  # Ctrl-C inside the iteration goes back to here
            row = iteration(run["iter"])
            bad = (row.get("skipped_steps", 0) > 0 or not finite(models.values())
                   or any(isinstance(v, float) and not math.isfinite(v) for v in row.values()))
            bad = bool(all_ranks(bad, dist.ReduceOp.MAX))  # data parallel: all undo, or none
            if bad:  # undo the iteration's updates; its draws stay spent (the next one differs)
                load_run_state(snapshot, models, opt, {})
                row["skipped_steps"] = max(row.get("skipped_steps", 0), 1)
            run["bad_streak"] = run["bad_streak"] + 1 if bad else 0
            run["skipped_steps"] += row.get("skipped_steps", 0)
            before = run["train_seconds"]
            # data parallel: the slowest rank's seconds, so that every rank stops at the same step
            run["train_seconds"] += all_ranks(row.get("rollout_s", 0.0) + row["update_s"],
                                              dist.ReduceOp.MAX)
            run["iter"] += 1
            log({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 3), **row})
            if run["bad_streak"] >= MAX_BAD_ITERS:
                kept = (f"{ckpt_path} keeps the state before them" if os.path.exists(ckpt_path)
                        else "no checkpoint was written")
                stopped = (f"stopped: {MAX_BAD_ITERS} iterations in a row had a non-finite loss, "
                           f"gradient, weight or metric; {kept}")
                break
            every_s = cfg.eval_every_s > 0 and \
                run["train_seconds"] // cfg.eval_every_s > before // cfg.eval_every_s
            every = cfg.eval_every and run["iter"] % cfg.eval_every == 0
            run["pending_eval"] = bool(every or every_s or done())
            snapshot = None
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in bar_keys if k in row} |
                            {"test": f"{metrics.get('exact', math.nan):.3f}",
                             "s": f"{run['train_seconds']:.0f}", "skipped": run["skipped_steps"]})
    except KeyboardInterrupt:
        if main:
            at = (snapshot or run)["iter"]
            print(f"\ninterrupted: saving {ckpt_path} at iteration {at} (continue with --resume)")
            save(snapshot if snapshot is not None else mutable())
        raise
    finally:
        bar.close()
        if main and os.path.exists(metrics_path):
            plot_run(metrics_path, os.path.join(cfg.out_dir, "curves.png"), curve_keys, kind)
    evals = [r for r in read_metrics(metrics_path) if "test_exact" in r] if main else []
    if not metrics and evals:  # resumed a finished run (or stopped): report its last evaluation
        metrics = {"exact": evals[-1]["test_exact"], "reward": evals[-1]["test_reward"],
                   "n": cfg.eval_n}
    if main:
        print(json.dumps({"iter": run["iter"], "train_seconds": round(run["train_seconds"], 1),
                          "skipped_steps": run["skipped_steps"], **metrics,
                          **({"stopped": stopped} if stopped else {})}))
    if stopped:
        raise RunStopped(stopped)
    return metrics


def load_run_state(state, models, opt, generators):
    """Put a checkpoint's (or snapshot's) weights, optimizer and generator states in place."""
    for name, module in models.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    for name, g in generators.items():
        g.set_state(state["rng"][name].cpu())
